"""Tenant budgets (controlplane/market/budgets.py)."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.market import budgets

CN = dt.timezone(dt.timedelta(hours=8))
B = budgets.Budget(tenant="acme", limit_fen=100_000)   # 1,000 CNY a month


@pytest.mark.parametrize(("spent", "incoming", "verdict", "crossed"), [
    (0, 10_000, "allow", ()),
    (40_000, 10_000, "warn", (50,)),          # reaches 50 % exactly
    (40_000, 45_000, "warn", (50, 80)),
    (50_000, 10_000, "allow", ()),            # 50 % was already reached
    (90_000, 10_000, "warn", (100,)),         # the limit exactly is still allowed
    (90_000, 10_001, "refuse", ()),
    (100_000, 0, "allow", ()),
    (100_000, 1, "refuse", ()),
])
def test_check(spent: int, incoming: int, verdict: str, crossed: tuple[int, ...]) -> None:
    d = budgets.check(B, spent, incoming)
    assert (d.verdict, d.crossed_pct) == (verdict, crossed)
    assert (d.limit_fen, d.spent_fen, d.incoming_fen, d.remaining_fen) == (100_000, spent, incoming, 100_000 - spent)


def test_refusal_carries_the_figures_in_words() -> None:
    d = budgets.check(B, 95_000, 8_000)
    assert d.verdict == "refuse" and d.used_pct == 103
    assert d.message == ("budget exceeded: 950.00 of 1000.00 CNY spent this month, this needs up to 80.00 CNY "
                         "and 50.00 CNY remain")


def test_standing_names_the_thresholds_reached() -> None:
    assert budgets.standing(B, 10_000).verdict == "allow"
    s = budgets.standing(B, 85_000)
    assert (s.verdict, s.crossed_pct, s.used_pct) == ("warn", (50, 80), 85)
    over = budgets.standing(B, 120_000)
    assert over.crossed_pct == (50, 80, 100) and over.remaining_fen == -20_000


def test_bad_figures() -> None:
    with pytest.raises(ValueError, match="incoming_fen must be >= 0"):
        budgets.check(B, 0, -1)
    with pytest.raises(ValueError, match="int of fen"):
        budgets.check(B, 0.5, 1)  # type: ignore[arg-type]
    assert "thresholds_pct" in (budgets.budget_problem(budgets.Budget(tenant="a", limit_fen=1,
                                                                      thresholds_pct=(0,))) or "")


def test_periods_are_china_local_calendar_days_and_months() -> None:
    now = dt.datetime(2026, 12, 31, 23, 30, tzinfo=CN).timestamp()
    assert budgets.period_bounds("day", now) == (dt.datetime(2026, 12, 31, tzinfo=CN).timestamp(),
                                                 dt.datetime(2027, 1, 1, tzinfo=CN).timestamp())
    assert budgets.period_bounds("month", now) == (dt.datetime(2026, 12, 1, tzinfo=CN).timestamp(),
                                                   dt.datetime(2027, 1, 1, tzinfo=CN).timestamp())


@given(limit=st.integers(0, 10**9), spent=st.integers(0, 10**9), incoming=st.integers(0, 10**9))
def test_refuse_exactly_when_the_limit_would_be_passed(limit: int, spent: int, incoming: int) -> None:
    d = budgets.check(budgets.Budget(tenant="a", limit_fen=limit), spent, incoming)
    assert (d.verdict == "refuse") == (spent + incoming > limit)


def test_holds_count_against_the_limit_with_what_was_spent() -> None:
    b = budgets.Budget(tenant="acme", limit_fen=1_000)
    assert budgets.check(b, 600, 300).verdict != "refuse"
    refused = budgets.check(b, 600, 300, held_fen=200)  # 600 + 200 + 300 > 1000
    assert refused.verdict == "refuse" and refused.held_fen == 200 and refused.remaining_fen == 200
    assert "2.00 CNY held by work in flight" in refused.message and "2.00 CNY remain" in refused.message
    assert budgets.check(b, 600, 200, held_fen=200).verdict in ("allow", "warn")  # exactly the limit
    with pytest.raises(ValueError, match="held_fen must be >= 0"):
        budgets.check(b, 0, 1, held_fen=-1)


@given(st.integers(0, 5_000), st.lists(st.tuples(st.integers(0, 400), st.floats(0, 1)), max_size=40))
def test_requests_admitted_together_never_overshoot_the_limit(limit: int, requests: list[tuple[int, float]]) -> None:
    """Rule 3: every request is admitted (or not) while all earlier ones are still in flight, each
    holding its estimate; each then uses at most its estimate. What was spent never exceeds the
    limit, however the requests settle."""
    b = budgets.Budget(tenant="acme", limit_fen=limit)
    held, holds = 0, []
    for estimate, used in requests:
        if budgets.check(b, 0, estimate, held_fen=held).verdict != "refuse":
            held += estimate
            holds.append((estimate, int(estimate * used)))
    spent = 0
    for estimate, actual in holds:  # settle: the hold is released, the actual use is spent
        held -= estimate
        spent += actual
        assert spent + held <= limit
    assert spent <= limit


def test_a_training_hold_is_the_quotes_maximum_else_the_most_expensive_feasible_offers() -> None:
    assert budgets.training_hold(700, [100, 900]) == budgets.TrainingHold(fen=700, basis="quote")
    assert budgets.training_hold(None, [100, 900, 300]) == budgets.TrainingHold(fen=900, basis="most_expensive_offer")
    assert budgets.training_hold(None, []) is None        # nothing could price it: nothing to hold


def test_a_job_holds_its_maximum_less_what_it_was_charged_until_it_ends() -> None:
    assert budgets.job_hold_fen(900, 0, False) == 900
    assert budgets.job_hold_fen(900, 400, False) == 500
    assert budgets.job_hold_fen(900, 1200, False) == 0     # billed past its hold (unquoted, ran longer)
    assert budgets.job_hold_fen(900, 400, True) == 0       # ended: released


@given(limit=st.integers(0, 10_000), maxima=st.lists(st.integers(0, 5_000), max_size=12),
       charged_pct=st.lists(st.integers(0, 100), min_size=12, max_size=12))
def test_jobs_accepted_while_their_holds_fit_never_commit_more_than_the_limit(
        limit: int, maxima: list[int], charged_pct: list[int]) -> None:
    """Rule 4: each job is accepted only if spent + held + its maximum fits; whatever part of its
    maximum each accepted job has been charged so far, spent + what they still hold stays within
    the limit (a charge moves fen from held to spent, it never adds)."""
    b = budgets.Budget(tenant="t", limit_fen=limit)
    accepted: list[int] = []
    for m in maxima:
        held = sum(budgets.job_hold_fen(x, 0, False) for x in accepted)
        if budgets.check(b, 0, m, held).verdict != "refuse":
            accepted.append(m)
    charged = [x * p // 100 for x, p in zip(accepted, charged_pct)]
    spent = sum(charged)
    held = sum(budgets.job_hold_fen(x, c, False) for x, c in zip(accepted, charged))
    assert spent + held == sum(accepted) <= limit
