"""Placement of one job on one pool: filters with reasons, and the expected-cost score."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import msgspec
import pytest

from controlplane.core import checkpointing as ck
from controlplane.core import placement as pl
from topology import layout

CST = timezone(timedelta(hours=8))
MIDNIGHT = datetime(2026, 1, 1, tzinfo=CST).timestamp()  # 00:00 China local time
H = 3600.0

TOU = layout.Tariff(flat_cny_per_kwh=0.7, peak_cny_per_kwh=1.2, valley_cny_per_kwh=0.3,
                    peak_hours=[8, 9, 10, 11, 18, 19, 20], valley_hours=[0, 1, 2, 3, 4, 5, 6, 7],
                    source="illustrative")
FLAT = layout.Tariff(flat_cny_per_kwh=0.5, peak_cny_per_kwh=0.5, valley_cny_per_kwh=0.5, source="illustrative")


def pool(**kw: object) -> pl.Pool:
    base: dict[str, object] = {
        "id": "p1", "region": "ningxia", "provider": "op", "cards_total": {"A800": 64},
        "cards_free": {"A800": 64}, "kw_per_card": {"A800": 0.5}, "units": {"A800": 1.0},
        "tariff": FLAT, "pue": 1.0, "failure_rate_per_card_hour": 0.0, "restart_s": 300.0,
    }
    base.update(kw)
    return pl.Pool(**base)  # type: ignore[arg-type]


def job(**kw: object) -> pl.JobSpec:
    base: dict[str, object] = {"id": "j1", "tenant": "acme", "cards": 1, "accelerators": ("A800",),
                               "est_hours": 2.0, "checkpoint_cost_s": 300.0}
    base.update(kw)
    return pl.JobSpec(**base)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- energy


def test_energy_follows_the_time_of_use_schedule_hour_by_hour() -> None:
    # 06:30 -> 09:30 local: half an hour and an hour of valley (0.3), 1.5 h of peak (1.2)
    bd = pl.score(job(est_hours=3.0), pool(tariff=TOU), MIDNIGHT + 6.5 * H)
    assert bd.energy_cny == pytest.approx(0.5 * (0.5 * 0.3 + 1.0 * 0.3 + 1.5 * 1.2))
    assert bd.start_at == MIDNIGHT + 6.5 * H  # no deadline: never waits


def test_energy_scales_with_cards_pue_and_runs_across_days() -> None:
    p = pool(tariff=TOU, pue=1.25)
    one_day = sum(TOU.price_at_hour(h) for h in range(24))
    bd = pl.score(job(cards=16, est_hours=72.0), p, MIDNIGHT + 13 * H)
    assert bd.energy_cny == pytest.approx(16 * 0.5 * 1.25 * 3 * one_day)


def test_slower_cards_run_longer_for_the_same_work() -> None:
    p = pool(cards_total={"910B": 64}, cards_free={"910B": 64}, kw_per_card={"910B": 0.4}, units={"910B": 0.8})
    bd = pl.score(job(accelerators=("910B",), est_hours=8.0), p, MIDNIGHT)
    assert bd.work_s == pytest.approx(8.0 * H / 0.8)
    assert bd.energy_cny == pytest.approx(0.4 * 0.5 * 10.0)


def test_metered_energy_matches_the_score_for_the_same_window() -> None:
    p = pool(tariff=TOU)
    bd = pl.score(job(est_hours=5.0), p, MIDNIGHT + 5 * H)
    assert pl.metered_energy_cny(p, "A800", 1, MIDNIGHT + 5 * H, MIDNIGHT + 10 * H) == pytest.approx(bd.energy_cny)
    assert pl.metered_energy_cny(p, "A800", 1, MIDNIGHT, MIDNIGHT) == 0.0


# --------------------------------------------------------------------------- waiting for a cheaper window


def test_waits_for_the_valley_when_the_deadline_allows() -> None:
    now = MIDNIGHT + 10 * H  # peak
    bd = pl.score(job(deadline=now + 30 * H, prefer="cost"), pool(tariff=TOU), now)
    assert bd.start_at == MIDNIGHT + 24 * H  # next valley, 00:00 local
    assert bd.energy_cny == pytest.approx(0.5 * 2 * 0.3)
    assert any("waits 14.0 h" in n for n in bd.notes) and bd.meets_deadline


def test_waits_only_as_long_as_the_deadline_keeps_its_margin() -> None:
    now = MIDNIGHT + 10 * H
    # finish by 16:00: the latest start with a 20% margin is 13:36, so 12:00 (flat) is the best hour
    bd = pl.score(job(deadline=MIDNIGHT + 16 * H, prefer="cost"), pool(tariff=TOU), now)
    assert bd.start_at == MIDNIGHT + 12 * H
    assert bd.energy_cny == pytest.approx(0.5 * 2 * 0.7)


def test_never_waits_without_deadline_or_when_the_deadline_is_tight() -> None:
    now = MIDNIGHT + 10 * H
    assert pl.score(job(), pool(tariff=TOU), now).start_at == now
    # Not cost-first (the default, or time-first): a deadline with room to wait does not make it wait.
    assert pl.score(job(deadline=now + 30 * H), pool(tariff=TOU), now).start_at == now
    assert pl.score(job(deadline=now + 30 * H, prefer="time"), pool(tariff=TOU), now).start_at == now
    tight = pl.score(job(deadline=now + 2.2 * H, prefer="cost"), pool(tariff=TOU), now)
    assert tight.start_at == now and tight.meets_deadline
    late = pl.score(job(deadline=now + 1 * H, prefer="cost"), pool(tariff=TOU), now)
    assert late.start_at == now and not late.meets_deadline and "deadline at risk" in late.notes


def test_a_flat_tariff_never_makes_a_job_wait() -> None:
    now = MIDNIGHT + 10 * H
    assert pl.score(job(deadline=now + 48 * H, prefer="cost"), pool(tariff=FLAT), now).start_at == now


# --------------------------------------------------------------------------- failures and moves


def test_failure_waste_is_the_goodput_waste_of_the_run_and_grows_with_cards() -> None:
    p = pool(failure_rate_per_card_hour=2e-4, restart_s=600.0)
    small = pl.score(job(cards=8, est_hours=100.0), p, MIDNIGHT)
    big = pl.score(job(cards=64, est_hours=100.0), p, MIDNIGHT)
    m = ck.job_mtbf_s(2e-4, 64)
    t = ck.daly_interval_s(300.0, m)
    w = ck.goodput_waste(t, 300.0, 600.0, m)
    assert w > ck.expected_waste(t, 300.0, 600.0, m)  # the first-order model under-counts
    assert big.interval_s == pytest.approx(t) and big.mtbf_h == pytest.approx(m / H)
    assert big.failure_waste_cny == pytest.approx(w * big.energy_cny)
    assert big.run_s == pytest.approx(big.work_s * (1 + w))
    assert big.waste_fraction > small.waste_fraction > 0


# The goodput rule, known answers: a 4,096-card gang for 12 h, a flaky pool (3e-5 failures per card-hour,
# MTBF of the gang 8.1 h) against a reliable one (2e-5, 12.2 h) whose tariff is 2.9% dearer.
GANG = {"cards": 4096, "est_hours": 12.0, "accelerators": ("910B",)}
FLAKY = {"id": "flaky", "failure_rate_per_card_hour": 3e-5, "tariff": FLAT}
RELIABLE = {"id": "reliable", "failure_rate_per_card_hour": 2e-5,
            "tariff": layout.Tariff(flat_cny_per_kwh=0.5 * 1.029, peak_cny_per_kwh=0.5 * 1.029,
                                    valley_cny_per_kwh=0.5 * 1.029, source="illustrative")}


def big_pool(**kw: object) -> pl.Pool:
    return pool(cards_total={"910B": 8000}, cards_free={"910B": 8000}, kw_per_card={"910B": 0.4},
                units={"910B": 1.0}, pue=1.2, **kw)


def test_goodput_rule_puts_a_large_gang_on_the_pool_where_it_loses_least_to_failures() -> None:
    scored, _ = pl.rank(pl.JobSpec(id="g", tenant="t", **GANG), [big_pool(**FLAKY), big_pool(**RELIABLE)],  # type: ignore[arg-type]
                        MIDNIGHT)
    best, other = scored
    assert best.pool == "reliable" and other.pool == "flaky"
    # Known answer: Daly's complete model, W = M·e^(R/M)·(e^((T+C)/M) − 1)/T − 1, per pool.
    for bd, rate in ((best, 2e-5), (other, 3e-5)):
        m = 3600.0 / (rate * 4096)
        t = ck.daly_interval_s(300.0, m)
        assert bd.waste_fraction == pytest.approx(m * math.exp(300.0 / m) * math.expm1((t + 300.0) / m) / t - 1.0)
    assert best.waste_fraction == pytest.approx(0.1343, abs=1e-4) and other.waste_fraction == pytest.approx(0.1698, abs=1e-4)
    # The first-order waste (C/T + (T/2 + R)/M) would have sent it to the flaky pool: the rule binds here.
    first = {bd.pool: bd.energy_cny * (1 + ck.expected_waste(bd.interval_s, 300.0, 300.0, bd.mtbf_h * H))
             for bd in scored if bd.mtbf_h is not None}
    assert first["flaky"] < first["reliable"]


def test_goodput_rule_leaves_small_jobs_on_the_cheaper_pool() -> None:
    scored, _ = pl.rank(pl.JobSpec(id="s", tenant="t", cards=8, est_hours=12.0, accelerators=("910B",)),
                        [big_pool(**FLAKY), big_pool(**RELIABLE)], MIDNIGHT)  # type: ignore[arg-type]
    assert scored[0].pool == "flaky"  # an 8-card gang fails once in ~4,000 h either way: price decides


def test_a_given_checkpoint_interval_is_used_as_is() -> None:
    bd = pl.score(job(checkpoint_interval_s=1800.0), pool(failure_rate_per_card_hour=1e-3), MIDNIGHT)
    assert bd.interval_s == 1800.0


def test_moving_a_checkpoint_costs_only_away_from_the_pool_holding_it() -> None:
    restart = job(cards=32, est_hours=10.0, progress=0.5, checkpoint_pool="p1")
    home = pl.score(restart, pool(id="p1"), MIDNIGHT)
    away = pl.score(restart, pool(id="p2", egress_gbps=8.0), MIDNIGHT, source=pool(id="p1", egress_gbps=4.0))
    assert home.move_cny == 0.0 and home.work_s == pytest.approx(5.0 * H)
    size_gb = 32 * 16.0
    move_s = size_gb * 8 / 4.0  # the slower end limits the transfer
    assert away.move_cny == pytest.approx(size_gb * 0.05 + 32 * 0.5 * 0.5 * move_s / H)
    assert away.total_cny > home.total_cny


def test_breakdown_adds_up() -> None:
    bd = pl.score(job(cards=16, est_hours=30.0, progress=0.2, checkpoint_pool="x"),
                  pool(tariff=TOU, failure_rate_per_card_hour=1e-4), MIDNIGHT + 3 * H)
    assert bd.total_cny == pytest.approx(bd.energy_cny + bd.failure_waste_cny + bd.move_cny)
    assert min(bd.energy_cny, bd.failure_waste_cny, bd.move_cny) > 0


# --------------------------------------------------------------------------- filters


@pytest.mark.parametrize(
    ("job_kw", "pool_kw", "reason"),
    [
        ({"accelerators": ("910B",)}, {}, "no 910B cards"),
        ({"cards": 128}, {}, "64 A800 cards in all, job needs 128 in one pool"),
        ({}, {"healthy": False}, "unhealthy"),
        ({}, {"draining": True}, "draining"),
        ({"regions": ("guizhou",)}, {}, "region ningxia not allowed"),
        ({"providers": ("thirdparty",)}, {}, "provider op not allowed"),
        ({"tee": True}, {}, "no TEE"),
        ({"cards": 32}, {"cards_free": {"A800": 16}}, "16 free A800 cards, job needs 32"),
    ],
)
def test_each_filter_gives_its_reason(job_kw: dict[str, object], pool_kw: dict[str, object], reason: str) -> None:
    j, p = job(**job_kw), pool(**pool_kw)
    assert pl.filter_reason(j, p, j.accelerators[0]) == reason


def test_a_pool_passing_every_filter_has_no_reason() -> None:
    assert pl.filter_reason(job(tee=True, regions=("ningxia",)), pool(tee=True), "A800") is None


# Jobs and pools that differ in every way a filter looks at (and in ways it does not).
FILTER_JOBS = [job(**kw) for kw in (
    {}, {"cards": 128}, {"accelerators": ("910B",)}, {"regions": ("guizhou",)}, {"regions": ("ningxia", "x")},
    {"providers": ("thirdparty",)}, {"providers": ("op",)}, {"tee": True}, {"workload": "container"},
    {"workload": "process"},
)]
FILTER_POOLS = [pool(**kw) for kw in (
    {}, {"healthy": False}, {"draining": True}, {"region": "guizhou"}, {"provider": "thirdparty"},
    {"tee": True}, {"executors": frozenset({"sim"})}, {"executors": frozenset({"container", "process"})},
    {"cards_total": {"A800": 256}, "cards_free": {"A800": 256}}, {"cards_total": {"910B": 8, "A800": 64}},
)]
# Values of every JobSpec field a filter must NOT read (changing them never changes a verdict).
OTHER_FIELDS = {"id": "j9", "tenant": "other", "est_hours": 99.0, "checkpoint_cost_s": 1.0,
                "checkpoint_interval_s": 60.0, "priority": 7, "deadline": MIDNIGHT + 9 * H, "max_price_cny": 1.0,
                "submitted_at": 5.0, "progress": 0.5, "checkpoint_pool": "p9", "restarting": True, "prefer": "cost"}


def test_the_filters_read_of_the_job_only_its_filter_inputs() -> None:
    """The scheduler reuses a verdict for every job equal in FILTER_INPUTS: no filter may read more."""
    assert set(OTHER_FIELDS) | set(pl.FILTER_INPUTS) | {"accelerators"} == set(pl.JobSpec.__struct_fields__)
    for j in FILTER_JOBS:
        other = msgspec.structs.replace(j, **OTHER_FIELDS)
        for p in FILTER_POOLS:
            for acc in ("A800", "910B"):
                assert pl.static_reason(other, p, acc) == pl.static_reason(j, p, acc)


def test_the_search_checks_give_the_static_reason_on_pools_with_room() -> None:
    """What the scheduler runs (pool-only verdict first, then the job's search checks) says what
    static_reason says, on every pool with enough free cards; a pool key decides its filter alone."""
    for j in FILTER_JOBS:
        checks = pl.search_checks(j)
        for p in FILTER_POOLS:
            for acc in ("A800", "910B"):
                if p.cards_free.get(acc, 0) < j.cards:
                    continue
                reason = pl.pool_reason(p, acc) or next(
                    (r for r in (f.check(j, p, acc) for f in checks) if r is not None), None)
                assert reason == pl.static_reason(j, p, acc)
        for f in checks:
            if f.pool_key is None:
                continue
            for p in FILTER_POOLS:
                for q in FILTER_POOLS:
                    if f.pool_key(p) == f.pool_key(q):
                        assert f.check(j, p, "A800") == f.check(j, q, "A800"), f.name


def test_an_idle_filter_passes_every_pool() -> None:
    for f in pl.STATIC_FILTERS:
        for j in FILTER_JOBS:
            if f.idle is not None and f.idle(j):
                assert all(f.check(j, p, "A800") is None for p in FILTER_POOLS), f.name


def test_rank_puts_the_cheapest_pool_first_and_explains_the_rest() -> None:
    pools = [
        pool(id="cheap", tariff=layout.Tariff(flat_cny_per_kwh=0.3, peak_cny_per_kwh=0.3, valley_cny_per_kwh=0.3)),
        pool(id="dear", tariff=layout.Tariff(flat_cny_per_kwh=0.9, peak_cny_per_kwh=0.9, valley_cny_per_kwh=0.9)),
        pool(id="full", cards_free={"A800": 0}),
        pool(id="npu", cards_total={"910B": 8}, cards_free={"910B": 8}),
    ]
    scored, filtered = pl.rank(job(max_price_cny=0.6), pools, MIDNIGHT)
    assert [b.pool for b in scored] == ["cheap"]
    reasons = {v.pool: v.reason for v in filtered}
    assert reasons["full"] == "0 free A800 cards, job needs 1"
    assert reasons["npu"] == "none of A800"
    # 0.90 of energy + 0.04 of checkpoint overhead (C/T with T = the whole run: no failures)
    assert reasons["dear"] == "expected 0.94 CNY, over max_price 0.60"


# --------------------------------------------------------------------------- building and bad input


def test_pool_from_site_uses_the_layout_accelerator_table() -> None:
    site = layout.Site(id="zw", name="Zhongwei", city="zhongwei", region="ningxia", lat=37.5, lon=105.2, tier="hub",
                       provider="op", accelerators={"910B": 512, "A800": 256}, tariff=TOU, pue=1.1,
                       failure_rate_per_card_hour=5e-5, tee=True, restart_s=120.0, egress_gbps=40.0)
    specs = {"910B": layout.AcceleratorSpec(name="910B", vendor="huawei", units=0.8, kw_per_card=0.4, memory_gb=64),
             "A800": layout.AcceleratorSpec(name="A800", vendor="nvidia", units=1.0, kw_per_card=0.4, memory_gb=80)}
    p = pl.pool_from_site(site, specs, free={"910B": 100.7}, draining=True)
    assert p.cards_total == {"910B": 512, "A800": 256} and p.cards_free == {"910B": 100, "A800": 0}
    assert p.units == {"910B": 0.8, "A800": 1.0} and p.tee and p.draining and p.restart_s == 120.0
    assert pl.pool_from_site(site, specs).cards_free == {"910B": 512, "A800": 256}


@pytest.mark.parametrize(
    ("job_kw", "field"),
    [({"cards": 0}, "cards"), ({"accelerators": ()}, "accelerators"), ({"est_hours": -1.0}, "est_hours"),
     ({"checkpoint_cost_s": float("nan")}, "checkpoint_cost_s"), ({"progress": 1.5}, "progress"),
     ({"checkpoint_interval_s": 0.0}, "checkpoint_interval_s")],
)
def test_a_bad_job_is_refused_naming_the_field(job_kw: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        pl.score(job(**job_kw), pool(), MIDNIGHT)


@pytest.mark.parametrize(
    ("pool_kw", "field"),
    [({"pue": 0.0}, "pue"), ({"failure_rate_per_card_hour": -1.0}, "failure_rate_per_card_hour"),
     ({"units": {"A800": 0.0}}, "units"), ({"kw_per_card": {"A800": -0.1}}, "kw_per_card")],
)
def test_a_bad_pool_is_refused_naming_the_field(pool_kw: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"pool p1: {field}"):
        pl.score(job(), pool(**pool_kw), MIDNIGHT)


def test_a_shared_start_time_table_gives_the_same_answer_as_none() -> None:
    cache: dict = {}  # type: ignore[type-arg]
    prices: dict = {}  # type: ignore[type-arg]
    now = MIDNIGHT + 10 * H
    j = job(deadline=now + 30 * H, est_hours=3.0, prefer="cost")
    for p in (pool(id="a", tariff=TOU), pool(id="b", tariff=TOU, pue=1.4), pool(id="c", tariff=FLAT)):
        pp = pl.priced(p, "A800", prices)
        assert pl.estimate(j, pp, now, tou_cache=cache) == pl.estimate(j, pl.priced(p, "A800"), now)
    assert len(cache) == 2  # a and b share TOU's table; c has its own


def test_tariff_hours_are_the_topology_local_hours() -> None:
    pp = pl.priced(pool(tariff=TOU), "A800")
    for k in range(48):
        t = MIDNIGHT + k * 1800.0 + 1.0
        assert pp.price_integral(t, t + 60.0) == pytest.approx(TOU.price_at(t) * 60.0 / H)
