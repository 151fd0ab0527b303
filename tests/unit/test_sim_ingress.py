"""cpn sim models ingress: the same requests entering at one central gateway, a gateway per region
and a gateway per province, routed by the real router on the full path (issue: regions, item 6)."""

from __future__ import annotations

import pytest

from controlplane.tools.sim import core_scenario, report, runner
from topology import ingress, latency, loader

DAY = """
name = "ingress"
hours = 2
sample_s = 600
[inference]
requests = 20000
ingress = true
[[inference.models]]
name = "m7b"
replicas = 60
[training]
jobs = 0
"""


@pytest.fixture(scope="module")
def result() -> runner.Result:
    return runner.simulate(core_scenario.decode(DAY, "ingress"), layout=loader.load_default(), seed=5)


def test_each_gateway_set_is_a_policy_on_the_same_requests(result: runner.Result) -> None:
    inf = result.report["inference"]
    pols = inf["policies"]
    assert {"cpn", "cpn@central", "cpn@region", "cpn@province", "random", "round-robin"} <= set(pols)
    lay = loader.load_default()
    sets = ingress.gateway_sets(lay, latency.RttIndex.build(lay))
    assert {k: v["gateways"] for k, v in inf["ingress"]["sets"].items()} == sets
    for name in ("cpn@central", "cpn@region", "cpn@province"):
        p = pols[name]
        assert p["served_within_budget"] + p["served_over_budget"] + p["failed"] == inf["requests"]


def test_nearer_doors_serve_more_within_budget_and_never_beat_the_direct_path(result: runner.Result) -> None:
    pols = result.report["inference"]["policies"]
    share = {k: pols[k]["within_budget_share"] for k in ("cpn@central", "cpn@region", "cpn@province", "cpn")}
    # One door in Beijing fails most of the country; a door per region or per province does far
    # better; none is better than a door in every city (the direct path), since a full path is never
    # shorter. A door per province is a client of its region's cluster, like the region's own door:
    # it saves the leg to the door but pays the detour to the cluster city, so without a cluster per
    # province it does not beat a door per region (here it does worse).
    assert share["cpn@central"] < 0.5 * min(share["cpn@region"], share["cpn@province"])
    assert max(share["cpn@region"], share["cpn@province"]) <= share["cpn"]
    assert share["cpn@central"] < 0.5 * share["cpn"]


def test_the_report_prints_the_comparison(result: runner.Result) -> None:
    text = report.text(result.report, result.timing)
    for name in ("cpn@central", "cpn@region", "cpn@province"):
        assert name in text
