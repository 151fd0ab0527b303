"""Placement priced by offers (the market): a pool carrying an offer's card-hour prices is scored
at them, not at its energy; metering still bills energy by tariff; a job pinned to a pool (by its
quote) goes nowhere else. Pure."""

from __future__ import annotations

from controlplane.core import placement as pl
from controlplane.core import scheduler
from tests.unit.test_placement import FLAT, MIDNIGHT, job, pool

H = 3600.0
CHEAP_ENERGY = dict(id="cheap-energy", pue=1.0)
DEAR_ENERGY = dict(id="dear-energy", pue=2.0)


def test_an_offer_replaces_the_energy_as_what_placement_minimises() -> None:
    # Energy alone: 0.5 kW × PUE 1 × 0.5 CNY/kWh = 0.25 CNY per card-hour against 0.5.
    pools = [pool(**CHEAP_ENERGY), pool(**DEAR_ENERGY)]
    scored, _ = pl.rank(job(), pools, MIDNIGHT)
    assert scored[0].pool == "cheap-energy"
    # The dear-energy pool's owner offers 2 CNY per card-hour, the other 9: the offer wins.
    offered = [pool(**CHEAP_ENERGY, card_hour_cny={"A800": (9.0,) * 24}),
               pool(**DEAR_ENERGY, card_hour_cny={"A800": (2.0,) * 24})]
    scored, _ = pl.rank(job(), offered, MIDNIGHT)
    assert scored[0].pool == "dear-energy"
    assert abs(scored[0].energy_cny - 2 * 2.0) < 1e-9  # 1 card × 2 h × 2 CNY: the price, not the energy
    plan = scheduler.plan(scheduler.Snapshot(pools=offered, queued=[job()]), MIDNIGHT)
    (start,) = plan.start
    assert start.pool == "dear-energy" and "offer price 4.00" in start.explanation.chosen
    # Its energy stays in the explanation: 1 card × 0.5 kW × PUE 2 × 0.5 CNY/kWh × 2 h = 1.00; margin 3.00.
    assert "the owner's energy 1.00, margin over it 3.00" in start.explanation.chosen


def test_metering_bills_energy_by_tariff_whatever_the_offer() -> None:
    p = pool(**DEAR_ENERGY, card_hour_cny={"A800": (2.0,) * 24})
    assert abs(pl.metered_energy_cny(p, "A800", 1, MIDNIGHT, MIDNIGHT + 2 * H) - 0.5 * 2.0 * 0.5 * 2) < 1e-9
    assert FLAT.price_at_hour(0) == 0.5


def test_a_bad_offer_table_is_named() -> None:
    assert pl.pool_problem(pool(card_hour_cny={"A800": (1.0,) * 23})) == \
        "card_hour_cny[A800] must be 24 prices >= 0 (local hours 0..23)"
    assert pl.pool_problem(pool(card_hour_cny={"A800": (-1.0,) * 24})) is not None


def test_a_job_pinned_to_a_pool_goes_nowhere_else() -> None:
    pools = [pool(**CHEAP_ENERGY), pool(**DEAR_ENERGY)]
    plan = scheduler.plan(scheduler.Snapshot(pools=pools, queued=[job(pools=("dear-energy",))]), MIDNIGHT)
    assert [s.pool for s in plan.start] == ["dear-energy"]
    scored, filtered = pl.rank(job(pools=("dear-energy",)), pools, MIDNIGHT)
    assert [b.pool for b in scored] == ["dear-energy"]
    assert [(v.pool, v.reason) for v in filtered] == [("cheap-energy", "not the quoted pool (dear-energy)")]
    plan = scheduler.plan(scheduler.Snapshot(pools=[pool(**CHEAP_ENERGY)], queued=[job(pools=("gone",))]), MIDNIGHT)
    assert plan.start == [] and "not the quoted pool (gone)" in "; ".join(plan.infeasible[0].reasons)
