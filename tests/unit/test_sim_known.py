"""cpn sim on small networks with answers known by hand: routing, placement cost, Young/Daly waste."""

from __future__ import annotations

import math
import random

import msgspec
import pytest

from controlplane.core import checkpointing, placement
from controlplane.tools.sim import core_inference, core_scenario, core_training, core_workload
from topology import latency, loader

ACCELS = """
[accelerators.A800]
vendor = "nvidia"
units = 1.0
kw_per_card = 0.4
memory_gb = 80
"""


def tariff(price: float) -> str:
    return (f"{{ flat_cny_per_kwh = {price}, peak_cny_per_kwh = {price}, valley_cny_per_kwh = {price}, "
            f"peak_hours = [], valley_hours = [] }}")


def site(id: str, city: str, lat: float, lon: float, tier: str, cards: int, *, price: float = 0.5, pue: float = 1.2,
         rate: float = 0.0, restart_s: float = 300.0) -> str:
    return f"""
[[sites]]
id = "{id}"
name = "{id}"
city = "{city}"
region = "r"
lat = {lat}
lon = {lon}
tier = "{tier}"
provider = "cpn-operator"
accelerators = {{ A800 = {cards} }}
tariff = {tariff(price)}
pue = {pue}
failure_rate_per_card_hour = {rate}
restart_s = {restart_s}
"""


def origin(id: str, lat: float, lon: float) -> str:
    return f'\n[[origins]]\nid = "{id}"\nname = "{id}"\nregion = "r"\nlat = {lat}\nlon = {lon}\nweight = 1.0\n'


def two_site_network():
    """One origin (Shanghai), an edge pool there and one in Hangzhou, a hub that hosts no replicas."""
    text = 'name = "two-sites"\n' + ACCELS + site("sh-hub", "shanghai", 31.15, 121.12, "hub", 64) \
        + site("sh-edge", "shanghai", 31.23, 121.47, "edge", 8) + site("hz-edge", "hangzhou", 30.27, 120.15, "edge", 8) \
        + origin("shanghai", 31.23, 121.47) + origin("hangzhou", 30.27, 120.15)
    lay = loader.loads(text)
    return lay, latency.RttIndex.build(lay)


def inference_sim(lay, rtt, *, slots: int = 4):
    s = core_scenario.decode(f"""
name = "t"
[inference]
budgets_ms = [10.0]
budget_shares = [1.0]
[[inference.models]]
name = "m"
slots_per_replica = {slots}
""")
    dep = core_inference.deploy(lay, rtt, s)
    assert sorted(x[0] for x in dep.placements["m"]) == ["hz-edge", "sh-edge"]
    start = core_scenario.start_epoch_s(s.start)
    return core_inference.InferenceSim(lay, rtt, s, dep, start, 1, random.Random(1), random.Random(2)), start


def busy_at(sim, site_id: str) -> int:
    return sim.views[site_id].replicas["m"].busy


def test_requests_go_to_the_nearer_site_until_it_is_saturated() -> None:
    lay, rtt = two_site_network()
    sim, t = inference_sim(lay, rtt, slots=4)
    o = [x.id for x in lay.origins].index("shanghai")
    assert rtt.rtt_ms("shanghai", "sh-edge") < rtt.rtt_ms("shanghai", "hz-edge")
    # One at a time: each finishes before the next, so the near site always has room.
    for k in range(50):
        sim.drain(t + k)
        sim.request(t + k, o, 0, 0, 0.5)
        assert busy_at(sim, "sh-edge") == 1 and busy_at(sim, "hz-edge") == 0
    assert sim.stats[0].ratio_sum / sim.stats[0].ratio_n == pytest.approx(1.0)
    # Long requests pile up: the first four fill the near site, the next four spill to Hangzhou,
    # then nothing within budget has room and requests fail (strict policy).
    base = t + 100
    sim.drain(base)
    for k in range(10):
        sim.request(base + k * 1e-3, o, 0, 0, 1000.0)
    assert busy_at(sim, "sh-edge") == 4
    assert busy_at(sim, "hz-edge") == 4
    assert sum(sim.stats[0].failed) == 2


def test_requests_go_to_the_other_site_when_the_nearer_is_lost() -> None:
    lay, rtt = two_site_network()
    sim, t = inference_sim(lay, rtt)
    o = [x.id for x in lay.origins].index("shanghai")
    sh = sim.idx["sh-edge"]
    sim.request(t, o, 0, 0, 100.0)  # in flight at sh-edge when it dies
    sim.fail(sh, t + 1)
    sim.request(t + 2, o, 0, 0, 100.0)  # the hub does not know yet: sent there, lost with it
    log: dict[str, object] = {}
    sim.detect(sh, t + 4, log)
    assert log == {"rerouted": 2, "failed": 0}
    assert busy_at(sim, "hz-edge") == 2 and busy_at(sim, "sh-edge") == 0
    for k in range(2):
        sim.request(t + 10 + k, o, 0, 0, 0.1)
    assert busy_at(sim, "hz-edge") == 4  # 2 rerouted + 2 new, all at the survivor
    sim.request(t + 12, o, 0, 0, 0.1)  # the survivor is full and the lost site gets nothing
    assert sum(sim.stats[0].failed) == 1 and busy_at(sim, "sh-edge") == 0
    sim.recover(sh, t + 20)
    sim.drain(t + 1000)
    sim.request(t + 1001, o, 0, 0, 1.0)
    assert busy_at(sim, "sh-edge") == 1


def test_router_decides_every_cpn_request() -> None:
    # The simulator shares the hub's router: every cpn decision is a Router.route call.
    lay, rtt = two_site_network()
    sim, t = inference_sim(lay, rtt)
    for k in range(30):
        sim.request(t + k, k % 2, 0, 0, 0.5)
    assert sim.router.decisions == 30


def two_pool_network(price_a: float, price_b: float, *, rate: float = 0.0):
    text = 'name = "two-pools"\n' + ACCELS + site("pa-hub", "pa", 30.0, 110.0, "hub", 16, price=price_a, rate=rate) \
        + site("pb-hub", "pb", 32.0, 112.0, "hub", 16, price=price_b, rate=rate) \
        + origin("pa", 30.0, 110.0) + origin("pb", 32.0, 112.0)
    return loader.loads(text)


def one_job(submitted_at: float, *, cards: int = 8, est_hours: float = 2.0, ckpt_s: float = 300.0, seed: int = 7):
    return core_workload.JobDraw("j1", "t0", "pa", cards, ("A800",), est_hours, 0, None, submitted_at, ckpt_s,
                                 core_workload.FaultClock(seed))


def test_one_job_goes_to_the_cheaper_pool_and_costs_what_a_hand_calculation_says() -> None:
    lay = two_pool_network(0.60, 0.30)
    start = core_scenario.start_epoch_s(core_scenario.DEFAULT_START)
    sim = core_training.TrainingSim("cpn", core_training.cpn_planner, lay, lay.sites, [one_job(start)],
                                    start_s=start, tick_s=60.0, failure_scale=1.0, reserved_cards={})
    sim.advance(start + 10 * 3600)
    job = sim.jobs["j1"]
    assert job.done_at is not None and job.rec.pool == "pb-hub"
    # 8 cards x 0.4 kW x PUE 1.2 x 0.30 CNY/kWh over set-up (300 s) + 2 h of work (one segment, no checkpoint)
    hand = 8 * 0.4 * 1.2 * 0.30 * (300 + 7200) / 3600
    assert job.cost_cny == pytest.approx(hand, rel=1e-9)
    assert job.done_at - job.first_start == pytest.approx(7500.0)


def test_a_long_job_wastes_what_young_and_daly_predict() -> None:
    # M = 1 / (100 cards x 2e-4 per card-hour) = 50 h; C = 60 s; R = 120 s. Over ~2,000 failures the
    # measured waste (checkpoints + lost work + restarts, per useful second) is the first-order
    # W(T) = C/T + (T/2 + R)/M for the interval the scheduler chose, within a few percent.
    lay = loader.loads(lay_text_with_restart(120.0))
    start = core_scenario.start_epoch_s(core_scenario.DEFAULT_START)
    job = one_job(start, cards=100, est_hours=120_000.0, ckpt_s=60.0, seed=11)
    sim = core_training.TrainingSim("cpn", core_training.cpn_planner, lay, lay.sites[:1], [job],
                                    start_s=start, tick_s=1.0, failure_scale=1.0, reserved_cards={})
    # The hub gives up after 50 infrastructure restarts (a crash loop); this job must not.
    rec = sim.jobs["j1"].rec
    sim.jobs["j1"].rec = msgspec.structs.replace(rec, max_infra_restarts=10**6)
    end = start + 110_000 * 3600.0
    sim.advance(end)
    sim.close(end)
    w = sim.waste
    measured = (w.checkpoint + w.lost + w.setup_restart) / w.useful
    expected = w.expected_w_x_useful / w.useful
    assert sim.card_failures > 1500
    mtbf_s = 50 * 3600.0
    t_daly = checkpointing.daly_interval_s(60.0, mtbf_s)
    assert expected == pytest.approx(checkpointing.expected_waste(t_daly, 60.0, 120.0, mtbf_s), rel=1e-6)
    assert measured == pytest.approx(expected, rel=0.05)
    assert checkpointing.min_waste(60.0, 120.0, mtbf_s) <= expected


def lay_text_with_restart(restart_s: float) -> str:
    return 'name = "one-pool"\n' + ACCELS + site("pa-hub", "pa", 30.0, 110.0, "hub", 128, rate=2e-4, restart_s=restart_s) \
        + site("pb-hub", "pb", 32.0, 112.0, "hub", 16) + origin("pa", 30.0, 110.0) + origin("pb", 32.0, 112.0)


def test_same_failure_draws_for_every_policy() -> None:
    a, b = core_workload.FaultClock(5), core_workload.FaultClock(5)
    assert [a.variate(k) for k in range(5)] == [b.variate(k) for k in (0, 1, 2, 3, 4)]
    clock = core_workload.FaultClock(9)
    mean = sum(clock.variate(k) for k in range(20000)) / 20000
    assert mean == pytest.approx(1.0, rel=0.03)


def test_oracle_is_the_cheapest_pool_energy() -> None:
    lay = two_pool_network(0.60, 0.30)
    pools = [placement.pool_from_site(s, lay.accelerators) for s in lay.sites]
    start = core_scenario.start_epoch_s(core_scenario.DEFAULT_START)
    got = core_training.oracle_energy([one_job(start)], pools)
    assert got["j1"] == pytest.approx(8 * 0.4 * 1.2 * 0.30 * 2.0)
    assert math.isfinite(got["j1"])


class _EarlyFailure(core_workload.FaultClock):
    """Every attempt's failure comes after 0.01 of the gang's MTBF (drawn, so known to the sim)."""

    def variate(self, k: int) -> float:
        return 0.01


def test_the_planner_sees_when_the_hub_expects_an_attempt_to_end_never_its_drawn_failure() -> None:
    # The hub tells the scheduler an attempt's expected end (start + placement's run_s); the
    # simulator draws each failure ahead of time, and must not hand that time to the planner (it
    # would reserve cards for the next gang exactly when a failure frees them).
    lay = loader.loads(lay_text_with_restart(120.0))
    start = core_scenario.start_epoch_s(core_scenario.DEFAULT_START)
    first = core_workload.JobDraw("j1", "t0", "pa", 100, ("A800",), 10.0, 0, None, start, 60.0, _EarlyFailure(1))
    second = core_workload.JobDraw("j2", "t0", "pa", 100, ("A800",), 1.0, 0, None, start + 600.0, 60.0,
                                   core_workload.FaultClock(2))
    seen: list[dict[str, float | None]] = []

    def planner(snap, now):  # type: ignore[no-untyped-def]
        seen.append({r.job_id: r.expected_end_at for r in snap.running})
        return core_training.cpn_planner(snap, now)

    sim = core_training.TrainingSim("cpn", planner, lay, lay.sites[:1], [first, second],
                                    start_s=start, tick_s=60.0, failure_scale=1.0, reserved_cards={})
    sim.advance(start + 900.0)
    att = sim.jobs["j1"].att
    assert att is not None and att.failing  # it fails at 0.01 x 50 h = 30 min, after the second tick
    assert att.end == pytest.approx(start + 0.01 * 50 * 3600.0)
    (expected,) = [s["j1"] for s in seen if "j1" in s]
    mtbf_s = 50 * 3600.0
    work_s = 10.0 * 3600.0
    waste = checkpointing.goodput_waste(att.interval_s, 60.0, 120.0, mtbf_s)
    assert expected == pytest.approx(start + work_s * (1.0 + waste))
    assert expected != pytest.approx(att.end)
