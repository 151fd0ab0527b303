"""The router of a placed gateway ranks full paths (pure; national layout)."""

from __future__ import annotations

import random

import pytest

from controlplane.core import router
from controlplane.core.errors import RequestError
from topology import ingress, latency, loader

LAYOUT = loader.load_default()
INDEX = latency.RttIndex.build(LAYOUT)


@pytest.mark.parametrize("origin", ["guangzhou", "beijing", "kashgar", "sanya"])
def test_ingress_ranking_is_the_full_path(origin: str) -> None:
    if not LAYOUT.has_origin(origin):
        pytest.skip(f"{origin} not in the layout")
    source = ingress.IngressRtt(INDEX, "beijing")
    got = list(source.ranked(origin))
    leg = ingress.city_rtt_ms(INDEX, origin, "beijing")
    assert [r for _, r in got] == sorted(r for _, r in got)
    assert dict(got) == pytest.approx(dict(ingress.full_ranked(INDEX, "beijing", leg)))
    assert all(r >= INDEX.rtt_ms(origin, s) - 1e-9 for s, r in got)  # never shorter than direct


def test_nearer_gateway_is_named_only_when_strictly_nearer() -> None:
    r = router.for_gateway(LAYOUT, INDEX, "beijing")
    assert r.ingress == "beijing"
    gateways = LAYOUT.gateways()
    for origin, gw in r.nearer_gateway.items():
        assert gw in gateways and gw != "beijing"
        assert ingress.city_rtt_ms(INDEX, origin, gw) < ingress.city_rtt_ms(INDEX, origin, "beijing")
    assert "beijing" not in r.nearer_gateway and r.nearer_gateway.get("guangzhou") == "guangzhou"
    assert router.for_gateway(LAYOUT, INDEX, None).ingress == ""


def test_unknown_city_is_a_request_error_naming_the_field() -> None:
    with pytest.raises(RequestError) as err:
        router.for_gateway(LAYOUT, INDEX, "atlantis")
    assert err.value.field == "gateway_city"


def test_budget_is_checked_on_the_full_path() -> None:
    from controlplane.core.registry import SiteRegistry
    from edge_agent import wire

    reg = SiteRegistry(miss_limit=3, heartbeat_s=1.0)
    for site in ("gz-edge", "bj-edge"):
        view, _ = reg.register(wire.Register(site=site, city=site[:2]), 0.0)
        reg.heartbeat(wire.Heartbeat(site=site, seq=1, models=[wire.ReplicaStatus(model="m", slots=4)]), 0.0)
    r = router.for_gateway(LAYOUT, INDEX, "beijing")
    far = r.route(router.RouteRequest(origin="guangzhou", model="m", budget_ms=10.0), reg.views, reg.version,
                  random.Random(1))
    assert isinstance(far, router.NoRoute)
    near = r.route(router.RouteRequest(origin="beijing", model="m", budget_ms=10.0), reg.views, reg.version,
                   random.Random(1))
    assert isinstance(near, router.Route) and near.site == "bj-edge"
