"""The training queue, as plain data in and plain data out: builders with defaults, projections,
asserts on dicts (the shape of ray's autoscaler v2 scheduler tests)."""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.core import placement as pl
from controlplane.core import scheduler as sc
from topology import layout

NOW = datetime(2026, 1, 1, 10, tzinfo=timezone(timedelta(hours=8))).timestamp()  # 10:00 local, peak
H = 3600.0


def tariff(flat: float, peak: float | None = None, valley: float | None = None) -> layout.Tariff:
    return layout.Tariff(flat_cny_per_kwh=flat, peak_cny_per_kwh=peak if peak is not None else flat,
                         valley_cny_per_kwh=valley if valley is not None else flat,
                         peak_hours=[8, 9, 10, 11, 18, 19, 20], valley_hours=[0, 1, 2, 3, 4, 5, 6, 7])


def pool(id: str = "p1", cards: int = 64, free: int | None = None, price: float = 0.5, acc: str = "A800",
         **kw: object) -> pl.Pool:
    base: dict[str, object] = {
        "id": id, "region": "ningxia", "provider": "op", "cards_total": {acc: cards},
        "cards_free": {acc: cards if free is None else free}, "kw_per_card": {acc: 0.4},
        "units": {acc: 1.0}, "tariff": tariff(price), "pue": 1.2, "failure_rate_per_card_hour": 1e-5,
    }
    base.update(kw)
    return pl.Pool(**base)  # type: ignore[arg-type]


def job(id: str, cards: int = 8, tenant: str = "acme", **kw: object) -> pl.JobSpec:
    base: dict[str, object] = {"id": id, "tenant": tenant, "cards": cards, "accelerators": ("A800",),
                               "est_hours": 4.0}
    base.update(kw)
    return pl.JobSpec(**base)  # type: ignore[arg-type]


def running(id: str, pool: str = "p1", cards: int = 8, tenant: str = "other", **kw: object) -> sc.Running:
    base: dict[str, object] = {"job_id": id, "tenant": tenant, "pool": pool, "accelerator": "A800", "cards": cards}
    base.update(kw)
    return sc.Running(**base)  # type: ignore[arg-type]


def plan(pools: list[pl.Pool], queued: list[pl.JobSpec], now: float = NOW, **kw: object) -> sc.Plan:
    return sc.plan(sc.Snapshot(pools=pools, queued=queued, **kw), now)  # type: ignore[arg-type]


def starts(p: sc.Plan) -> dict[str, str]:
    return {s.job_id: s.pool for s in p.start}


def waits(p: sc.Plan) -> dict[str, str]:
    return {w.job_id: w.reason for w in p.wait}


# --------------------------------------------------------------------------- filters


def test_the_search_applies_placements_one_list_of_filters(monkeypatch: pytest.MonkeyPatch) -> None:
    """A filter added to placement.STATIC_FILTERS binds the scheduler too (there is no second copy)."""
    pools = [pool("cheap", price=0.3), pool("dear", price=0.9)]
    assert starts(plan(pools, [job("j1")])) == {"j1": "cheap"}
    banned = pl.StaticFilter("banned", lambda j, p, acc: "banned here" if p.id == "cheap" else None)
    monkeypatch.setattr(pl, "STATIC_FILTERS", (*pl.STATIC_FILTERS, banned))
    p = plan(pools, [job("j1"), job("j2", cards=64)])
    assert starts(p) == {"j1": "dear"}
    assert {"cheap": "banned here"} == {v.pool: v.reason for v in p.start[0].explanation.others if v.pool == "cheap"}


def test_verdicts_are_shared_between_jobs_only_when_their_filter_inputs_agree() -> None:
    pools = [pool("north", price=0.3, region="beijing"), pool("west", price=0.6, region="ningxia")]
    queued = [job("a"), job("b", regions=("ningxia",)), job("c"), job("d", regions=("ningxia",), tenant="t2")]
    assert starts(plan(pools, queued)) == {"a": "north", "b": "west", "c": "north", "d": "west"}


# --------------------------------------------------------------------------- cost


def test_cheapest_pool_wins_the_breakdown_adds_up_and_the_losers_are_explained() -> None:
    p = plan([pool("dear", price=0.9), pool("cheap", price=0.3), pool("mid", price=0.5),
              pool("busy", price=0.1, free=4)], [job("j1")])
    (s,) = p.start
    bd = s.breakdown
    assert (s.pool, s.accelerator, s.cards, s.start_at) == ("cheap", "A800", 8, NOW)
    assert bd.total_cny == pytest.approx(bd.energy_cny + bd.failure_waste_cny + bd.move_cny)
    assert bd.energy_cny == pytest.approx(8 * 0.4 * 1.2 * 0.3 * 4)
    others = {v.pool: v.reason for v in s.explanation.others}
    # "mid" and "dear" were never fully scored: their lower bound already lost
    mid_lb = 8 * 0.4 * 1.2 * 0.5 * 4
    assert others["mid"] == f"costs at least {mid_lb - bd.total_cny:.2f} CNY more (lower bound)"
    assert others["dear"].startswith("costs at least")
    assert others["busy"] == "4 free A800 cards, job needs 8"
    assert "cheap/A800" in s.explanation.chosen and "energy" in s.explanation.chosen


def test_a_job_accepting_two_accelerators_gets_the_cheaper_one() -> None:
    npu = pool("npu", acc="910B", price=0.5, units={"910B": 0.8}, kw_per_card={"910B": 0.3})
    gpu = pool("gpu", price=0.5)
    s, = plan([gpu, npu], [job("j1", accelerators=("A800", "910B"))]).start
    # 910B: 0.3 kW for 1/0.8 of the time = 0.375 kW-equivalent < 0.4
    assert (s.pool, s.accelerator) == ("npu", "910B")


def test_a_restart_stays_with_its_checkpoint_when_pools_are_otherwise_equal() -> None:
    restart = job("j1", cards=32, progress=0.5, checkpoint_pool="p2")
    assert starts(plan([pool("p1"), pool("p2"), pool("p3")], [restart])) == {"j1": "p2"}


def test_tariff_waiting_only_when_the_deadline_allows() -> None:
    tou = pool("tou", tariff=tariff(0.7, peak=1.2, valley=0.3))
    p = plan([tou], [job("patient", deadline=NOW + 40 * H, prefer="cost"),
                     job("urgent", deadline=NOW + 5 * H, prefer="cost"), job("plain"),
                     job("default", deadline=NOW + 40 * H)])  # not cost-first: never waits for a tariff
    (w,) = p.wait
    assert w.job_id == "patient" and w.pool == "tou"
    assert w.until == NOW + 14 * H  # midnight local, start of the valley
    assert set(starts(p)) == {"urgent", "plain", "default"}
    assert all(s.start_at == NOW for s in p.start)


def test_max_price_makes_a_job_wait_with_the_reason() -> None:
    p = plan([pool("p1", price=0.9)], [job("j1", max_price_cny=1.0)])
    assert "over max_price 1.00" in waits(p)["j1"]


# --------------------------------------------------------------------------- order, quotas, fair share


def test_higher_priority_goes_first_whatever_the_submit_time() -> None:
    p = plan([pool(cards=8)], [job("old", submitted_at=0.0), job("vip", priority=5, submitted_at=100.0)])
    assert starts(p) == {"vip": "p1"}


def test_a_job_over_its_tenant_quota_waits_saying_so() -> None:
    tenants = {"acme": sc.Tenant(id="acme", quota_cards=24)}
    p = plan([pool()], [job(f"j{i}", submitted_at=i) for i in range(4)],
             tenants=tenants, running=[running("r", tenant="acme", cards=8)])
    assert sorted(starts(p)) == ["j0", "j1"]
    assert waits(p)["j2"] == "quota: tenant acme holds 24 of 24 cards, job needs 8"
    assert "quota" in waits(p)["j3"]


def test_fair_share_interleaves_tenants_of_equal_priority() -> None:
    queued = [job(f"a{i}", tenant="a", submitted_at=i) for i in range(10)]
    queued += [job(f"b{i}", tenant="b", submitted_at=100 + i) for i in range(10)]
    got = Counter(j[0] for j in starts(plan([pool(cards=40)], queued)))
    assert got == {"a": 3, "b": 2}  # a first (earlier), then whoever holds fewer cards


def test_fair_share_follows_the_shares_and_counts_running_cards() -> None:
    queued = [job(f"a{i}", tenant="a", submitted_at=i) for i in range(10)]
    queued += [job(f"b{i}", tenant="b", submitted_at=100 + i) for i in range(10)]
    tenants = {"a": sc.Tenant(id="a", share=2.0), "b": sc.Tenant(id="b", share=1.0)}
    assert Counter(j[0] for j in starts(plan([pool(cards=48)], queued, tenants=tenants))) == {"a": 4, "b": 2}
    # a already holds 16 cards elsewhere: b catches up first
    busy = [running("ra", pool="elsewhere", tenant="a", cards=16)]
    assert Counter(j[0] for j in starts(plan([pool(cards=32)], queued, running=busy))) == {"a": 1, "b": 3}


# --------------------------------------------------------------------------- backfill


def test_backfill_fills_the_hole_before_the_reservation_and_never_delays_the_head() -> None:
    p = plan(
        [pool("p1", cards=64, free=16)],
        [job("head", cards=64, submitted_at=0), job("long", cards=16, est_hours=10.0, submitted_at=1),
         job("short", cards=8, est_hours=1.0, submitted_at=2)],
        running=[running("r", cards=48, expected_end_at=NOW + 2 * H)],
    )
    assert p.reservation == sc.Reservation(job_id="head", pool="p1", accelerator="A800", cards=64, at=NOW + 2 * H)
    assert starts(p) == {"short": "p1"}
    assert "would delay head" in waits(p)["long"]
    assert "head of queue" in waits(p)["head"]


def test_backfill_may_use_cards_the_head_does_not_need() -> None:
    p = plan(
        [pool("p1", cards=64, free=16)],
        [job("head", cards=48, submitted_at=0), job("long", cards=16, est_hours=10.0, submitted_at=1)],
        running=[running("r", cards=48, expected_end_at=NOW + 2 * H)],
    )
    assert p.reservation is not None and p.reservation.at == NOW + 2 * H
    assert starts(p) == {"long": "p1"}  # 16 + 48 free at the reservation, head needs 48


def test_backfill_elsewhere_is_free_and_without_backfill_nothing_jumps_the_queue() -> None:
    pools = [pool("p1", cards=64, free=0), pool("p2", cards=8, price=0.9)]
    queued = [job("head", cards=64, submitted_at=0), job("small", cards=8, est_hours=50.0, submitted_at=1)]
    run = [running("r", cards=64, expected_end_at=NOW + H)]
    assert starts(plan(pools, queued, running=run)) == {"small": "p2"}
    off = plan(pools, queued, running=run, policy=sc.Policy(backfill=False))
    assert starts(off) == {"small": "p2"} and off.reservation is None


def test_the_head_reserves_where_its_wait_holds_the_fewest_cards_idle() -> None:
    """Pool a has 100 of the head's 128 cards free now and the rest in an hour; pool b has none free
    and all 128 in 75 minutes. Reserving at a (EASY's earliest) would hold a's 100 free cards idle
    for the hour, since the 100-card job behind would delay the head there; reserving at b holds
    none, and that job starts at a now."""
    pools = [pool("a", cards=128, free=100), pool("b", cards=128, free=0)]
    run = [running("ra", pool="a", cards=28, expected_end_at=NOW + H),
           running("rb", pool="b", cards=128, expected_end_at=NOW + 1.25 * H)]
    queued = [job("head", cards=128, submitted_at=0), job("next", cards=100, submitted_at=1)]
    p = plan(pools, queued, running=run)
    assert p.reservation == sc.Reservation(job_id="head", pool="b", accelerator="A800", cards=128, at=NOW + 1.25 * H)
    assert starts(p) == {"next": "a"}
    easy = plan(pools, queued, running=run, policy=sc.Policy(reserve_within_s=0.0))
    assert easy.reservation is not None and (easy.reservation.pool, easy.reservation.at) == ("a", NOW + H)
    assert starts(easy) == {} and "would delay head" in waits(easy)["next"]
    # Beyond reserve_within_s of the earliest, the earliest it is.
    later = [run[0], running("rb", pool="b", cards=128, expected_end_at=NOW + 2 * H)]
    p = plan(pools, queued, running=later)
    assert p.reservation is not None and (p.reservation.pool, p.reservation.at) == ("a", NOW + H)


# --------------------------------------------------------------------------- preemption


def test_preemption_stops_the_lowest_priority_job() -> None:
    pools = [pool("pa", free=0), pool("pb", free=0)]
    run = [running("mid", pool="pa", cards=64, priority=1), running("low", pool="pb", cards=64, priority=0)]
    p = plan(pools, [job("vip", cards=64, priority=5)], running=run)
    assert [(s.job_id, s.pool, s.for_job) for s in p.stop] == [("low", "pb", "vip")]
    assert p.reservation is not None and (p.reservation.pool, p.reservation.at) == ("pb", NOW)
    assert "preempting 1" in waits(p)["vip"]


def test_preemption_prefers_stopping_fewer_jobs_at_the_same_priority() -> None:
    pools = [pool("pa", free=0), pool("pb", free=0)]
    run = [running("a1", pool="pa", cards=32), running("a2", pool="pa", cards=32),
           running("b1", pool="pb", cards=64)]
    p = plan(pools, [job("vip", cards=64, priority=5)], running=run)
    assert [s.job_id for s in p.stop] == ["b1"]


def test_no_preemption_of_equal_priority_or_when_cards_free_up_soon() -> None:
    run = [running("peer", cards=64, priority=5)]
    p = plan([pool(free=0)], [job("vip", cards=64, priority=5)], running=run)
    assert p.stop == [] and "no running job has a known end" in waits(p)["vip"]
    soon = [running("low", cards=64, priority=0, expected_end_at=NOW + 300)]
    p = plan([pool(free=0)], [job("vip", cards=64, priority=5)], running=soon)
    assert p.stop == [] and p.reservation is not None and p.reservation.at == NOW + 300


def test_jobs_already_stopping_count_as_freeing_their_cards() -> None:
    run = [running("low", cards=64, priority=0, stopping=True), running("low2", pool="p2", cards=64)]
    p = plan([pool(free=0), pool("p2", free=0)], [job("vip", cards=64, priority=5)], running=run)
    assert p.stop == []
    assert p.reservation is not None and (p.reservation.pool, p.reservation.at) == ("p1", NOW)


# --------------------------------------------------------------------------- infeasible


def test_a_job_no_pool_could_ever_run_is_infeasible_with_reasons() -> None:
    pools = [pool("p1"), pool("p2", draining=True), pool("p3", acc="910B")]
    p = plan(pools, [job("secret", tee=True), job("huge", cards=1000), job("npu", accelerators=("MLU590",)),
                     job("bad", cards=0)])
    got = {i.job_id: i.reasons for i in p.infeasible}
    assert got["secret"] == ["1 pool(s): draining", "1 pool(s): no TEE"]
    assert got["huge"] == ["2 pool(s): 64 A800 cards in all, job needs 1000 in one pool"]
    assert got["npu"] == ["no pool has MLU590 cards"]
    assert got["bad"] == ["cards must be >= 1, got 0"]
    assert p.start == [] and p.wait == []


def test_the_plan_is_deterministic() -> None:
    pools = [pool(f"p{i}", price=0.3 + 0.1 * (i % 3), free=16 + 8 * i) for i in range(6)]
    queued = [job(f"j{i}", cards=8 * (1 + i % 4), tenant=f"t{i % 3}", priority=i % 2, submitted_at=i)
              for i in range(30)]
    a, b = plan(pools, queued), plan(pools, list(reversed(queued)))
    assert msgspec.json.encode(a) == msgspec.json.encode(b)


# --------------------------------------------------------------------------- properties


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[pl.Pool], list[pl.JobSpec], list[sc.Running], dict[str, sc.Tenant]]:
    n_pools = draw(st.integers(1, 5))
    pools = []
    for i in range(n_pools):
        accs = draw(st.lists(st.sampled_from(["A800", "910B"]), min_size=1, max_size=2, unique=True))
        total = {a: draw(st.sampled_from([8, 16, 32, 64])) for a in accs}
        pools.append(pl.Pool(
            id=f"p{i}", region=draw(st.sampled_from(["r1", "r2"])), tee=draw(st.booleans()),
            draining=draw(st.booleans()) and draw(st.booleans()), cards_total=total,
            cards_free={a: draw(st.integers(0, n)) for a, n in total.items()},
            kw_per_card={a: 0.4 for a in accs}, units={a: 1.0 if a == "A800" else 0.8 for a in accs},
            tariff=tariff(draw(st.sampled_from([0.3, 0.5, 0.9])), peak=1.2, valley=0.2),
            pue=1.2, failure_rate_per_card_hour=draw(st.sampled_from([0.0, 1e-4, 1e-3])),
        ))
    run = []
    for i in range(draw(st.integers(0, 8))):
        p = draw(st.sampled_from(pools))
        acc = draw(st.sampled_from(sorted(p.cards_total)))
        run.append(sc.Running(
            job_id=f"r{i}", tenant=draw(st.sampled_from(["a", "b", "c"])), pool=p.id, accelerator=acc,
            cards=draw(st.sampled_from([4, 8, 16])), priority=draw(st.integers(0, 3)),
            expected_end_at=draw(st.one_of(st.none(), st.floats(NOW, NOW + 48 * H))),
            stopping=draw(st.booleans()) and draw(st.booleans()),
        ))
    queued = []
    for i in range(draw(st.integers(1, 25))):
        queued.append(pl.JobSpec(
            id=f"j{i}", tenant=draw(st.sampled_from(["a", "b", "c"])), cards=draw(st.sampled_from([1, 4, 8, 16, 32, 64])),
            accelerators=tuple(draw(st.lists(st.sampled_from(["A800", "910B"]), min_size=1, max_size=2, unique=True))),
            est_hours=draw(st.sampled_from([0.5, 2.0, 10.0, 100.0])), priority=draw(st.integers(0, 3)),
            deadline=draw(st.one_of(st.none(), st.floats(NOW + H, NOW + 200 * H))),
            regions=draw(st.sampled_from([(), ("r1",)])), tee=draw(st.booleans()) and draw(st.booleans()),
            submitted_at=float(i), max_price_cny=draw(st.one_of(st.none(), st.floats(1.0, 500.0))),
            prefer=draw(st.sampled_from([None, "time", "cost"])),
        ))
    tenants = {t: sc.Tenant(id=t, quota_cards=draw(st.one_of(st.none(), st.integers(0, 128))),
                            share=draw(st.sampled_from([0.5, 1.0, 2.0]))) for t in ("a", "b", "c")}
    return pools, queued, run, tenants


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_plans_never_over_commit_and_decide_every_job_once(scn) -> None:  # type: ignore[no-untyped-def]
    pools, queued, run, tenants = scn
    p = sc.plan(sc.Snapshot(pools=pools, queued=queued, running=run, tenants=tenants), NOW)
    placed: dict[tuple[str, str], int] = defaultdict(int)
    for s in p.start:
        placed[(s.pool, s.accelerator)] += s.cards
        assert s.breakdown.total_cny == pytest.approx(
            s.breakdown.energy_cny + s.breakdown.failure_waste_cny + s.breakdown.move_cny)
    free = {(q.id, a): n for q in pools for a, n in q.cards_free.items()}
    for key, cards in placed.items():
        assert cards <= free[key], f"{key} over-committed: {cards} > {free[key]}"
    decided = [s.job_id for s in p.start] + [w.job_id for w in p.wait] + [i.job_id for i in p.infeasible]
    assert sorted(decided) == sorted(j.id for j in queued)
    # quotas hold
    use: dict[str, int] = defaultdict(int)
    for r in run:
        use[r.tenant] += r.cards
    for s in p.start:
        use[s.tenant] += s.cards
        quota = tenants[s.tenant].quota_cards
        assert quota is None or use[s.tenant] <= quota


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_backfill_never_delays_the_head_and_preemption_only_stops_lower_priority(scn) -> None:  # type: ignore[no-untyped-def]
    pools, queued, run, tenants = scn
    p = sc.plan(sc.Snapshot(pools=pools, queued=queued, running=run, tenants=tenants), NOW)
    prio = {j.id: j.priority for j in queued}
    stopped = {s.job_id for s in p.stop}
    for s in p.stop:
        victim = next(r for r in run if r.job_id == s.job_id)
        assert victim.priority < prio[s.for_job] and not victim.stopping and victim.pool == s.pool
    res = p.reservation
    if res is None:
        return
    pool_free = next(q for q in pools if q.id == res.pool).cards_free[res.accelerator]
    # cards free at the reservation time: free now, plus running jobs that end (or stop) by then,
    # minus placements on that pool still running then
    at_res = pool_free
    for r in run:
        if r.pool == res.pool and r.accelerator == res.accelerator:
            end = NOW if (r.stopping or r.job_id in stopped) else r.expected_end_at
            if end is not None and end <= res.at:
                at_res += r.cards
    for s in p.start:
        if s.pool == res.pool and s.accelerator == res.accelerator and s.start_at + s.breakdown.run_s > res.at:
            at_res -= s.cards
    assert at_res >= res.cards


def test_a_job_restarting_after_a_failure_keeps_its_place_in_its_priority_level() -> None:
    queued = [job("new", tenant="a", submitted_at=0.0),
              job("back", tenant="b", submitted_at=50.0, restarting=True, progress=0.4, checkpoint_pool="gone"),
              job("vip", tenant="c", priority=3, submitted_at=90.0)]
    busy = [running("rb", pool="elsewhere", tenant="b", cards=64)]  # fair share alone would put b last
    p = plan([pool(cards=16)], queued, running=busy)
    assert starts(p) == {"vip": "p1", "back": "p1"}
    assert "new" in waits(p)


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_the_fast_path_picks_what_the_reference_ranking_picks(scn) -> None:  # type: ignore[no-untyped-def]
    pools, queued, _, _ = scn
    one = queued[0]
    p = sc.plan(sc.Snapshot(pools=pools, queued=[one]), NOW)
    scored, _ = pl.rank(one, pools, NOW)
    if not scored:
        assert p.start == [] and (p.wait or p.infeasible)
        return
    best = scored[0]
    if best.start_at > NOW:
        if p.wait:
            (w,) = p.wait
            assert w.until == best.start_at
        else:  # a cost-first job: waiting did not beat starting now elsewhere by the threshold
            (s,) = p.start
            assert one.prefer == "cost" and s.start_at == NOW and (s.pool, s.accelerator) != (best.pool, best.accelerator)
            assert s.breakdown.total_cny - best.total_cny < pl.DEFAULT_MODEL.min_wait_saving * s.breakdown.total_cny
        return
    (s,) = p.start
    assert (s.breakdown.meets_deadline, s.breakdown.total_cny) == pytest.approx((best.meets_deadline, best.total_cny))


def test_a_restart_waiting_for_a_window_says_why_it_waits() -> None:
    tou = pool("tou", tariff=tariff(0.7, peak=1.2, valley=0.3))
    (w,) = plan([tou], [job("back", deadline=NOW + 40 * H, progress=0.2, checkpoint_pool="gone", prefer="cost")]).wait
    assert w.reason.startswith("waits 14.0 h for a cheaper tariff window") and w.until == NOW + 14 * H


@settings(max_examples=100, deadline=None)
@given(scenarios(), st.integers(1, 7))
def test_a_plan_made_in_steps_is_the_plan_and_pauses_every_k_decisions(scn, every: int) -> None:  # type: ignore[no-untyped-def]
    pools, queued, run, tenants = scn
    whole = sc.plan(sc.Snapshot(pools=pools, queued=queued, running=run, tenants=tenants), NOW)
    steps = sc.plan_steps(sc.Snapshot(pools=pools, queued=queued, running=run, tenants=tenants), NOW, every=every)
    pauses = 0
    while True:
        try:
            next(steps)
            pauses += 1
        except StopIteration as done:
            stepped = done.value
            break
    assert msgspec.json.encode(stepped) == msgspec.json.encode(whole)
    assert pauses == len(queued) // every


# --------------------------------------------------------------------------- planning only new jobs


def decisions(p: sc.Plan) -> dict[str, object]:
    """Every job's decision, by id (start / wait / infeasible, as plain data)."""
    out: dict[str, object] = {}
    for kind, items in (("start", p.start), ("wait", p.wait), ("infeasible", p.infeasible)):
        for d in items:
            out[d.job_id] = (kind, msgspec.to_builtins(d))
    return out


@st.composite
def split_queues(draw: st.DrawFn) -> tuple[list[pl.Pool], list[pl.JobSpec], list[pl.JobSpec], list[sc.Running],
                                           dict[str, sc.Tenant]]:
    """A scenario whose pools are often full (so the full plan of the old queue often places
    nothing), its queue split into the jobs planned first and the jobs added later."""
    pools, queued, run, tenants = draw(scenarios())
    if draw(st.booleans()):
        pools = [msgspec.structs.replace(p, cards_free={a: 0 for a in p.cards_total}) for p in pools]
    k = draw(st.integers(0, len(queued)))
    old, new = queued[:k], queued[k:]
    if draw(st.booleans()):  # the new jobs come later, as submissions do
        new = [msgspec.structs.replace(j, submitted_at=j.submitted_at + 100.0) for j in new]
    return pools, old, new, run, tenants


@pytest.mark.timeout(600)  # 400 examples: CPU-bound, minutes on a loaded machine
@settings(max_examples=400, deadline=None)
@given(split_queues())
def test_planning_only_the_new_jobs_decides_as_the_full_plan_does(scn) -> None:  # type: ignore[no-untyped-def]
    """plan_more(basis of the old queue, new jobs) is either None or exactly the full plan's
    decisions for the new jobs, the full plan deciding the old jobs as the basis did."""
    pools, old, new, run, tenants = scn
    first, basis = _drain(sc.plan_basis_steps(sc.Snapshot(pools=pools, queued=old, running=run, tenants=tenants), NOW))
    if first.start or first.stop:
        assert basis is None
        return
    assert basis is not None
    more = sc.plan_more(basis, new, NOW)
    if more is None:
        return
    whole = sc.plan(sc.Snapshot(pools=pools, queued=old + new, running=run, tenants=tenants), NOW)
    assert not more.start and not more.stop and more.reservation is None
    assert whole.start == [] and whole.stop == []
    assert whole.reservation == basis.reservation == first.reservation
    assert decisions(whole) == {**decisions(first), **decisions(more)}
    assert sorted(decisions(more)) == sorted(j.id for j in new)


def _drain(steps):  # type: ignore[no-untyped-def]
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def test_a_new_job_behind_a_long_unchanged_queue_is_planned_alone() -> None:
    """1,000 jobs wait for a full pool; one more is decided without deciding the 1,000 again,
    as the full plan would decide it; a job that would start, or one of higher priority than the
    head, needs the full plan."""
    pools = [pool("p1", cards=64, free=0)]
    run = [running(f"r{i}", cards=8, expected_end_at=NOW + (i + 1) * H, preemptible=False) for i in range(8)]
    old = [job(f"j{i}", cards=8, submitted_at=float(i)) for i in range(1000)]
    first, basis = _drain(sc.plan_basis_steps(sc.Snapshot(pools=pools, queued=old, running=run), NOW))
    assert first.reservation is not None and first.reservation.job_id == "j0"
    assert basis is not None
    late = job("late", cards=8, submitted_at=2000.0)
    more = sc.plan_more(basis, [late], NOW + 1.0)
    assert more is not None and more.decisions == 1
    assert waits(more)["late"] == waits(sc.plan(sc.Snapshot(pools=pools, queued=[*old, late], running=run),
                                                 NOW + 1.0))["late"]
    assert sc.plan_more(basis, [late], NOW + 2.0) == sc.Plan()  # already decided: nothing to do
    urgent = job("urgent", cards=8, priority=5, submitted_at=2001.0)
    assert sc.plan_more(basis, [urgent], NOW + 2.0) is None  # it would be the head: only a full plan
    elsewhere = [pool("p1", cards=64, free=0), pool("p2", cards=8, free=8)]
    fits, fits_basis = _drain(sc.plan_basis_steps(sc.Snapshot(pools=elsewhere, queued=[job("big", cards=16)],
                                                              running=run), NOW))
    assert fits.start == [] and fits_basis is not None
    assert sc.plan_more(fits_basis, [job("small", cards=8, submitted_at=5.0)], NOW) is None  # it would start
    assert fits_basis.spent
