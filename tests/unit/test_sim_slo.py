"""Admission by predicted time to first token in ``cpn sim``: known answers on a two-site network
(the live predictor, ``ttft.candidate`` + ``ttft.admit``, over the simulated sites' views)."""

from __future__ import annotations

import random

import pytest

from controlplane.tools.sim import core_inference, core_scenario, report, runner
from tests.unit.test_sim_known import two_site_network


def slo_sim(slo_ms: float = 1000.0):
    lay, rtt = two_site_network()
    s = core_scenario.decode(f"""
name = "t"
[inference]
budgets_ms = [10.0]
budget_shares = [1.0]
slo_share = 1.0
slo_ttft_ms = {slo_ms}
[[inference.models]]
name = "m"
slots_per_replica = 4
ttft_ms = 0
""")
    dep = core_inference.deploy(lay, rtt, s)
    start = core_scenario.start_epoch_s(s.start)
    sim = core_inference.InferenceSim(lay, rtt, s, dep, start, 1, random.Random(1), random.Random(2),
                                      slo_rng=random.Random(3))
    return sim, start, lay, rtt


def busy(sim, site: str) -> int:
    return sim.views[site].replicas["m"].busy


def test_a_queue_makes_the_farther_idle_site_win_a_short_one_is_joined_and_a_long_one_refused() -> None:
    sim, t, lay, rtt = slo_sim(1000.0)
    o = [x.id for x in lay.origins].index("shanghai")
    rtt_sh = rtt.rtt_ms("shanghai", "sh-edge")
    assert rtt_sh < rtt.rtt_ms("shanghai", "hz-edge") <= 10.0
    slo = sim.slo
    # Four 2 s requests at the nearer site finish: its heartbeat's service-time p50 is 2,000 ms.
    for k in range(4):
        sim.request(t + k * 1e-3, o, 0, 0, 2.0)
    assert busy(sim, "sh-edge") == 4 and busy(sim, "hz-edge") == 0
    sim.drain(t + 3.0)
    # Fill the nearer site with four 0.5 s requests (they end at t + 3.5).
    for k in range(4):
        sim.request(t + 3.0 + k * 1e-3, o, 0, 0, 0.5)
    assert busy(sim, "sh-edge") == 4
    # Next: the nearer site predicts 1/4 x 2,000 = 500 ms of queue; the farther idle one none: it wins.
    sim.drain(t + 3.05)
    sim.request(t + 3.05, o, 0, 0, 60.0)
    assert busy(sim, "hz-edge") == 1 and slo.queued == 0
    # Fill the farther one too (its service time is not measured: a full site there never meets an SLO).
    for k in range(3):
        sim.request(t + 3.06 + k * 1e-3, o, 0, 0, 60.0)
    assert busy(sim, "hz-edge") == 4
    # Both full: the nearer site's 500 ms queue meets the 1,000 ms SLO: admitted to its queue.
    sim.request(t + 3.1, o, 0, 0, 1.0)
    assert slo.queued == 1 and sim.views["sh-edge"].queue_depth == 1
    # One more would be 2 places behind (1,000 ms + prefill): refused, for its queue.
    sim.request(t + 3.2, o, 0, 0, 1.0)
    assert slo.refused == {"queue": 1, "prefill": 0, "unmeasured": 0}
    assert sum(sim.stats[0].failed) == 1
    # At t + 3.5 the first slot frees and goes to the queued request (it waited 400 ms); the other
    # three 0.5 s requests end just after and free their slots.
    sim.drain(t + 3.6)
    assert sim.views["sh-edge"].queue_depth == 0 and busy(sim, "sh-edge") == 1
    assert slo.ttft_ms[-1] == pytest.approx(rtt_sh + 400.0, abs=1e-3)  # RTT + wait + prefill (0 here)
    assert slo.queued_met == 1 and slo.missed == 0
    # The predictor said 500 ms of queue (+ its prefill profile's guess): the error is recorded.
    assert slo.queued_errors_ms[-1] < -100.0
    assert slo.admitted == 13 and slo.requests == 14


def test_a_site_lost_while_requests_wait_counts_them_missed_and_reroutes_them() -> None:
    sim, t, lay, _ = slo_sim(1000.0)
    o = [x.id for x in lay.origins].index("shanghai")
    for k in range(4):
        sim.request(t + k * 1e-3, o, 0, 0, 2.0)
    sim.drain(t + 3.0)
    for k in range(8):  # four at each site
        sim.request(t + 3.0 + k * 1e-3, o, 0, 0, 30.0)
    sim.request(t + 3.1, o, 0, 0, 1.0)  # both full: waits in the nearer site's queue? 1/4 x 2 s: yes
    assert sim.slo.queued == 1
    sh = sim.idx["sh-edge"]
    sim.fail(sh, t + 4.0)
    assert sim.views["sh-edge"].queue_depth == 0 and sim.slo.lost == 1 and sim.slo.missed == 1
    log: dict[str, object] = {}
    sim.detect(sh, t + 7.0, log)
    assert log["rerouted"] + log["failed"] == 5  # four in flight and the one that waited


SLO_DAY = """
name = "slo-day"
hours = 2
sample_s = 300
[inference]
requests = 30000
slo_share = 0.3
slo_ttft_ms = 1000
[[inference.models]]
name = "m7b"
max_replicas = 120
max_replicas_per_site = 4
per_token_ms = 20
mean_tokens = 250
[training]
jobs = 0
"""


def test_a_run_reports_admissions_refusals_and_the_predictors_error() -> None:
    res = runner.simulate(core_scenario.decode(SLO_DAY, "slo-day"), seed=1)
    inf = res.report["inference"]
    slo = inf["slo"]
    assert slo["requests"] == pytest.approx(0.3 * inf["requests"], rel=0.05)
    assert slo["admitted"] + slo["refused"] + slo["no_replica_within_budget"] == slo["requests"]
    assert slo["met"] + slo["missed"] + slo["waiting_at_end"] == slo["admitted"]
    assert slo["met_share"] >= 0.99
    assert set(slo["refused_by_reason"]) == {"queue", "prefill", "unmeasured"}
    assert slo["predictor_error_ms"]["abs_p95"] >= slo["predictor_error_ms"]["abs_p50"] >= 0.0
    assert "TTFT SLO 1000 ms on 30.0% of requests" in report.text(res.report)
    again = runner.simulate(core_scenario.decode(SLO_DAY, "slo-day"), seed=1)
    assert report.to_json(again.report) == report.to_json(res.report)
    # Without an SLO share nothing is drawn and nothing is reported.
    off = runner.simulate(core_scenario.decode(SLO_DAY.replace("slo_share = 0.3", "slo_share = 0"), "off"), seed=1)
    assert "slo" not in off.report["inference"]
