"""Checkpoint-interval maths: Young and Daly optimal intervals, expected waste, job MTBF.

Pure functions over floats (seconds unless a name says otherwise); no clock, no I/O.

Promises:

- ``young_interval_s`` and ``daly_interval_s`` follow the published formulas exactly
  (Young 1974; Daly 2006, both cited in ``/work/shared/REFERENCE.md``, "Failures and checkpoints").
- An infinite MTBF (no failures expected) is allowed everywhere and gives an infinite interval and
  zero failure waste; callers clamp the interval to something practical (see
  :func:`practical_interval_s`).
- Negative or NaN inputs raise ``ValueError`` naming the argument.

Symbols: C = checkpoint cost (s), M = mean time between failures of the whole job (s),
R = restart time after a failure (s), T = checkpoint interval (s).
"""

from __future__ import annotations

import math

__all__ = [
    "job_mtbf_s",
    "young_interval_s",
    "daly_interval_s",
    "expected_waste",
    "min_waste",
    "practical_interval_s",
    "daly_unchecked",
    "waste_unchecked",
    "goodput_waste",
    "goodput_waste_unchecked",
    "practical_unchecked",
]


def _check(name: str, value: float, *, positive: bool = False) -> float:
    if value != value or value < 0 or (positive and value == 0):  # value != value: NaN
        want = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return value


def job_mtbf_s(failure_rate_per_card_hour: float, cards: int) -> float:
    """Mean time between failures of an N-card gang job, in seconds.

    If card failures are independent, a job on N cards fails whenever any one of them does, so its
    rate is N times the per-card rate: MTBF = 1 / (rate_per_card_hour × N) hours (REFERENCE.md:
    "a pool's MTBF for an N-card job ≈ per-card MTBF / N"). A zero rate gives ``math.inf``.
    """
    _check("failure_rate_per_card_hour", failure_rate_per_card_hour)
    _check("cards", cards, positive=True)
    if failure_rate_per_card_hour == 0:
        return math.inf
    return 3600.0 / (failure_rate_per_card_hour * cards)


def young_interval_s(checkpoint_cost_s: float, mtbf_s: float) -> float:
    """Young's first-order optimum T = √(2·C·M) (J. W. Young, CACM 17(9), 1974)."""
    _check("checkpoint_cost_s", checkpoint_cost_s)
    _check("mtbf_s", mtbf_s, positive=True)
    return math.sqrt(2.0 * checkpoint_cost_s * mtbf_s)


def daly_interval_s(checkpoint_cost_s: float, mtbf_s: float) -> float:
    """Daly's higher-order optimum (J. T. Daly, FGCS 22(3), 2006).

    T = √(2CM)·[1 + ⅓·√(C/2M) + ⅑·(C/2M)] − C  for C < 2M, else T = M.
    Examples from REFERENCE.md: C = 5 min, M = 24 h → ≈117 min; M = 6 h → ≈57 min.
    """
    return daly_unchecked(_check("checkpoint_cost_s", checkpoint_cost_s), _check("mtbf_s", mtbf_s, positive=True))


def daly_unchecked(c: float, m: float) -> float:
    """Daly's interval without argument checks (placement's hot loop validates once per tick)."""
    if m == math.inf:
        return math.inf
    if c >= 2.0 * m:
        return m
    ratio = c / (2.0 * m)
    return math.sqrt(2.0 * c * m) * (1.0 + math.sqrt(ratio) / 3.0 + ratio / 9.0) - c


def expected_waste(interval_s: float, checkpoint_cost_s: float, restart_s: float, mtbf_s: float) -> float:
    """Expected fraction of run time lost, W(T) ≈ C/T + (T/2 + R)/M (first-order, REFERENCE.md).

    C/T is the time spent writing checkpoints; each failure (one per M seconds on average) loses
    half an interval of work on average plus the restart time R.
    """
    return waste_unchecked(
        _check("interval_s", interval_s, positive=True),
        _check("checkpoint_cost_s", checkpoint_cost_s),
        _check("restart_s", restart_s),
        _check("mtbf_s", mtbf_s, positive=True),
    )


def waste_unchecked(t: float, c: float, r: float, m: float) -> float:
    """:func:`expected_waste` without argument checks, for hot loops."""
    overhead = 0.0 if t == math.inf else c / t
    if m == math.inf:
        return overhead
    return overhead + (t / 2.0 + r) / m


def goodput_waste(interval_s: float, checkpoint_cost_s: float, restart_s: float, mtbf_s: float) -> float:
    """Expected run time lost per second of useful work, exactly, for exponential failures:
    W(T) = M·e^(R/M)·(e^((T+C)/M) − 1)/T − 1 (Daly 2006, the complete model: each segment of T
    compute + C checkpoint is retried until it runs through, each failure costs a restart R that
    may itself fail). The job's goodput on the pool is 1/(1 + W).

    For a gang whose MTBF is short against its interval (thousands of cards), the first-order
    :func:`expected_waste` under-counts; this is what placement prices. It is never below
    :func:`expected_waste` minus rounding, and equals C/T without failures.
    """
    return goodput_waste_unchecked(
        _check("interval_s", interval_s, positive=True),
        _check("checkpoint_cost_s", checkpoint_cost_s),
        _check("restart_s", restart_s),
        _check("mtbf_s", mtbf_s, positive=True),
    )


def goodput_waste_unchecked(t: float, c: float, r: float, m: float) -> float:
    """:func:`goodput_waste` without argument checks, for hot loops."""
    if m == math.inf:
        return 0.0 if t == math.inf else c / t
    if t == math.inf:
        return math.inf
    x = (t + c) / m
    if x > 700.0:  # e^x overflows: the segment practically never runs through
        return math.inf
    return m * math.exp(r / m) * math.expm1(x) / t - 1.0


def min_waste(checkpoint_cost_s: float, restart_s: float, mtbf_s: float) -> float:
    """Minimum of W(T), reached at Young's interval: W* ≈ √(2C/M) + R/M."""
    c = _check("checkpoint_cost_s", checkpoint_cost_s)
    r = _check("restart_s", restart_s)
    m = _check("mtbf_s", mtbf_s, positive=True)
    if math.isinf(m):
        return 0.0
    return math.sqrt(2.0 * c / m) + r / m


def practical_interval_s(
    checkpoint_cost_s: float,
    mtbf_s: float,
    work_s: float,
    *,
    floor_s: float = 60.0,
) -> float:
    """Daly's interval clamped to [``floor_s``, max(``floor_s``, ``work_s``)].

    The floor keeps a zero-cost checkpoint from asking for one every instant; the ceiling is the
    job's own length (with no failures expected, "checkpoint at the end" is the answer).
    """
    _check("work_s", work_s)
    return practical_unchecked(daly_interval_s(checkpoint_cost_s, mtbf_s), work_s, floor_s)


def practical_unchecked(daly_s: float, work_s: float, floor_s: float) -> float:
    """Clamp an interval as :func:`practical_interval_s` does, without checks."""
    return max(floor_s, min(daly_s, max(floor_s, work_s)))
