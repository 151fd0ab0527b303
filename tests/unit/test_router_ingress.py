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
    assert dict(got) == pytest.approx({s: leg + r for s, r in INDEX.ranked("beijing")})
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


def test_with_regions_the_gateway_to_site_leg_is_the_nats_path_through_the_clusters() -> None:
    """A gateway is a client of its region's cluster, a site a leaf of its own: between regions the
    path goes gateway city -> its cluster city -> the site's cluster city -> the site."""
    regions = {r.id: r for r in LAYOUT.regions}
    city = "beijing"
    home = regions[next(r for r in regions if city in regions[r].gateways)]
    r = router.for_gateway(LAYOUT, INDEX, city)
    assert isinstance(r.rtt, ingress.IngressRtt) and r.rtt.paths is not None
    got = dict(r.rtt.ranked(city))  # from the gateway's own city: the leg origin -> gateway is 0
    crossed = 0
    for site in LAYOUT.sites:
        there = regions[LAYOUT.region_of_site(site.id) or ""]
        if there.id == home.id:
            want = ingress.city_rtt_ms(INDEX, city, home.cluster) + INDEX.rtt_ms(home.cluster, site.id)
        else:
            want = (ingress.city_rtt_ms(INDEX, city, home.cluster) + ingress.city_rtt_ms(INDEX, home.cluster, there.cluster)
                    + INDEX.rtt_ms(there.cluster, site.id))
            crossed += got[site.id] > INDEX.rtt_ms(city, site.id) + 1e-6
        assert got[site.id] == pytest.approx(want), site.id
        assert got[site.id] >= INDEX.rtt_ms(city, site.id) - 1e-6  # never shorter than the direct path
    assert crossed > 0  # some sites of other regions are farther by the NATS path than by the backbone
    assert list(got.values()) == sorted(got.values())
    # Without regions (or without the layout) the leg is the backbone's shortest path, as before.
    plain = ingress.IngressRtt(INDEX, city)
    assert dict(plain.ranked(city)) == pytest.approx(dict(INDEX.ranked(city)))
