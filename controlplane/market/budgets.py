"""Tenant budgets: a spend limit per period, checked before work is accepted. Pure.

What this module promises:

- Rule 1: :func:`check` answers :class:`BudgetDecision` with ``verdict`` ``allow``, ``warn`` or
  ``refuse`` and the figures (limit, spent, incoming, remaining, percentage): ``refuse`` when
  ``spent + incoming`` would exceed the limit (a 402 with these figures), ``warn`` when it reaches
  a threshold it had not reached before (50/80/100 % by default), else ``allow``. Spending up to
  the limit exactly is allowed (with the 100 % warning).
- Rule 2: periods are calendar days or months in China local time (UTC+8): :func:`period_bounds`.
  A tenant without a budget is never refused (there is no :class:`Budget` to check).
- Rule 3: work admitted but not yet charged is **held** at the most it can cost: :func:`check`
  with ``held_fen`` refuses when ``spent + held + incoming`` would exceed the limit, so requests in
  flight together can never overshoot the budget (each one's hold is released once its actual
  usage is counted in ``spent``, which is never more than its hold).
- Rule 4 (training): a job accepted holds its most-it-can-cost until it ends: :func:`training_hold`
  is the quote's maximum when submitted against a quote, else the largest maximum among the
  feasible priced placements (the most expensive offer it could land on), else nothing (no pool
  could price it). While the job lives, :func:`job_hold_fen` is what it still holds: that maximum
  less what its attempts have been charged so far (those are in ``spent``), never below 0; once
  it ended, 0. So spent + held never counts a fen twice, and a job billed past its hold (an
  unquoted job that ran longer than estimated) holds nothing more.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Literal

import msgspec

from controlplane.market import money

Period = Literal["day", "month"]
_CHINA = dt.timezone(dt.timedelta(hours=8))


class Budget(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A tenant's spend limit."""

    tenant: str
    limit_fen: int
    period: Period = "month"
    thresholds_pct: tuple[int, ...] = (50, 80, 100)


class BudgetDecision(msgspec.Struct, frozen=True, kw_only=True):
    """The answer of :func:`check`; the figures are what a 402 body or a usage warning shows."""

    verdict: Literal["allow", "warn", "refuse"]
    tenant: str
    limit_fen: int
    spent_fen: int
    incoming_fen: int
    remaining_fen: int
    """limit − spent − held (before the incoming work); may be negative after an over-cap adjustment."""
    used_pct: int
    """(spent + incoming) / limit, whole percent rounded down (what a warning names)."""
    crossed_pct: tuple[int, ...] = ()
    """Thresholds this work reaches that spending so far had not."""
    message: str = ""
    held_fen: int = 0
    """Held by work admitted and not yet charged (Rule 3)."""


HoldBasis = Literal["quote", "most_expensive_offer"]


class TrainingHold(msgspec.Struct, frozen=True, kw_only=True):
    """What a job submission holds against its tenant's budget (Rule 4), and why that much."""

    fen: int
    basis: HoldBasis
    """``quote``: the quote's maximum; ``most_expensive_offer``: the largest maximum among the
    feasible placements priced by an offer in force."""


def training_hold(quoted_max_fen: int | None, option_max_fens: Sequence[int]) -> TrainingHold | None:
    """The hold of a job submission (Rule 4): the quote's maximum if it has one, else the largest of
    its feasible priced options' maxima, else None (nothing could price it: nothing to hold)."""
    if quoted_max_fen is not None:
        return TrainingHold(fen=max(0, int(quoted_max_fen)), basis="quote")
    if not option_max_fens:
        return None
    return TrainingHold(fen=max(0, max(int(f) for f in option_max_fens)), basis="most_expensive_offer")


def job_hold_fen(hold_fen: int, charged_fen: int, ended: bool) -> int:
    """What a job still holds (Rule 4): its hold less what it was charged so far, 0 once ended."""
    if ended:
        return 0
    return max(0, hold_fen - max(0, charged_fen))


def budget_problem(budget: Budget) -> str | None:
    """What is wrong with a budget (naming the field), or None."""
    if type(budget.limit_fen) is not int or budget.limit_fen < 0:  # noqa: E721
        return f"limit_fen must be a non-negative int, got {budget.limit_fen!r}"
    if budget.period not in ("day", "month"):
        return f"period must be day or month, got {budget.period!r}"
    if any(type(t) is not int or not 0 < t <= 100 for t in budget.thresholds_pct):  # noqa: E721
        return f"thresholds_pct must be whole percents 1..100, got {budget.thresholds_pct!r}"
    return None


def _pct(amount: int, limit: int) -> int:
    if limit == 0:
        return 100  # a zero budget is at its limit
    whole = abs(amount) * 100 // limit  # toward zero, as int(Fraction(amount * 100, limit))
    return whole if amount >= 0 else -whole


def check(budget: Budget, spent_fen: int, incoming_fen: int, held_fen: int = 0) -> BudgetDecision:
    """May work estimated at ``incoming_fen`` go ahead when ``spent_fen`` is already spent this
    period and ``held_fen`` is held by work admitted and not yet charged (Rule 3)?

    Raises:
        ValueError: a figure is not an int of fen, or the incoming estimate or the holds are negative.
    """
    for name, value in (("spent_fen", spent_fen), ("incoming_fen", incoming_fen), ("held_fen", held_fen)):
        if type(value) is not int:  # noqa: E721
            raise ValueError(f"{name} must be an int of fen, got {value!r}")
    if incoming_fen < 0:
        raise ValueError(f"incoming_fen must be >= 0, got {incoming_fen}")
    if held_fen < 0:
        raise ValueError(f"held_fen must be >= 0, got {held_fen}")
    limit = budget.limit_fen
    before = spent_fen + held_fen
    after = before + incoming_fen
    figures = dict(tenant=budget.tenant, limit_fen=limit, spent_fen=spent_fen, incoming_fen=incoming_fen,
                   remaining_fen=limit - before, used_pct=_pct(after, limit), held_fen=held_fen)
    if after > limit:
        held = f", {money.cny_text(held_fen)} CNY held by work in flight" if held_fen else ""
        return BudgetDecision(
            verdict="refuse", **figures,  # type: ignore[arg-type]
            message=(f"budget exceeded: {money.cny_text(spent_fen)} of {money.cny_text(limit)} CNY spent this "
                     f"{budget.period}{held}, this needs up to {money.cny_text(incoming_fen)} CNY and "
                     f"{money.cny_text(max(0, limit - before))} CNY remain"),
        )
    crossed = tuple(sorted(t for t in set(budget.thresholds_pct)
                           if after * 100 >= t * limit and not before * 100 >= t * limit))
    if crossed:
        return BudgetDecision(
            verdict="warn", crossed_pct=crossed, **figures,  # type: ignore[arg-type]
            message=(f"budget {crossed[-1]}% reached: {money.cny_text(after)} of {money.cny_text(limit)} CNY "
                     f"this {budget.period}"),
        )
    return BudgetDecision(verdict="allow", **figures)  # type: ignore[arg-type]


def standing(budget: Budget, spent_fen: int) -> BudgetDecision:
    """The tenant's position, for ``GET /v1/usage``: ``warn`` naming every threshold reached so
    far (never ``refuse``: nothing is incoming), else ``allow``."""
    if type(spent_fen) is not int:  # noqa: E721
        raise ValueError(f"spent_fen must be an int of fen, got {spent_fen!r}")
    limit = budget.limit_fen
    reached = tuple(sorted(t for t in set(budget.thresholds_pct) if spent_fen * 100 >= t * limit))
    pct = _pct(spent_fen, limit)
    message = (f"budget {reached[-1]}% reached: {money.cny_text(spent_fen)} of {money.cny_text(limit)} CNY "
               f"this {budget.period}" if reached else "")
    return BudgetDecision(verdict="warn" if reached else "allow", tenant=budget.tenant, limit_fen=limit,
                          spent_fen=spent_fen, incoming_fen=0, remaining_fen=limit - spent_fen, used_pct=pct,
                          crossed_pct=reached, message=message)


def period_bounds(period: Period, now: float) -> tuple[float, float]:
    """[start, end) epoch seconds of the calendar day or month (China local time) holding ``now``."""
    local = dt.datetime.fromtimestamp(now, _CHINA)
    if period == "day":
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + dt.timedelta(days=1)
    elif period == "month":
        start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (start.replace(year=start.year + 1, month=1) if start.month == 12
               else start.replace(month=start.month + 1))
    else:
        raise ValueError(f"period must be day or month, got {period!r}")
    return start.timestamp(), end.timestamp()
