"""cpn sim's tidal lending runs core/lending.py's rule: a gang on lent cards at night, stopped with its
checkpoint before the forecast ramp, then no lending by day (known answers on a two-pool network)."""

from __future__ import annotations

import heapq

import pytest

from controlplane.core import lifecycle
from controlplane.tools.sim import core_lending, core_scenario, core_training, core_workload
from topology import loader

from tests.unit.test_sim_known import ACCELS, origin, site

H = 3600.0


def network():
    text = 'name = "lend"\n' + ACCELS + site("pa-hub", "pa", 30.0, 110.0, "hub", 4) \
        + site("pa-edge", "pa", 30.0, 110.1, "edge", 8) + origin("pa", 30.0, 110.0)
    return loader.loads(text)


def job(jid: str, at: float) -> core_workload.JobDraw:
    return core_workload.JobDraw(jid, "t0", "pa", 4, ("A800",), 10.0, 0, None, at, 300.0, core_workload.FaultClock(3))


def run(hours: float, held: dict[tuple[str, str], float]):
    lay = network()
    s = core_scenario.decode('name = "l"\n[lending]\nenabled = true\n', "l")
    start = core_scenario.start_epoch_s(s.start)  # 00:00 local
    sim = core_training.TrainingSim("cpn", core_training.cpn_planner, lay, lay.sites, [job("j1", start), job("j2", start)],
                                    start_s=start, tick_s=60.0, failure_scale=0.0, reserved_cards={}, lent=["pa-edge"])
    lender = core_lending.Lender(s, [lay.site("pa-edge")], [sim], lambda: held)
    wakes = [start + k * s.lending.tick_s for k in range(int(hours * H / s.lending.tick_s) + 1)]
    heapq.heapify(wakes)
    starts: dict[str, list[tuple[str, float]]] = {"j1": [], "j2": []}
    while wakes:
        t = heapq.heappop(wakes)
        sim.advance(t)
        nxt = lender.tick(t)
        if nxt is not None and nxt > t:
            heapq.heappush(wakes, nxt)
        sim.advance(t)
        for jid, j in sim.jobs.items():
            if j.att is not None and (not starts[jid] or starts[jid][-1][1] != j.att.start):
                starts[jid].append((j.att.pool, j.att.start))
    return sim, lender, start, starts


def test_a_gang_runs_on_lent_cards_at_night_and_is_stopped_with_its_checkpoint_before_the_ramp() -> None:
    sim, lender, start, starts = run(12.0, {})
    # The profile's peak needs all 8 edge cards; at 00:00 (0.35 of 1.2) 2.3, so 5 can be lent: one 4-card gang.
    on_edge = [jid for jid, st in starts.items() if st and st[0][0] == "pa-edge"]
    assert len(on_edge) == 1 and starts[on_edge[0]][0][1] == pytest.approx(start, abs=60.0)
    job = sim.jobs[on_edge[0]]
    # Lent 4 of 8: inference keeps 4, needed from 08:00 (0.8 of 1.2 x 8 = 5.3 cards): reclaimed at 07:45;
    # the stop leaves the checkpoint (300 s) and a minute before that.
    assert lender.reclaimed["cpn"] == 1 and sim.stops == 1
    stopped_at = start + 7.75 * H - 300.0 - 60.0
    lent_s = sim.lent_card_s / 4
    assert lent_s == pytest.approx(stopped_at - starts[on_edge[0]][0][1], abs=1.0)
    assert job.rec.progress > 0.6  # what it computed is checkpointed, not lost
    # By day the forecast needs most edge cards; the job resumes from its
    # checkpoint on the hub once the other job is done there (10 h + 300 s set-up).
    assert [pool for pool, _ in starts[on_edge[0]]] == ["pa-edge", "pa-hub"]
    assert starts[on_edge[0]][1][1] == pytest.approx(start + 10 * H + 300.0, abs=120.0)
    assert job.rec.attempt == 2 and job.rec.state is not lifecycle.JobState.FAILED
    # At 12:00 (0.9 of 1.2: 6 cards) only 2 cards last the hour, until 19:00 needs 7: too few for the gang.
    assert sim.offered.get("pa-edge", {}) == {"A800": 2}


def test_cards_replicas_hold_are_never_lent_and_their_growth_is_forecast() -> None:
    # A replica holds 3 edge cards at midnight: grown along the profile (x1.5 headroom) it may need
    # 4.5 within the hour, so inference keeps 5 and only 3 are offered: too few for the 4-card gang.
    sim, lender, _, starts = run(3.0, {("pa-edge", "A800"): 3.0})
    assert sim.offered["pa-edge"] == {"A800": 3}
    assert all(pool != "pa-edge" for st in starts.values() for pool, _ in st)
    assert sim.lent_card_s == 0.0


@pytest.mark.parametrize("forecast, ramp_h", [("declared", 8.0), ("learnt", 7.0)])
def test_the_forecast_is_learnt_from_the_demand_seen_on_past_days(forecast: str, ramp_h: float) -> None:
    """Demand comes an hour earlier than the declared profile says. Learnt from two days of it, the
    gang lent at midnight on day 3 is stopped before the ramp that happens, an hour earlier than the
    declared profile would stop it."""
    lay = network()
    s = core_scenario.decode(f'name = "l"\n[lending]\nenabled = true\nforecast = "{forecast}"\n', "l")
    start = core_scenario.start_epoch_s(s.start)  # 00:00 local
    actual = s.inference.profile[1:] + s.inference.profile[:1]  # every hour's demand an hour early
    day3 = start + 48 * H
    sim = core_training.TrainingSim("cpn", core_training.cpn_planner, lay, lay.sites, [job("j1", day3), job("j2", day3)],
                                    start_s=start, tick_s=60.0, failure_scale=0.0, reserved_cards={}, lent=["pa-edge"])
    now = [start]
    last = [start]

    def demand() -> dict[str, float]:  # requests of region r since the last call, 1,000 an hour at the peak
        t0, last[0] = last[0], now[0]
        return {"r": 1000.0 * actual[int(((t0 + 8 * H) // H) % 24)] * (now[0] - t0) / H} if now[0] > t0 else {}

    lender = core_lending.Lender(s, [lay.site("pa-edge")], [sim], lambda: {}, demand)
    wakes = [start + k * s.lending.tick_s for k in range(int(60 * H / s.lending.tick_s) + 1)]
    heapq.heapify(wakes)
    edge_starts = []
    while wakes:
        t = heapq.heappop(wakes)
        now[0] = t
        sim.advance(t)
        nxt = lender.tick(t)
        if nxt is not None and nxt > t:
            heapq.heappush(wakes, nxt)
        sim.advance(t)
        for j in sim.jobs.values():
            if j.att is not None and j.att.pool == "pa-edge" and j.att.start not in edge_starts:
                edge_starts.append(j.att.start)
    assert edge_starts and edge_starts[0] == pytest.approx(day3, abs=60.0)
    # Lent 4 of 8, inference keeps 4: the ramp is the first hour needing more than half the peak's cards.
    assert sim.lent_card_s / 4 == pytest.approx(ramp_h * H - 900.0 - 300.0 - 60.0, abs=61.0)
    assert lender.reclaimed["cpn"] >= 1
    assert lender.report({})["forecast"] == forecast


def test_a_gang_only_lent_cards_fit_waits_through_the_day_and_runs_at_night() -> None:
    """Submitted at 20:00, when the edge offers nothing and a replica holds half its cards, a 5-card
    gang (the hub has 4) waits, as it would live (lent pools show no free cards), and runs on lent
    cards once offered after midnight; it is not found infeasible for good (the simulator used to
    mark a lent site without an offer draining, a static filter, and to shrink its total by the
    cards replicas held: either dropped such gangs submitted by day)."""
    lay = network()
    s = core_scenario.decode('name = "l"\n[lending]\nenabled = true\nforecast = "declared"\n', "l")
    start = core_scenario.start_epoch_s(s.start)  # 00:00 local
    gang = core_workload.JobDraw("j1", "t0", "pa", 5, ("A800",), 2.0, 0, None, start + 20 * H, 300.0,
                                 core_workload.FaultClock(3))
    sim = core_training.TrainingSim("cpn", core_training.cpn_planner, lay, lay.sites, [gang],
                                    start_s=start, tick_s=60.0, failure_scale=0.0, reserved_cards={}, lent=["pa-edge"])
    lender = core_lending.Lender(s, [lay.site("pa-edge")], [sim], lambda: {})
    t, at_22 = start, None
    while t <= start + 30 * H:
        sim.advance(t)
        if t == start + 20 * H:  # a replica holds 4 of the edge's 8 cards for the evening
            sim.hold("pa-edge", "A800", 4)
        if t == start + 23 * H:
            sim.release("pa-edge", "A800", 4)
        lender.tick(t)
        sim.advance(t)
        if t == start + 22 * H:
            at_22 = sim.idle_while_waiting()
        t += s.lending.tick_s
    job = sim.jobs["j1"]
    assert not job.infeasible
    assert job.first_start == pytest.approx(start + 24 * H, abs=120.0)
    assert job.done_at is not None and sim.lent_card_s > 0
    # At 22:00 it waits, and no card is idle for it: the edge's free cards are not offered.
    assert at_22 == (0, 5)


def test_the_tidal_scenario_is_national_days_training_plus_small_fine_tuning_jobs_that_fit_an_edge() -> None:
    """``training.accelerators[].sizes``: the L20 fine-tuning jobs draw their own (small) sizes; every
    one fits some edge site's L20 cards, and the other jobs keep national-day's sizes and mix."""
    import random

    from controlplane.tools.sim import runner

    lay = loader.load_default()
    s, day = runner.load_scenario("tidal-lending"), runner.load_scenario("national-day")
    start = core_scenario.start_epoch_s(s.start)
    draws = core_workload.jobs(s, lay, start, start + 24 * H, random.Random("0:jobs"), random.Random("0:faults"))
    l20 = [d for d in draws if d.accelerators == ("L20",)]
    edge_l20 = max(site.accelerators.get("L20", 0) for site in lay.sites if site.tier == "edge")
    assert 0.15 * len(draws) < len(l20) < 0.25 * len(draws)
    assert all(d.cards <= edge_l20 for d in l20) and max(d.cards for d in l20) > 8
    others = [d for d in draws if d.accelerators != ("L20",)]
    assert abs(len(others) - day.training.jobs) < 3 * day.training.jobs ** 0.5  # national-day's 2,200, ± 3 sigma
    assert max(d.cards for d in others) > 1024  # national-day's largest gangs
    assert s.training.sizes == day.training.sizes
