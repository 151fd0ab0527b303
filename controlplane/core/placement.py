"""Training placement, one job against one pool: the filters and the expected-cost score.

Public API (pure; ``now`` is epoch seconds, passed in):

- :class:`Pool` — what the hub knows of a site for training (built from ``topology.layout.Site``
  plus the registry's ``SiteView``). ``cards_free`` must already exclude cards held by attempts the
  hub has placed but the heartbeat does not show yet.
- :class:`JobSpec` — what the scheduler needs of a queued (or restarting) job.
- :class:`CostModel` — the assumptions of the cost model (frozen config, documented defaults).
- :data:`STATIC_FILTERS` / :func:`filter_free` / :func:`filter_reason` — Kubernetes-style filters:
  each a small pure predicate returning ``None`` (passes) or a reason string.
- :func:`score` ``(job, pool, now, ...) -> CostBreakdown`` — expected cost in CNY:
  energy + expected failure waste + moving the checkpoint; picks the cheapest start time over the
  next 24 h (on the hour) that the deadline allows.
- :func:`rank` — every pool for one job: the passing ones scored and sorted, the others with the
  reason they were filtered (for explanations and the API; the scheduler has a faster path).
- :func:`metered_energy_cny` — what an attempt's card time actually cost (metering).
- :func:`pool_from_site` — a :class:`Pool` from ``topology.layout.Site`` + live state.
- :class:`PricedPool` / :func:`priced` — a pool's per-accelerator figures precomputed (hourly price
  table and its running sum, lower bound per card-hour); the scheduler builds one per (pool,
  accelerator) per tick and calls :func:`score_priced` in its hot loop.

The cost model (docs/training.md has the derivation):

- work_s = est_hours × 3600 × (1 − progress) / units — est_hours is on A800-equivalents
  (units = 1.0); a pool of ``units`` 0.8 takes 1/0.8 as long.
- energy_cny = cards × kw_per_card × PUE × ∫ tariff(t) dt over [start, start + work_s], hour by
  hour following the time-of-use schedule (China local time, UTC+8).
- The goodput rule: M = 1 / (failure_rate_per_card_hour × cards) (checkpointing.job_mtbf_s); T =
  the job's interval or Daly's optimum; W = M·e^(R/M)·(e^((T+C)/M) − 1)/T − 1, the expected time
  lost per second of work to checkpoints, failures and restarts (``checkpointing.goodput_waste``,
  Daly's complete model; ≈ C/T + (T/2 + R)/M when M is long); failure_waste_cny = W × energy_cny
  (lost time is priced at the run window's average tariff); expected run time = work_s × (1 + W).
- move_cny (only when restarting away from the pool holding the checkpoint): size = cards ×
  ``state_gb_per_card`` GB (weights + optimiser state, 16 GB per card assumed); transfer time =
  size × 8 / min(egress of source, egress of target) Gbit/s; the reserved cards idle that long at
  board power, plus ``transfer_cny_per_gb`` × size (illustrative price).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, Protocol

import msgspec

from controlplane.core import checkpointing
from topology import layout

LOCAL_UTC_OFFSET_H = 8
"""Tariff hours are China local time (UTC+8), as ``topology.layout.local_hour``."""


class TariffLike(Protocol):
    """The part of ``topology.layout.Tariff`` placement uses."""

    def price_at_hour(self, hour: int) -> float: ...


Prefer = Literal["time", "cost"]
"""A job's ``prefer``: ``time`` (the default: start when cards are free, never wait for a tariff
window) or ``cost`` (cost-first: wait for a cheaper window when it saves enough and the deadline,
if any, allows it)."""


class CostModel(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Assumptions of the cost model. Defaults are illustrative; docs/training.md explains each."""

    state_gb_per_card: float = 16.0
    """Checkpoint size per card (weights + optimiser shards); moving a checkpoint moves this much."""
    transfer_cny_per_gb: float = 0.05
    """Price of moving one GB between pools (illustrative, not sourced)."""
    deadline_margin: float = 0.2
    """A job waits for a cheaper window only if start + run × (1 + margin) still meets its deadline."""
    max_wait_h: int = 24
    """Start times tried: now, then each hour boundary within this many hours."""
    min_wait_saving: float = 0.2
    """Waiting for a cheaper tariff window must save at least this fraction (0..1) of the start-now
    energy cost (``HubConfig.training_min_wait_saving_pct`` / 100; docs/training.md)."""
    checkpoint_floor_s: float = 60.0
    """Shortest checkpoint interval the default (Daly) rule may choose."""


DEFAULT_MODEL = CostModel()


class Pool(msgspec.Struct, frozen=True, kw_only=True):
    """A site as the training scheduler sees it. Plain data; build one per scheduler tick."""

    id: str
    region: str = ""
    provider: str = ""
    tee: bool = False
    healthy: bool = True
    draining: bool = False
    cards_total: dict[str, int] = {}
    cards_free: dict[str, int] = {}
    kw_per_card: dict[str, float] = {}
    units: dict[str, float] = {}
    """Normalised compute per card by accelerator (A800 = 1.0)."""
    tariff: Any = None
    """A ``topology.layout.Tariff`` (anything with ``price_at_hour(hour) -> CNY/kWh``)."""
    pue: float = 1.3
    failure_rate_per_card_hour: float = 0.0
    restart_s: float = 300.0
    egress_gbps: float = 10.0
    lat: float = 0.0
    lon: float = 0.0
    executors: frozenset[str] | None = None
    """Training executors the site registered (``sim``, ``process``, ``slurm``, ``container``);
    None: not known, any workload passes (the simulator, unit tests)."""
    card_hour_cny: dict[str, tuple[float, ...]] = {}
    """What a tenant pays per card-hour here (the pool owner's offer, which includes its energy),
    by accelerator, for local hours 0..23. For an accelerator listed, placement minimises this
    price instead of the energy cost (:func:`priced`); metering still bills energy by tariff."""


WORKLOAD_EXECUTORS: dict[str, frozenset[str]] = {
    "sim": frozenset({"sim"}),
    "process": frozenset({"process", "slurm"}),
    "container": frozenset({"container"}),
}
"""Which site executors can run each kind of workload."""


class JobSpec(msgspec.Struct, frozen=True, kw_only=True):
    """The scheduler's view of a job waiting for placement (queued, or restarting after a failure);
    the hub builds it from the stored spec (``jobspec.JobSpec.waiting``) at each tick."""

    id: str
    tenant: str
    cards: int
    accelerators: tuple[str, ...]
    """Accepted accelerator types, in the tenant's order of preference (ties go to the first)."""
    est_hours: float
    """Run time on ``cards`` A800-equivalents (units 1.0) from start to finish, without failures."""
    checkpoint_cost_s: float = 300.0
    checkpoint_interval_s: float | None = None
    """None: Daly's optimum for the chosen pool. (The API's ``checkpoint_interval_min`` × 60.)"""
    priority: int = 0
    deadline: float | None = None
    """Epoch seconds by which the job should finish (pools that meet it win; a cost-first job waits
    for a cheaper window only as far as it allows)."""
    max_price_cny: float | None = None
    regions: tuple[str, ...] = ()
    """Allowed regions; empty allows all."""
    providers: tuple[str, ...] = ()
    tee: bool = False
    submitted_at: float = 0.0
    progress: float = 0.0
    """Fraction already done (from the last checkpoint) — only the rest is priced."""
    checkpoint_pool: str = ""
    """Pool holding the checkpoint to resume from; restarting elsewhere pays to move it."""
    restarting: bool = False
    """Lost its pool to an infrastructure failure: goes ahead of its priority level's queue."""
    workload: str = "sim"
    """``sim``, ``process`` or ``container`` (``jobspec.JobSpec.workload``): which executors can run it."""
    pools: tuple[str, ...] = ()
    """Allowed pools; empty allows all (a job submitted against a quote is pinned to its pool)."""
    prefer: Prefer | None = None
    """What the tenant trades (:data:`Prefer`): ``time`` or None (the default) never waits for a
    cheaper tariff window; ``cost`` waits for one when the deadline, if any, allows it (else within
    ``CostModel.max_wait_h``) and it saves at least ``CostModel.min_wait_saving``."""


class CostBreakdown(msgspec.Struct, frozen=True, kw_only=True):
    """Expected cost of running ``job`` on ``pool`` starting at ``start_at``; total = the sum."""

    pool: str
    accelerator: str
    energy_cny: float
    failure_waste_cny: float
    move_cny: float
    total_cny: float
    start_at: float
    work_s: float
    """Run time without failures on this pool's cards."""
    run_s: float
    """Expected run time including checkpoint overhead and failures: work_s × (1 + waste)."""
    interval_s: float
    mtbf_h: float | None
    """Mean time between failures of the job's gang on this pool; None when the pool declares no
    failures (an infinite MTBF, which JSON cannot carry: the breakdown is stored with the attempt)."""
    waste_fraction: float
    meets_deadline: bool = True
    notes: list[str] = []


# --------------------------------------------------------------------------- filters

_ANY_JOB = JobSpec(id="", tenant="", cards=1, accelerators=(), est_hours=0.0)
"""Stands in for the job when a pool-only filter runs (it reads nothing of it)."""


Filter = Callable[[JobSpec, Pool, str], "str | None"]


def filter_accelerator(job: JobSpec, pool: Pool, acc: str) -> str | None:
    return None if pool.cards_total.get(acc, 0) > 0 else f"no {acc} cards"


def filter_gang(job: JobSpec, pool: Pool, acc: str) -> str | None:
    total = pool.cards_total.get(acc, 0)
    return None if total >= job.cards else f"{total} {acc} cards in all, job needs {job.cards} in one pool"


def filter_healthy(job: JobSpec, pool: Pool, acc: str) -> str | None:
    return None if pool.healthy else "unhealthy"


def filter_draining(job: JobSpec, pool: Pool, acc: str) -> str | None:
    return "draining" if pool.draining else None


def filter_region(job: JobSpec, pool: Pool, acc: str) -> str | None:
    if job.regions and pool.region not in job.regions:
        return f"region {pool.region or '?'} not allowed"
    return None


def filter_provider(job: JobSpec, pool: Pool, acc: str) -> str | None:
    if job.providers and pool.provider not in job.providers:
        return f"provider {pool.provider or '?'} not allowed"
    return None


def filter_pool(job: JobSpec, pool: Pool, acc: str) -> str | None:
    if job.pools and pool.id not in job.pools:
        return f"not the quoted pool ({', '.join(job.pools)})"
    return None


def filter_tee(job: JobSpec, pool: Pool, acc: str) -> str | None:
    return "no TEE" if job.tee and not pool.tee else None


def filter_executor(job: JobSpec, pool: Pool, acc: str) -> str | None:
    if pool.executors is None or not pool.executors.isdisjoint(WORKLOAD_EXECUTORS.get(job.workload, ())):
        return None
    offered = ", ".join(sorted(pool.executors)) or "none"
    return f"runs no {job.workload} workloads (executors: {offered})"


class StaticFilter(NamedTuple):
    """One static filter: a pure predicate returning a reason (fails) or None (passes)."""

    name: str
    check: Filter
    idle: Callable[[JobSpec], bool] | None = None
    """True for a job this filter passes on every pool (it constrains nothing the job asked for);
    the scheduler's search then does not run it. None: never idle."""
    pool_only: bool = False
    """Reads nothing of the job: its verdict on a (pool, accelerator) holds for every job (the
    scheduler evaluates it once per pool and plan)."""
    pool_key: Callable[[Pool], Hashable] | None = None
    """What the filter reads of the pool (not of the accelerator): for one job it gives the same
    verdict on pools with equal keys, so the scheduler asks it once per key. None: no such key."""


STATIC_FILTERS: tuple[StaticFilter, ...] = (
    StaticFilter("accelerator", filter_accelerator, pool_only=True),
    StaticFilter("gang", filter_gang),
    StaticFilter("healthy", filter_healthy, pool_only=True),
    StaticFilter("draining", filter_draining, pool_only=True),
    StaticFilter("region", filter_region, idle=lambda job: not job.regions, pool_key=operator.attrgetter("region")),
    StaticFilter("provider", filter_provider, idle=lambda job: not job.providers,
                 pool_key=operator.attrgetter("provider")),
    StaticFilter("pool", filter_pool, idle=lambda job: not job.pools),
    StaticFilter("tee", filter_tee, idle=lambda job: not job.tee, pool_key=operator.attrgetter("tee")),
    StaticFilter("executor", filter_executor, pool_key=operator.attrgetter("executors")),
)
"""Filters that do not depend on what is free now: failing one makes the pool useless for the job.

The one list of filters: :func:`rank` (explanations, the API) and the scheduler's search both
apply it (through :func:`static_reason` and :func:`search_checks`)."""

PASSED_WITH_FREE_CARDS = frozenset({"accelerator", "gang"})
"""Filters every (pool, accelerator) with at least ``job.cards`` free cards passes (a pool with
that many free cards has that many cards): the scheduler's search, which only looks at such
pools, does not run them."""

FILTER_INPUTS: tuple[str, ...] = ("cards", "regions", "providers", "tee", "workload", "pools")
"""The :class:`JobSpec` fields the static filters read. Two jobs equal in these get the same verdict
on every (pool, accelerator), and the scheduler reuses verdicts on that promise: a filter that reads
another field of the job must add it here (tests/unit/test_placement.py checks the list)."""

filter_inputs: Callable[[JobSpec], tuple[object, ...]] = operator.attrgetter(*FILTER_INPUTS)
"""The filter inputs of a job, as a tuple (a memo key)."""


def static_reason(job: JobSpec, pool: Pool, acc: str) -> str | None:
    """First static filter ``pool`` fails for ``job`` on ``acc``, or None."""
    for f in STATIC_FILTERS:
        reason = f.check(job, pool, acc)
        if reason is not None:
            return reason
    return None


def pool_reason(pool: Pool, acc: str) -> str | None:
    """First :attr:`~StaticFilter.pool_only` static filter ``pool`` fails on ``acc``, or None
    (the same for every job)."""
    for f in STATIC_FILTERS:
        if f.pool_only:
            reason = f.check(_ANY_JOB, pool, acc)
            if reason is not None:
                return reason
    return None


def keyed_filters() -> tuple[StaticFilter, ...]:
    """The static filters with a :attr:`~StaticFilter.pool_key`, in list order."""
    return tuple(f for f in STATIC_FILTERS if f.pool_key is not None)


def search_checks(job: JobSpec) -> tuple[StaticFilter, ...]:
    """The static filters, in order, that can fail for ``job`` on a pool with enough free cards and
    no :func:`pool_reason` (the idle, the pool-only and :data:`PASSED_WITH_FREE_CARDS` left out):
    on such a pool, running these gives what :func:`static_reason` gives."""
    return tuple(f for f in STATIC_FILTERS
                 if not f.pool_only and f.name not in PASSED_WITH_FREE_CARDS and (f.idle is None or not f.idle(job)))


def filter_free(job: JobSpec, acc: str, free_cards: int) -> str | None:
    """The gang needs ``job.cards`` free cards of ``acc`` in the pool right now."""
    return None if free_cards >= job.cards else f"{free_cards} free {acc} cards, job needs {job.cards}"


def filter_reason(job: JobSpec, pool: Pool, acc: str) -> str | None:
    """First filter (static, then free cards) ``pool`` fails for ``job`` on ``acc``, or None."""
    return static_reason(job, pool, acc) or filter_free(job, acc, pool.cards_free.get(acc, 0))


# --------------------------------------------------------------------------- validation


def _bad(value: float, *, positive: bool = False) -> bool:
    return not (value > 0 if positive else value >= 0)  # also true for NaN


def pool_problem(pool: Pool) -> str | None:
    """What is wrong with a pool's figures (naming the field), or None."""
    if _bad(pool.pue, positive=True):
        return f"pue must be > 0, got {pool.pue!r}"
    for name in ("failure_rate_per_card_hour", "restart_s", "egress_gbps"):
        if _bad(getattr(pool, name)):
            return f"{name} must be >= 0, got {getattr(pool, name)!r}"
    for acc, kw in pool.kw_per_card.items():
        if _bad(kw):
            return f"kw_per_card[{acc}] must be >= 0, got {kw!r}"
    for acc, units in pool.units.items():
        if _bad(units, positive=True):
            return f"units[{acc}] must be > 0, got {units!r}"
    for acc, table in pool.card_hour_cny.items():
        if len(table) != 24 or any(_bad(p) for p in table):
            return f"card_hour_cny[{acc}] must be 24 prices >= 0 (local hours 0..23)"
    return None


def job_problem(job: JobSpec) -> str | None:
    """What is wrong with a job spec (naming the field), or None. The gateway checks first;
    the scheduler checks again so a bad record is an infeasible job, not a crash."""
    if job.cards < 1:
        return f"cards must be >= 1, got {job.cards}"
    if not job.accelerators:
        return "accelerators must not be empty"
    if _bad(job.est_hours):
        return f"est_hours must be >= 0, got {job.est_hours!r}"
    if _bad(job.checkpoint_cost_s):
        return f"checkpoint_cost_s must be >= 0, got {job.checkpoint_cost_s!r}"
    if job.checkpoint_interval_s is not None and _bad(job.checkpoint_interval_s, positive=True):
        return f"checkpoint_interval_s must be > 0, got {job.checkpoint_interval_s!r}"
    if not 0.0 <= job.progress <= 1.0:
        return f"progress must be within 0..1, got {job.progress!r}"
    return None


# --------------------------------------------------------------------------- pricing


class PricedPool:
    """A pool's figures for one accelerator, precomputed for fast scoring."""

    __slots__ = ("pool", "acc", "prices", "cum", "day_sum", "kw_pue", "units", "lb_rate", "min_price",
                 "avg_rate", "day_slack", "_t0", "_start")

    def __init__(self, pool: Pool, acc: str, prices: Sequence[float], *, per_card: bool = False) -> None:
        problem = pool_problem(pool)
        if problem is not None:
            raise ValueError(f"pool {pool.id}: {problem}")
        self.pool = pool
        self.acc = acc
        # Kept as given when it is a list: pools with the same tariff share one table (see priced),
        # and the scheduler's start-time cache is keyed by its identity.
        self.prices = prices if isinstance(prices, list) else list(prices)
        cum = [0.0]
        for p in self.prices:
            cum.append(cum[-1] + p)
        self.cum = cum
        self.day_sum = cum[24]
        # per_card: ``prices`` are CNY per card-hour (an offer), not CNY per kWh (a tariff).
        self.kw_pue = 1.0 if per_card else pool.kw_per_card.get(acc, 0.0) * pool.pue
        units = pool.units.get(acc, 1.0)
        self.units = units if units > 0 else 1.0
        self.min_price = min(self.prices)
        # CNY per A800-equivalent card-hour at the cheapest hour: a lower bound on energy cost,
        # hence on the total (waste and move costs are >= 0).
        self.lb_rate = self.kw_pue * self.min_price / self.units
        # For long jobs a tighter bound: over W hours the price integral is at least
        # W × day average − 24 h × (average − minimum), whatever the start. Per card:
        # energy >= A800-eq hours × avg_rate − day_slack.
        avg = self.day_sum / 24.0
        self.avg_rate = self.kw_pue * avg / self.units
        self.day_slack = 24.0 * self.kw_pue * (avg - self.min_price)
        self._t0 = math.nan  # the last start asked for (never equal to NaN at first) ...
        self._start: tuple[float, float, int] = (0.0, 0.0, 0)  # ... as (days, local hour, hour index)

    def price_integral(self, t0: float, t1: float) -> float:
        """∫ price dt over [t0, t1] (epoch s), in CNY/kWh × hours (multiply by kW for CNY).

        F(t) = whole days × day_sum + cum[hour] + fraction of the hour × price[hour], local time.
        """
        prices, cum = self.prices, self.cum
        if t0 == self._t0:  # a plan asks for many windows from the same ``now``
            d0, r0, h0 = self._start
        else:
            d0, r0 = divmod(t0 / 3600.0 + LOCAL_UTC_OFFSET_H, 24.0)
            h0 = min(int(r0), 23)  # min(): float rounding at the day boundary
            self._t0, self._start = t0, (d0, r0, h0)
        d1, r1 = divmod(t1 / 3600.0 + LOCAL_UTC_OFFSET_H, 24.0)
        h1 = min(int(r1), 23)
        return ((d1 - d0) * self.day_sum + cum[h1] + (r1 - h1) * prices[h1]
                - cum[h0] - (r0 - h0) * prices[h0])


def tariff_prices(tariff: TariffLike | None) -> list[float]:
    """The 24 hourly prices (CNY/kWh, local hours 0..23) of a tariff; a missing tariff prices 0."""
    if tariff is None:
        return [0.0] * 24
    prices = [float(tariff.price_at_hour(h)) for h in range(24)]
    for h, p in enumerate(prices):
        if not p >= 0:  # also catches NaN
            raise ValueError(f"tariff.price_at_hour({h}) = {p!r}: must be >= 0")
    return prices


def priced(pool: Pool, acc: str, cache: dict[object, list[float]] | None = None) -> PricedPool:
    """Precompute ``pool``'s figures for ``acc``.

    ``cache`` (one per tick, owned by the caller) maps id(tariff) and the price table's contents to
    one shared list, so equal tariffs share one table even when they are different objects.
    """
    offer = pool.card_hour_cny.get(acc)
    if offer is not None:  # one shared list per price table (the start-time cache keys on its identity)
        table = list(offer) if cache is None else cache.setdefault(tuple(offer), list(offer))
        return PricedPool(pool, acc, table, per_card=True)
    if cache is None:
        return PricedPool(pool, acc, tariff_prices(pool.tariff))
    key = id(pool.tariff)
    prices = cache.get(key)
    if prices is None:
        fresh = tariff_prices(pool.tariff)
        prices = cache[key] = cache.setdefault(tuple(fresh), fresh)
    return PricedPool(pool, acc, prices)


def score(
    job: JobSpec,
    pool: Pool,
    now: float,
    *,
    accelerator: str | None = None,
    model: CostModel = DEFAULT_MODEL,
    source: Pool | None = None,
) -> CostBreakdown:
    """Expected cost of ``job`` on ``pool`` (filters are not applied here; see :func:`rank`).

    Args:
        accelerator: which of the job's accelerators to use; default the first the pool has.
        source: the pool holding the job's checkpoint, if known (its egress bounds the move).

    Raises:
        ValueError: the job or pool is invalid (naming the field), or the pool has none of the
            job's accelerators.
    """
    problem = job_problem(job)
    if problem is not None:
        raise ValueError(f"job {job.id}: {problem}")
    acc = accelerator or next((a for a in job.accelerators if pool.cards_total.get(a, 0) > 0), None)
    if acc is None:
        raise ValueError(f"job {job.id}: pool {pool.id} has none of {list(job.accelerators)}")
    return score_priced(job, priced(pool, acc), now, model, source)


def score_priced(
    job: JobSpec,
    pp: PricedPool,
    now: float,
    model: CostModel = DEFAULT_MODEL,
    source: Pool | None = None,
) -> CostBreakdown:
    """:func:`score` on a precomputed :class:`PricedPool`. The job is assumed valid."""
    return breakdown(job, pp, now, estimate(job, pp, now, model, source))


class Estimate(msgspec.Struct, frozen=True, gc=False):
    """The cost model's numbers for one job on one (pool, accelerator): what :func:`estimate`
    returns and :func:`breakdown` words. Cheap to make (positional, no GC tracking): the scheduler
    makes one per pool it scores and builds the :class:`CostBreakdown` only for the winner."""

    total_cny: float
    meets_deadline: bool
    energy_cny: float
    failure_waste_cny: float
    move_cny: float
    start_at: float
    work_s: float
    run_s: float
    interval_s: float
    mtbf_s: float
    waste_fraction: float
    move_s: float
    saved_by_waiting_cny: float
    """Energy saved by waiting for ``start_at`` rather than starting now (0 when starting now)."""


# Bound once: estimate() runs for every pool the scheduler scores.
_daly = checkpointing.daly_unchecked
_practical = checkpointing.practical_unchecked
_waste = checkpointing.goodput_waste_unchecked
_INF = math.inf


def estimate(
    job: JobSpec,
    pp: PricedPool,
    now: float,
    model: CostModel = DEFAULT_MODEL,
    source: Pool | None = None,
    tou_cache: dict[tuple[int, float, float], tuple[list[float], list[int]]] | None = None,
) -> Estimate:
    """The cost model's numbers without building a :class:`CostBreakdown` (the scheduler's hot
    loop estimates many pools and builds the breakdown only for the winner). Job assumed valid.

    ``tou_cache`` (owned by the caller, one per tick) remembers the start-time search per
    (hourly price table, run length, first start hour): pools sharing a tariff share the answer.
    """
    pool = pp.pool
    cards = job.cards
    work_s = job.est_hours * 3600.0 * (1.0 - job.progress) / pp.units

    # The goodput rule: the time a gang is expected to lose to failures and restarts on this pool
    # (Daly's complete model; M shrinks with the number of cards in the gang) is paid for in the
    # cost, so large gangs go where their expected goodput is best at the price.
    rate = pool.failure_rate_per_card_hour
    mtbf_s = 3600.0 / (rate * cards) if rate > 0 else _INF
    cost_s = job.checkpoint_cost_s
    if job.checkpoint_interval_s:
        interval_s = job.checkpoint_interval_s
    else:
        interval_s = _practical(_daly(cost_s, mtbf_s), work_s, model.checkpoint_floor_s)
    waste = _waste(interval_s, cost_s, pool.restart_s, mtbf_s)
    run_s = work_s * (1.0 + waste)

    # Moving the checkpoint: the reserved cards idle while it arrives.
    move_cny = 0.0
    move_s = 0.0
    if job.checkpoint_pool and job.progress > 0 and job.checkpoint_pool != pool.id:
        size_gb = cards * model.state_gb_per_card
        gbps = pool.egress_gbps if source is None else min(pool.egress_gbps, source.egress_gbps)
        move_s = size_gb * 8.0 / gbps if gbps > 0 else _INF
        idle_cny = cards * pp.kw_pue * pp.price_integral(now, now + move_s) if move_s < _INF else _INF
        move_cny = idle_cny + size_gb * model.transfer_cny_per_gb

    # Energy over the run window (hour by hour, time-of-use), trying later starts on the hour
    # when the deadline allows. F(t) is the running integral of the price (see PricedPool).
    kw = cards * pp.kw_pue
    start_at = now
    saved = 0.0
    energy = kw * pp.price_integral(now, now + work_s)
    deadline = job.deadline
    prefer = job.prefer
    if model.max_wait_h > 0 and prefer == "cost":
        # Cost-first: wait only as the deadline allows (with the margin); without one, max_wait_h.
        latest = math.inf if deadline is None else deadline - run_s * (1.0 + model.deadline_margin)
        first_h = math.floor(now / 3600.0) + 1.0  # next hour boundary, in epoch hours
        if first_h * 3600.0 <= latest:
            n_starts = model.max_wait_h if deadline is None else \
                min(model.max_wait_h, int((latest / 3600.0 - first_h) // 1) + 1)
            work_h = work_s / 3600.0
            key = (id(pp.prices), work_h, first_h)
            table = tou_cache.get(key) if tou_cache is not None else None
            if table is None:
                table = _window_table(pp, work_h, first_h, model.max_wait_h)
                if tou_cache is not None:
                    tou_cache[key] = table
            best_k = table[1][n_starts - 1]
            best_i = table[0][best_k]
            now_i = energy / kw if kw > 0 else 0.0
            if best_i < now_i - 1e-9 * (1.0 + now_i) and energy - kw * best_i >= model.min_wait_saving * energy:
                saved = energy - kw * best_i
                energy, start_at = kw * best_i, (first_h + best_k) * 3600.0
    failure_cny = waste * energy
    meets = deadline is None or start_at + move_s + run_s <= deadline
    return Estimate(energy + failure_cny + move_cny, meets, energy, failure_cny, move_cny, start_at, work_s,
                    run_s, interval_s, mtbf_s, waste, move_s, saved)


def _window_table(pp: PricedPool, work_h: float, first_h: float, n: int) -> tuple[list[float], list[int]]:
    """Price integrals of a ``work_h`` run starting on each of the ``n`` hours from epoch hour
    ``first_h``, and for each prefix the index of its cheapest (earliest of equals) start."""
    prices, cum, day_sum = pp.prices, pp.cum, pp.day_sum
    integrals: list[float] = []
    argmin: list[int] = []
    best_i, best_k = math.inf, 0
    for k in range(n):
        s_h = first_h + k
        # start on an hour boundary: F(start) has no fractional part
        d0, h0 = divmod(int(s_h) + LOCAL_UTC_OFFSET_H, 24)
        days, rem = divmod(s_h + LOCAL_UTC_OFFSET_H + work_h, 24.0)
        h1 = min(int(rem), 23)
        integral = (days - d0) * day_sum + cum[h1] + (rem - h1) * prices[h1] - cum[h0]
        integrals.append(integral)
        if k == 0 or integral < best_i - 1e-9 * (1.0 + best_i):  # earliest of equal windows wins
            best_i, best_k = integral, k
        argmin.append(best_k)
    return integrals, argmin


def breakdown(job: JobSpec, pp: PricedPool, now: float, est: Estimate) -> CostBreakdown:
    """The :class:`CostBreakdown` (with notes in words) of an :func:`estimate`."""
    notes: list[str] = []
    if est.move_cny:
        notes.append(f"moves the checkpoint from {job.checkpoint_pool} in {est.move_s:.0f} s")
    if est.start_at > now:
        share = est.saved_by_waiting_cny / (est.energy_cny + est.saved_by_waiting_cny)
        why = "cost-first" if job.deadline is None else "cost-first, its deadline allows it"
        notes.append(f"waits {(est.start_at - now) / 3600.0:.1f} h for a cheaper tariff window, "
                     f"saves {est.saved_by_waiting_cny:.2f} CNY of energy ({share:.0%}; {why})")
    if not est.meets_deadline:
        notes.append("deadline at risk")
    return CostBreakdown(
        pool=pp.pool.id,
        accelerator=pp.acc,
        energy_cny=est.energy_cny,
        failure_waste_cny=est.failure_waste_cny,
        move_cny=est.move_cny,
        total_cny=est.total_cny,
        start_at=est.start_at,
        work_s=est.work_s,
        run_s=est.run_s,
        interval_s=est.interval_s,
        mtbf_h=est.mtbf_s / 3600.0 if math.isfinite(est.mtbf_s) else None,
        waste_fraction=est.waste_fraction,
        meets_deadline=est.meets_deadline,
        notes=notes,
    )


def better(a: CostBreakdown, b: CostBreakdown | None) -> bool:
    """True when ``a`` beats ``b``: meeting the deadline first, then lower total cost."""
    if b is None:
        return True
    if a.meets_deadline != b.meets_deadline:
        return a.meets_deadline
    return a.total_cny < b.total_cny


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    """One pool's result for one job: scored (``total_cny``) or filtered (``reason``)."""

    pool: str
    accelerator: str
    reason: str = ""
    total_cny: float | None = None


def rank(
    job: JobSpec,
    pools: Sequence[Pool],
    now: float,
    *,
    model: CostModel = DEFAULT_MODEL,
) -> tuple[list[CostBreakdown], list[Verdict]]:
    """Score every (pool, accelerator) the job could use now; return (scored best first, filtered).

    A pool whose expected cost is over ``job.max_price_cny`` is filtered with that reason.
    """
    by_id = {p.id: p for p in pools}
    source = by_id.get(job.checkpoint_pool)
    cache: dict[object, list[float]] = {}
    scored: list[CostBreakdown] = []
    filtered: list[Verdict] = []
    for pool in pools:
        for acc in job.accelerators:
            if acc not in pool.cards_total:
                continue
            reason = filter_reason(job, pool, acc)
            if reason is None:
                bd = score_priced(job, priced(pool, acc, cache), now, model, source)
                if job.max_price_cny is not None and bd.total_cny > job.max_price_cny:
                    reason = f"expected {bd.total_cny:.2f} CNY, over max_price {job.max_price_cny:.2f}"
                else:
                    scored.append(bd)
                    continue
            filtered.append(Verdict(pool=pool.id, accelerator=acc, reason=reason))
        if not any(acc in pool.cards_total for acc in job.accelerators):
            filtered.append(Verdict(pool=pool.id, accelerator="", reason=f"none of {'/'.join(job.accelerators)}"))
    scored.sort(key=lambda b: (not b.meets_deadline, b.total_cny, b.pool))
    return scored, filtered


# --------------------------------------------------------------------------- metering and building


def metered_energy_cny(pool: Pool, accelerator: str, cards: int, start_at: float, end_at: float) -> float:
    """Energy cost of ``cards`` of ``accelerator`` held at ``pool`` over [start_at, end_at]:
    cards × kW per card × PUE × ∫ tariff, hour by hour (what an attempt is billed)."""
    if end_at <= start_at:
        return 0.0
    pp = PricedPool(pool, accelerator, tariff_prices(pool.tariff))  # the tariff, never an offer
    return cards * pp.kw_pue * pp.price_integral(start_at, end_at)


def pool_from_site(
    site: layout.Site,
    accelerators: Mapping[str, layout.AcceleratorSpec],
    *,
    free: Mapping[str, float] | None = None,
    healthy: bool = True,
    draining: bool = False,
    executors: frozenset[str] | None = None,
) -> Pool:
    """Build a :class:`Pool` from a layout site, the layout's accelerator table and live state.

    ``free`` is cards free now by accelerator (the heartbeat's, minus cards the hub has placed but
    the heartbeat does not show yet); None means all free. Fractional cards round down.
    """
    total = {a: int(n) for a, n in site.accelerators.items()}
    free_cards = {a: max(0, min(total.get(a, 0), int(math.floor(free.get(a, 0.0))))) for a in total} \
        if free is not None else dict(total)
    kw = {a: accelerators[a].kw_per_card for a in total if a in accelerators}
    units = {a: accelerators[a].units for a in total if a in accelerators}
    return Pool(
        id=site.id, region=site.region, provider=site.provider, tee=site.tee, healthy=healthy,
        draining=draining, cards_total=total, cards_free=free_cards, kw_per_card=kw, units=units,
        tariff=site.tariff, pue=site.pue, failure_rate_per_card_hour=site.failure_rate_per_card_hour,
        restart_s=site.restart_s, egress_gbps=site.egress_gbps, lat=site.lat, lon=site.lon, executors=executors,
    )
