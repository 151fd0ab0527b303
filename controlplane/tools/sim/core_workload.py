"""Workload of a simulated run: inference arrivals and training jobs. Pure (rngs are passed in).

- :func:`arrivals` yields inference requests lazily, in time order: a non-homogeneous Poisson
  process whose rate follows the scenario's hourly profile (China local time, piecewise constant
  per hour, so exponential gaps are exact within an hour and restart at each boundary), origins
  drawn by the layout's demand weights, models by share, budgets by share, service times from the
  ``sim`` backend model (time to first token + per-token time × tokens).
- :func:`jobs` draws the day's training jobs (arrival times from the training profile; sizes,
  durations, accelerators, priorities, deadlines from the scenario).
- :class:`FaultClock` gives each job its own reproducible sequence of unit-exponential variates,
  so every policy sees the *same* failure draws (common random numbers): an attempt's failure
  comes after ``variate / (cards × failure rate)`` hours, whichever pool it runs on.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from typing import Protocol

from controlplane.tools.sim.core_scenario import Scenario, SizeBin
from topology import layout as tlayout
from topology import synth

LOCAL_OFFSET_S = 8 * 3600


class Rng(Protocol):
    def random(self) -> float: ...
    def expovariate(self, lambd: float) -> float: ...
    def getrandbits(self, k: int) -> int: ...


def cumulative(weights: Sequence[float]) -> list[float]:
    """Running sums of ``weights`` (for bisect draws)."""
    out: list[float] = []
    acc = 0.0
    for w in weights:
        acc += w
        out.append(acc)
    return out


def hourly_rates(profile: Sequence[float], start_s: float, end_s: float, total: float) -> list[float]:
    """Per-second rate for each local hour 0..23 so that the expected count over [start, end] is ``total``."""
    mass = 0.0  # ∫ profile dt in hours over the run
    t = start_s
    while t < end_s:
        h = int(((t + LOCAL_OFFSET_S) // 3600) % 24)
        nxt = min(end_s, (math.floor(t / 3600.0) + 1) * 3600.0)
        mass += profile[h] * (nxt - t) / 3600.0
        t = nxt
    if mass <= 0 or total <= 0:
        return [0.0] * 24
    return [total * p / mass / 3600.0 for p in profile]


def poisson_times(rates: Sequence[float], start_s: float, end_s: float, rng: Rng) -> Iterator[float]:
    """Event times of a Poisson process with piecewise-constant hourly ``rates`` (per s, local hour)."""
    t = start_s
    expo = rng.expovariate
    while t < end_s:
        hb = min(end_s, (math.floor(t / 3600.0) + 1) * 3600.0)
        lam = rates[int(((t + LOCAL_OFFSET_S) // 3600) % 24)]
        if lam <= 0:
            t = hb
            continue
        while True:
            t += expo(lam)
            if t >= hb:
                break
            yield t
        t = hb  # memoryless: restart at the boundary with the next hour's rate


def arrivals(
    s: Scenario, lay: tlayout.Layout, start_s: float, end_s: float, rng: Rng
) -> Iterator[tuple[float, int, int, int, float]]:
    """Inference requests as ``(t, origin index, model index, budget index, service_s)``.

    Origin indices follow ``lay.origins``, model indices ``s.inference.models``, budget indices
    ``s.inference.budgets_ms``.
    """
    inf = s.inference
    if inf.requests <= 0 or not inf.models:
        return
    rates = hourly_rates(inf.profile, start_s, end_s, inf.requests)
    o_cum = cumulative([o.weight for o in lay.origins])
    m_cum = cumulative([m.share for m in inf.models])
    b_cum = cumulative(inf.budget_shares)
    o_tot, m_tot, b_tot = o_cum[-1], m_cum[-1], b_cum[-1]
    n_o, n_m, n_b = len(o_cum) - 1, len(m_cum) - 1, len(b_cum) - 1
    ttft = [m.ttft_ms / 1000.0 for m in inf.models]
    per_tok = [m.per_token_ms / 1000.0 for m in inf.models]
    inv_mean = [1.0 / m.mean_tokens for m in inf.models]
    rand, expo, bis = rng.random, rng.expovariate, bisect.bisect_right
    for t in poisson_times(rates, start_s, end_s, rng):
        o = min(bis(o_cum, rand() * o_tot), n_o)
        m = min(bis(m_cum, rand() * m_tot), n_m) if n_m else 0
        b = min(bis(b_cum, rand() * b_tot), n_b) if n_b else 0
        tokens = math.ceil(expo(inv_mean[m]))
        yield t, o, m, b, ttft[m] + per_tok[m] * (tokens if tokens > 0 else 1)


class JobDraw:
    """One training job as drawn (the same for every policy)."""

    __slots__ = ("id", "tenant", "origin", "cards", "accelerators", "est_hours", "priority", "deadline",
                 "submitted_at", "checkpoint_cost_s", "faults", "prefer")

    def __init__(self, id: str, tenant: str, origin: str, cards: int, accelerators: tuple[str, ...],
                 est_hours: float, priority: int, deadline: float | None, submitted_at: float,
                 checkpoint_cost_s: float, faults: FaultClock, prefer: str | None = None) -> None:
        self.id = id
        self.tenant = tenant
        self.origin = origin
        self.cards = cards
        self.accelerators = accelerators
        self.est_hours = est_hours
        self.priority = priority
        self.deadline = deadline
        self.submitted_at = submitted_at
        self.checkpoint_cost_s = checkpoint_cost_s
        self.faults = faults
        self.prefer = prefer
        """``cost`` for a cost-first job, else None (the API's default)."""

    def __repr__(self) -> str:
        return f"<JobDraw {self.id} cards={self.cards} est_hours={self.est_hours:.2f} at={self.submitted_at:.0f}>"


class FaultClock:
    """A job's unit-exponential variates, the k-th for its k-th attempt (reproducible, shared)."""

    __slots__ = ("_gen", "_vals")

    def __init__(self, seed: int) -> None:
        self._gen = synth.SplitMix64(seed)
        self._vals: list[float] = []

    def variate(self, k: int) -> float:
        """The k-th (0-based) Exp(1) variate."""
        vals = self._vals
        while len(vals) <= k:
            u = (self._gen.next_u64() >> 11) * (1.0 / (1 << 53))
            vals.append(-math.log(1.0 - u))
        return vals[k]


def _pick(cum: list[float], rng: Rng) -> int:
    return min(bisect.bisect_right(cum, rng.random() * cum[-1]), len(cum) - 1)


def _log_uniform(lo: float, hi: float, rng: Rng) -> float:
    return lo if hi <= lo else math.exp(math.log(lo) + rng.random() * (math.log(hi) - math.log(lo)))


def _cards(sizes: Sequence[SizeBin], cum: list[float], rng: Rng) -> int:
    """A gang size: a bin by share, log-uniform within it, rounded to a multiple of 8 above 8."""
    lo, hi = sizes[_pick(cum, rng)].cards
    cards = int(round(_log_uniform(lo, hi, rng)))
    if cards > 8:
        cards = max(8, min(hi, 8 * round(cards / 8)))
    return cards


def jobs(s: Scenario, lay: tlayout.Layout, start_s: float, end_s: float, rng: Rng, fault_rng: Rng) -> list[JobDraw]:
    """The run's training jobs in submission order."""
    tr = s.training
    if tr.jobs <= 0:
        return []
    rates = hourly_rates(tr.profile, start_s, end_s, tr.jobs)
    size_cum = cumulative([b.share for b in tr.sizes])
    acc_cum = cumulative([a.share for a in tr.accelerators])
    prio_cum = cumulative([p[1] for p in tr.priorities])
    o_cum = cumulative([o.weight for o in lay.origins])
    out: list[JobDraw] = []
    for t in poisson_times(rates, start_s, end_s, rng):
        cards = _cards(tr.sizes, size_cum, rng)
        est_hours = round(_log_uniform(tr.hours[0], tr.hours[1], rng), 4)
        choice = tr.accelerators[_pick(acc_cum, rng)]
        accs = tuple(choice.accelerators)
        if choice.sizes:  # the choice's own sizes: drawn again (only scenarios that give them draw more)
            cards = _cards(choice.sizes, cumulative([b.share for b in choice.sizes]), rng)
        prio = int(tr.priorities[_pick(prio_cum, rng)][0])
        deadline = None
        if rng.random() < tr.deadline_share:
            lo_s, hi_s = tr.deadline_slack
            deadline = t + est_hours * 3600.0 * (lo_s + rng.random() * (hi_s - lo_s)) + 3600.0
        origin = lay.origins[_pick(o_cum, rng)].id
        tenant = f"t{int(rng.random() * tr.tenants)}"
        faults = FaultClock(fault_rng.getrandbits(64))
        # Drawn only when asked for, so scenarios without cost-first jobs keep their job stream.
        prefer = "cost" if tr.cost_first_share > 0 and rng.random() < tr.cost_first_share else None
        out.append(JobDraw(f"j{len(out):06d}", tenant, origin, cards, accs, est_hours, prio, deadline, t,
                           tr.checkpoint_cost_s, faults, prefer))
    return out
