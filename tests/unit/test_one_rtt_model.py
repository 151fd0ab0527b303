"""One RTT model everywhere: a live gateway's router (``X-CPN-RTT-Ms``), ``cpn sim``'s ingress
policies and ``cpn topology coverage --gateways`` give the same full-path figure for the same
(origin, gateway, site) on the national layout, the leg gateway -> site along the NATS path through
the regions' clusters (issue: regions, items 1, 2 and 6)."""

from __future__ import annotations

import pytest

from controlplane.core import router
from controlplane.tools.sim import core_inference, core_scenario, runner
from topology import ingress, latency, loader

LAYOUT = loader.load_default()
INDEX = latency.RttIndex.build(LAYOUT)

DAY = """
name = "one-rtt-model"
hours = 1
sample_s = 600
[inference]
requests = 100
ingress = true
[[inference.models]]
name = "m7b"
replicas = 60
[training]
jobs = 0
"""

ORIGINS = ["guangzhou", "kashgar", "hangzhou", "xian", "harbin", "sanya", "zhengzhou", "lhasa"]


@pytest.fixture(scope="module")
def sim_sources() -> dict[str, ingress.NearestIngressRtt]:
    """The RTT source of each of the simulator's gateway-set policies, as it builds them."""
    s = core_scenario.decode(DAY, "one-rtt-model")
    start = core_scenario.start_epoch_s(s.start)
    dep = core_inference.deploy(LAYOUT, INDEX, s, start)
    streams = runner.Streams(0)
    sim = core_inference.InferenceSim(LAYOUT, INDEX, s, dep, start, 1, streams.router, streams.baseline,
                                      streams.fixed, streams.ingress)
    out = {}
    for name, r in zip(sim.policies, sim.routers):
        if name.startswith("cpn@"):
            assert isinstance(r.rtt, ingress.NearestIngressRtt)
            out[name[len("cpn@"):]] = r.rtt
    return out


@pytest.mark.parametrize("gateway_set", ["central", "region"])
def test_gateway_sim_and_coverage_give_one_figure(sim_sources: dict[str, ingress.NearestIngressRtt],
                                                  gateway_set: str) -> None:
    sim = sim_sources[gateway_set]
    report = {o.id: o for o in ingress.analyse(LAYOUT, INDEX, 10.0, sim.gateways).origins}
    detoured = 0
    for origin in ORIGINS:
        assert LAYOUT.has_origin(origin), origin
        row = report[origin]
        gateway, site = row.gateway, row.full_site
        assert gateway == sim.gateway_of(origin) and site is not None
        # The gateway's router, as `cpn hub --gateway-city` builds it: what X-CPN-RTT-Ms says.
        hub = dict(router.for_gateway(LAYOUT, INDEX, gateway).rtt.ranked(origin))
        simulated = dict(sim.ranked(origin))
        assert hub == pytest.approx(simulated, abs=1e-9), (origin, gateway)  # every site, not only the nearest
        assert row.full_rtt_ms == round(hub[site], 3), (origin, gateway, site)
        # The backbone's shortest path gateway -> site, what sim and coverage counted before: the
        # NATS path through the clusters is never shorter, and to sites of other regions often longer.
        leg = ingress.city_rtt_ms(INDEX, origin, gateway)
        for s, full in hub.items():
            backbone = leg + INDEX.rtt_ms(gateway, s)
            assert full >= backbone - 1e-9
            detoured += full > backbone + 1e-6
    assert detoured > 0
