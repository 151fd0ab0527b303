"""Money in integer fen (controlplane/market/money.py): rounding and allocation."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.market import money


@pytest.mark.parametrize(("value", "fen"), [
    (Fraction(1, 2), 1), (Fraction(-1, 2), -1), (Fraction(3, 2), 2), (Fraction(5, 2), 3),
    (Fraction(49, 100), 0), (Fraction(51, 100), 1), (Fraction(-3, 2), -2), (0, 0), (7, 7),
])
def test_round_half_up_ties_away_from_zero(value: Fraction, fen: int) -> None:
    assert money.round_half_up(value) == fen


def test_cny_conversions_are_exact() -> None:
    assert money.fen_from_cny("12.345") == 1235      # half up, as written
    assert money.fen_from_cny("0.005") == 1
    assert money.fen_from_cny(0.1) == 10              # the float's exact value is 0.1000000000000000055...
    assert money.cny_text(-1205) == "-12.05" and money.cny_text(7) == "0.07"
    with pytest.raises(ValueError, match="finite"):
        money.fen_from_cny(float("nan"))


def test_token_line_is_priced_exactly_and_rounded_once() -> None:
    # 1,500,000 in at 200 fen/Mtok = 300 fen; 333,333 out at 800 fen/Mtok = 266.6664 fen -> 566.6664 -> 567
    assert money.price_tokens(1_500_000, 333_333, 200, 800) == 567
    # rounding per token would give 0 for every single token: rounding once keeps them
    assert money.price_tokens(1, 0, 200, 0) == 0 and money.price_tokens(10_000, 0, 200, 0) == 2


def test_card_time_from_a_float_duration() -> None:
    assert money.price_card_time(8, 5400.0, 1000) == 12_000   # 8 cards x 1.5 h x 10 CNY
    assert money.price_card_time(1, 1.8, 1000) == 1            # 0.5 fen rounds up
    with pytest.raises(ValueError, match="seconds must be >= 0"):
        money.price_card_time(1, -1.0, 1000)


def test_allocate_known_answers() -> None:
    assert money.allocate(100, [1, 1, 1]) == [34, 33, 33]
    assert money.allocate(-100, [1, 1, 1]) == [-34, -33, -33]    # a refund mirrors its charge
    assert money.allocate(5, [0, 3, 1]) == [0, 4, 1]
    assert money.allocate(0, [0, 0]) == [0, 0]
    with pytest.raises(ValueError, match="all zero"):
        money.allocate(1, [0, 0])


@given(total=st.integers(-10**12, 10**12),
       weights=st.lists(st.integers(0, 10**9), min_size=1, max_size=30).filter(lambda ws: any(ws)))
def test_allocation_never_loses_or_creates_a_fen(total: int, weights: list[int]) -> None:
    parts = money.allocate(total, weights)
    assert sum(parts) == total
    wsum = sum(weights)
    for part, w in zip(parts, weights):
        exact = Fraction(total * w, wsum)
        assert abs(part - exact) < 1                        # each part within a fen of its share
        if w == 0:
            assert part == 0


@given(total=st.integers(0, 10**12), bp=st.integers(0, 10_000))
def test_commission_and_remainder_add_back_up(total: int, bp: int) -> None:
    share = money.basis_points(total, bp)
    assert 0 <= share <= total and share + (total - share) == total


@given(st.integers(0, 10**9), st.integers(0, 10**9), st.integers(0, 10**7), st.integers(0, 10**7))
def test_token_prices_in_integers_equal_the_exact_sum_rounded_once(prompt: int, completion: int, fin: int,
                                                                   fout: int) -> None:
    assert money.price_tokens(prompt, completion, fin, fout) == money.round_half_up(
        money.tokens_exact(prompt, fin) + money.tokens_exact(completion, fout))
