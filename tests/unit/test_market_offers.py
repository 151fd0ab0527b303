"""Offers priced over time-of-use windows (controlplane/market/offers.py)."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.core import placement
from controlplane.market import offers
from topology import layout

CN = dt.timezone(dt.timedelta(hours=8))


def local(day: int, hour: int, minute: int = 0) -> float:
    return dt.datetime(2026, 12, day, hour, minute, tzinfo=CN).timestamp()


def offer(**kw: object) -> offers.Offer:
    base: dict[str, object] = dict(
        id="o1", pool="nx-zw", provider="westgrid", accelerator="910B", fen_per_card_hour=1000,
        windows=(offers.Window(start_hour=23, end_hour=7, fen_per_card_hour=400),     # night, wraps midnight
                 offers.Window(start_hour=9, end_hour=12, fen_per_card_hour=1600)))  # morning peak
    base.update(kw)
    return offers.Offer(**base)  # type: ignore[arg-type]


def test_hourly_table_follows_the_windows_in_local_time() -> None:
    table = offer().hours()
    assert table[23] == table[0] == table[6] == 400 and table[7] == 1000
    assert table[9] == table[11] == 1600 and table[12] == 1000
    assert sum(table) == 8 * 400 + 3 * 1600 + 13 * 1000 == 21_000


@pytest.mark.parametrize(("start", "end", "cards", "fen"), [
    # 22:30 -> 07:30: half an hour flat, 8 h of night, half an hour flat; 2 cards
    (local(1, 22, 30), local(2, 7, 30), 2, 2 * (500 + 3200 + 500)),
    # 08:00 -> 13:00: 1 h flat, 3 h peak, 1 h flat
    (local(3, 8), local(3, 13), 1, 1000 + 4800 + 1000),
    # 10:20 -> 10:40 at the peak: a third of 1600 = 533.33 per card; 3 cards = 1600
    (local(3, 10, 20), local(3, 10, 40), 3, 1600),
    # two whole days from any hour cost two day sums
    (local(4, 5, 17), local(6, 5, 17), 1, 42_000),
])
def test_lease_price_integrates_over_the_windows(start: float, end: float, cards: int, fen: int) -> None:
    assert offers.lease_price(offer(), cards, start, end) == fen


def test_a_lease_shorter_than_the_minimum_is_billed_the_minimum() -> None:
    o = offer(windows=(), min_lease_s=3600)
    assert offers.lease_price(o, 1, local(1, 12), local(1, 12, 10)) == 1000
    assert offers.lease_price(o, 1, local(1, 12), local(1, 14)) == 2000
    assert offers.billed_end(o, 100.0, 200.0) == 3700.0


def test_offer_problems_name_the_field() -> None:
    assert offers.offer_problem(offer()) is None
    overlap = offer(windows=(offers.Window(start_hour=22, end_hour=2, fen_per_card_hour=1),
                             offers.Window(start_hour=1, end_hour=3, fen_per_card_hour=2)))
    assert offers.offer_problem(overlap) == "windows[1] overlaps windows[0] at local hour 1"
    assert "whole day" in (offers.offer_problem(offer(windows=(offers.Window(start_hour=5, end_hour=5,
                                                                               fen_per_card_hour=1),))) or "")
    assert "fen_per_card_hour" in (offers.offer_problem(offer(fen_per_card_hour=-1)) or "")
    assert "start_hour" in (offers.offer_problem(offer(windows=(offers.Window(start_hour=24, end_hour=2,
                                                                               fen_per_card_hour=1),))) or "")


def test_select_takes_the_newest_offer_in_force() -> None:
    old = offer(id="a", valid_from=0.0)
    new = offer(id="b", valid_from=1000.0, valid_until=2000.0)
    other = offer(id="c", accelerator="A800", valid_from=1500.0)
    assert offers.select([old, new, other], "nx-zw", "910B", 500.0) is old
    assert offers.select([old, new, other], "nx-zw", "910B", 1500.0) is new
    assert offers.select([old, new, other], "nx-zw", "910B", 2000.0) is old   # new has lapsed
    assert offers.select([old], "other-pool", "910B", 500.0) is None


def test_margin_over_energy_uses_placements_metering() -> None:
    tariff = layout.Tariff(flat_cny_per_kwh=0.5, peak_cny_per_kwh=0.5, valley_cny_per_kwh=0.5)
    pool = placement.Pool(id="nx-zw", provider="westgrid", cards_total={"910B": 64}, cards_free={"910B": 64},
                          kw_per_card={"910B": 0.4}, tariff=tariff, pue=1.25)
    m = offers.margin_over_energy(offer(windows=()), pool, 8, local(1, 12), local(1, 14))
    # energy: 8 cards x 0.4 kW x 1.25 x 2 h x 0.5 CNY = 4 CNY; price: 8 x 2 h x 10 CNY = 160 CNY
    assert m == offers.Margin(price_fen=16_000, energy_fen=400, margin_fen=15_600)
    assert m.energy_fen == round(placement.metered_energy_cny(pool, "910B", 8, local(1, 12), local(1, 14)) * 100)


@given(a=st.floats(1.7e9, 1.8e9), d1=st.floats(0, 3e5), d2=st.floats(0, 3e5), cards=st.integers(0, 4096))
def test_adjacent_leases_add_up_exactly_before_rounding(a: float, d1: float, d2: float, cards: int) -> None:
    o = offer()
    b, c = a + d1, a + d1 + d2
    assert offers.lease_exact(o, cards, a, b) + offers.lease_exact(o, cards, b, c) == offers.lease_exact(o, cards, a, c)
    assert offers.lease_exact(o, cards, a, c) >= 0


def test_an_offer_is_published_only_for_its_pools_declared_provider() -> None:
    assert offers.provider_problem(offer(), "westgrid") is None
    problem = offers.provider_problem(offer(), "deltacompute")
    assert problem is not None and problem.startswith("provider 'westgrid' does not own pool nx-zw")
    assert "'deltacompute'" in problem
    # A pool declared without a provider is the operator's own.
    assert offers.provider_problem(offer(provider="cpn-operator"), "") is None
    assert offers.provider_problem(offer(), "") is not None
