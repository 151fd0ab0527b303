"""The training queue: ``plan(snapshot, now) -> Plan``, pure and deterministic.

Public API:

- Inputs: :class:`Snapshot` (pools, queued jobs as ``placement.JobSpec``, running jobs as
  :class:`Running`, tenants as :class:`Tenant`, the ``placement.CostModel`` and :class:`Policy`).
- Output: :class:`Plan` with ``start`` (:class:`Placement`: pool, accelerator, cost breakdown,
  explanation), ``stop`` (:class:`Preemption`: checkpoint then stop), ``wait`` (:class:`Wait`, with
  the reason), ``infeasible`` (:class:`Infeasible`, with reasons) and the head-of-queue
  ``reservation``. Every queued job appears in exactly one of start / wait / infeasible.
  "No fit" is data, never an exception (ray autoscaler v2's ``SchedulingReply`` shape).
- The caller carries the plan out (httpcore's "decide, then do the I/O"): persist, then send
  ``StartAttempt`` / ``StopAttempt``.

Policy, in the order applied:

1. Order: priority (higher first); within a priority, jobs restarting after an infrastructure
   failure first (they lost their pool, not their turn), then fair share — the tenant whose cards in use
   (running + placed in this plan) divided by its share is lowest goes next; within a tenant,
   submit time, then id.
2. Quota: a job that would push its tenant over ``quota_cards`` waits, saying so.
3. Placement: gang (all cards in one pool, one accelerator type); filters from ``placement``;
   cheapest expected cost wins (deadline-meeting pools first). A job whose cheapest start is a
   later tariff window waits for it (``Wait.until``), holding nothing.
4. Backfill (EASY, Lifka 1995): the first job that cannot start for lack of free cards is the head;
   it gets a reservation (the pool and time where enough cards free up, from running jobs' expected
   ends; of the pools freeing them within ``Policy.reserve_within_s`` of the earliest, the one
   where the wait holds the fewest free cards idle). Later jobs may use the reserved pool only if
   they end before the reservation or leave enough cards for it. One reservation per plan.
5. Preemption: if the head would wait longer than ``Policy.preempt_after_s`` and some pool can free
   enough cards by stopping jobs of lower priority, pick the pool that stops the lowest-priority,
   then fewest jobs; emit their stops (the service checkpoints, then stops them) and reserve that
   pool for the head. Jobs already stopping count as freeing their cards.

Promises: the plan never over-commits a (pool, accelerator): it debits free cards as it places.
Running time is O(jobs × scored pools) with branch-and-bound over pools sorted by a cheap lower
bound (energy at the pool's cheapest hour), so most jobs score only a few pools.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Generator, Hashable, Iterable

import msgspec

from controlplane.core.placement import (
    DEFAULT_MODEL,
    Filter,
    StaticFilter,
    filter_inputs,
    keyed_filters,
    pool_reason,
    search_checks,
    CostBreakdown,
    CostModel,
    Estimate,
    JobSpec,
    Pool,
    PricedPool,
    Verdict,
    breakdown,
    estimate,
    job_problem,
    metered_energy_cny,
    priced,
    static_reason,
)


class Tenant(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    quota_cards: int | None = None
    """Cards the tenant may hold at once (running + placed); None: no quota."""
    share: float = 1.0
    """Fair-share weight among tenants of equal priority."""
    quota_note: str = ""
    """Said after a quota wait (e.g. where part of the quota went)."""


class Running(msgspec.Struct, frozen=True, kw_only=True):
    """A job holding cards now (placed, starting or running)."""

    job_id: str
    tenant: str
    pool: str
    accelerator: str
    cards: int
    priority: int = 0
    expected_end_at: float | None = None
    """When it should finish (None: unknown; never counted on for a reservation)."""
    stopping: bool = False
    """A stop was already sent: its cards count as freeing now."""
    preemptible: bool = True


class Policy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    score_cap: int = 32
    """At most this many pools get a cost estimate per job (best lower bound first). On the bench's
    synthetic network, 32 keeps the mean cost per placed job within ~1% of estimating every pool
    at ~5x the speed (docs/training.md)."""
    explain_others: int = 3
    """How many losing pools each decision explains."""
    backfill: bool = True
    preemption: bool = True
    preempt_after_s: float = 600.0
    """Preempt only if the head would otherwise wait longer than this."""
    reserve_within_s: float = 1800.0
    """The head's reservation may go to a pool whose cards free up this much later than the
    earliest, when waiting there holds fewer free cards idle (docs/training.md, "Backfill");
    0: always the earliest (EASY's rule)."""


DEFAULT_POLICY = Policy()

LONG_JOB_H = 48.0
"""Jobs at least this long (A800-equivalent hours left) use the day-average lower bound."""


class Snapshot(msgspec.Struct, kw_only=True):
    pools: list[Pool]
    queued: list[JobSpec]
    running: list[Running] = []
    tenants: dict[str, Tenant] = {}
    model: CostModel = DEFAULT_MODEL
    policy: Policy = DEFAULT_POLICY


class Explanation(msgspec.Struct, frozen=True, kw_only=True):
    chosen: str
    """Why this pool: its cost breakdown in words."""
    others: list[Verdict] = []
    """The next best pools and why they lost (cost delta, or the filter that excluded them)."""


class Placement(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str
    tenant: str
    pool: str
    accelerator: str
    cards: int
    start_at: float
    breakdown: CostBreakdown
    explanation: Explanation


class Preemption(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str
    pool: str
    reason: str
    for_job: str


class Wait(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str
    reason: str
    until: float | None = None
    """Set when the job waits for a cheaper tariff window (then ``pool`` is where)."""
    pool: str = ""

    @property
    def kind(self) -> str:
        """:func:`wait_kind` of the reason."""
        return wait_kind(self.reason)


WAIT_KINDS: tuple[tuple[str, str], ...] = (
    ("waits ", "tariff"),
    ("quota:", "quota"),
    ("head of queue", "reserved"),
    ("preempting", "preempting"),
    ("no pool has", "cards"),
)
"""Reason prefix -> the kind of a wait (then: ``price`` or ``blocked``, see :func:`wait_kind`)."""


def wait_kind(reason: str) -> str:
    """What a wait (by its reason, as stored) is for: ``tariff`` (a cheaper window), ``quota``,
    ``reserved`` (head of the queue), ``preempting``, ``cards`` (none free), ``price`` (every pool
    with room is over the job's price cap) or ``blocked`` (pools with room refused it, another
    job's reservation among the reasons); ``""`` for a reason no wait gives (the lifecycle's, such
    as a requeue's "stopped: ...")."""
    for prefix, kind in WAIT_KINDS:
        if reason.startswith(prefix):
            return kind
    parts = reason.split("; ")
    if all("over max_price" in part for part in parts):
        return "price"
    if any("would delay" in part or "over max_price" in part for part in parts):
        return "blocked"
    return ""


def wait_topic(kind: str) -> str:
    """The kinds a job's events tell apart: waiting for cards in any way (``cards``, ``reserved``,
    ``blocked``: which one changes as other jobs come and go) is one topic, ``capacity``; every
    other kind is its own. A job's events gain a ``waiting`` entry when its topic changes."""
    return "capacity" if kind in ("cards", "reserved", "blocked") else kind


class Infeasible(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str
    reasons: list[str]


class Reservation(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str
    pool: str
    accelerator: str
    cards: int
    at: float


class Plan(msgspec.Struct, kw_only=True):
    start: list[Placement] = []
    stop: list[Preemption] = []
    wait: list[Wait] = []
    infeasible: list[Infeasible] = []
    reservation: Reservation | None = None

    @property
    def decisions(self) -> int:
        """Jobs decided (started, told to wait, or found infeasible)."""
        return len(self.start) + len(self.wait) + len(self.infeasible)

    def __repr__(self) -> str:
        return (f"Plan(start={len(self.start)}, stop={len(self.stop)}, wait={len(self.wait)}, "
                f"infeasible={len(self.infeasible)}, reservation={self.reservation is not None})")


# --------------------------------------------------------------------------- internals


class _Entry:
    """One (pool, accelerator) during a plan: its priced figures and free cards, mutated as we place."""

    __slots__ = ("pp", "pool", "acc", "free", "lb_rate", "avg_rate", "runs", "in_avail", "down", "keys")

    def __init__(self, pp: PricedPool, free: int, keyed: tuple[StaticFilter, ...]) -> None:
        self.pp = pp
        self.pool = pp.pool
        self.acc = pp.acc
        self.free = free
        self.lb_rate = pp.lb_rate
        self.avg_rate = pp.avg_rate
        self.runs: list[_Run] = []
        self.in_avail = free > 0
        self.down = pool_reason(pp.pool, pp.acc)
        """The pool-only filters' verdict (unhealthy, draining, ...): the same for every job."""
        self.keys = tuple(f.pool_key(pp.pool) for f in keyed if f.pool_key is not None)
        """This pool's key for each keyed filter (``placement.keyed_filters()`` order)."""


class _Run:
    __slots__ = ("job_id", "priority", "cards", "end", "stopping", "preemptible")

    def __init__(self, job_id: str, priority: int, cards: int, end: float, stopping: bool, preemptible: bool) -> None:
        self.job_id = job_id
        self.priority = priority
        self.cards = cards
        self.end = end
        self.stopping = stopping
        self.preemptible = preemptible


_Check = tuple[Filter, int, dict[Hashable, "str | None"]]
"""(filter, index of its key in ``_Entry.keys`` or -1, its verdict by key for one job shape)"""

_Cand = tuple[int, float, int, "_Entry", Estimate]
"""(misses deadline 0/1, total CNY, order scored, entry, estimate): tuples compare fast."""


def _smallest(cands: list[_Cand], chosen: _Entry, k: int) -> list[_Cand]:
    return heapq.nsmallest(k, (c for c in cands if c[3] is not chosen))


class _Res:
    __slots__ = ("job_id", "entry", "cards", "at", "spare")

    def __init__(self, job_id: str, entry: _Entry, cards: int, at: float, spare: int) -> None:
        self.job_id = job_id
        self.entry = entry
        self.cards = cards
        self.at = at
        self.spare = spare


class _Planner:
    def __init__(self, snap: Snapshot, now: float) -> None:
        self.now = now
        self.model = snap.model
        self.policy = snap.policy
        self.tenants = snap.tenants
        self.plan = Plan(start=[], stop=[], wait=[], infeasible=[])
        self.pools_by_id = {p.id: p for p in snap.pools}
        cache: dict[object, list[float]] = {}
        self.keyed = keyed_filters()
        self.entries: dict[tuple[str, str], _Entry] = {}
        by_acc: dict[str, list[_Entry]] = defaultdict(list)
        for pool in snap.pools:
            for acc, total in pool.cards_total.items():
                if total <= 0:
                    continue
                free = max(0, min(int(pool.cards_free.get(acc, 0)), total))
                e = _Entry(priced(pool, acc, cache), free, self.keyed)
                self.entries[(pool.id, acc)] = e
                by_acc[acc].append(e)
        for lst in by_acc.values():
            lst.sort(key=lambda e: (e.lb_rate, e.pool.id))
        self.by_acc = dict(by_acc)
        # Pools with free cards, in lower-bound order; entries leave when they fill up.
        self.avail = {acc: [e for e in lst if e.free > 0] for acc, lst in self.by_acc.items()}
        # Long jobs walk the same entries ordered by the day-average bound (see PricedPool).
        self.avail_long = {acc: sorted(lst, key=lambda e: (e.avg_rate, e.pool.id)) for acc, lst in self.avail.items()}
        self.slack = {acc: max(e.pp.day_slack for e in lst) for acc, lst in self.by_acc.items()}
        self.max_free = {acc: max((e.free for e in lst), default=0) for acc, lst in self.avail.items()}
        self.usage: dict[str, int] = defaultdict(int)
        for r in snap.running:
            self.usage[r.tenant] += r.cards
            entry = self.entries.get((r.pool, r.accelerator))
            if entry is not None:
                end = now if r.stopping else (math.inf if r.expected_end_at is None else r.expected_end_at)
                entry.runs.append(_Run(r.job_id, r.priority, r.cards, end, r.stopping, r.preemptible))
        self.res: _Res | None = None
        self.tou_cache: dict[tuple[int, float, float], tuple[list[float], list[int]]] = {}
        self.static_cache: dict[tuple[object, ...], tuple[list[_Entry], list[str]]] = {}
        # One pool per distinct key of each keyed filter (placement.keyed_filters()) in this plan.
        self.key_pools: list[dict[Hashable, _Entry]] = [{} for _ in self.keyed]
        for e in self.entries.values():
            for i, k in enumerate(e.keys):
                self.key_pools[i].setdefault(k, e)
        # placement.STATIC_FILTERS as the search runs them, per job shape (placement.FILTER_INPUTS):
        # one list of filters for placement and this search; the verdicts by key keep it fast.
        self.checks: dict[tuple[object, ...], list[_Check]] = {}

    def checks_for(self, job: JobSpec) -> list[_Check]:
        """The static filters the search runs for ``job`` (and every job with its filter inputs):
        ``placement.search_checks``, each keyed one with its verdict for every key in this plan,
        and left out when it passes them all (then it passes every pool here)."""
        key = filter_inputs(job)
        checks = self.checks.get(key)
        if checks is None:
            checks = []
            index = {f.name: i for i, f in enumerate(self.keyed)}
            for f in search_checks(job):
                i = index.get(f.name, -1)
                if i < 0:
                    checks.append((f.check, -1, {}))
                    continue
                by_key = {k: f.check(job, e.pool, e.acc) for k, e in self.key_pools[i].items()}
                if any(v is not None for v in by_key.values()):
                    checks.append((f.check, i, by_key))
            self.checks[key] = checks
        return checks

    # ----------------------------------------------------------------- order

    def order(self, queued: list[JobSpec]) -> Iterable[JobSpec]:
        levels: dict[int, dict[str, list[JobSpec]]] = defaultdict(lambda: defaultdict(list))
        for job in queued:
            levels[job.priority][job.tenant].append(job)
        for prio in sorted(levels, reverse=True):
            queues = levels[prio]
            # Jobs restarting after an infrastructure failure keep their place: they go first
            # (oldest first), before fair share orders the rest of the level.
            back = sorted((j for js in queues.values() for j in js if j.restarting),
                          key=lambda j: (j.submitted_at, j.id))
            if back:
                yield from back
                for tenant in list(queues):
                    queues[tenant] = [j for j in queues[tenant] if not j.restarting]
                    if not queues[tenant]:
                        del queues[tenant]
            heap = []
            for tenant, jobs in queues.items():
                jobs.sort(key=lambda j: (j.submitted_at, j.id), reverse=True)  # pop() from the end
                heap.append((self._ratio(tenant), jobs[-1].submitted_at, tenant))
            heapq.heapify(heap)
            while heap:
                _, _, tenant = heapq.heappop(heap)
                jobs = queues[tenant]
                yield jobs.pop()
                if jobs:
                    heapq.heappush(heap, (self._ratio(tenant), jobs[-1].submitted_at, tenant))

    def order_key(self, job: JobSpec) -> tuple[int, int, float, float, str, str]:
        """Where :meth:`order` puts ``job`` while usage stays as it is (no job placed): a total
        order (priority; restarts first, oldest first; then fair share's merge of the tenants'
        queues by their ratio, submit time, tenant; within a tenant by id)."""
        if job.restarting:
            return (-job.priority, 0, job.submitted_at, 0.0, "", job.id)
        return (-job.priority, 1, self._ratio(job.tenant), job.submitted_at, job.tenant, job.id)

    def _ratio(self, tenant: str) -> float:
        t = self.tenants.get(tenant)
        share = t.share if t is not None and t.share > 0 else (1e-9 if t is not None else 1.0)
        return self.usage[tenant] / share

    # ----------------------------------------------------------------- one job

    def decide(self, job: JobSpec) -> None:
        plan = self.plan
        problem = job_problem(job)
        if problem is not None:
            plan.infeasible.append(Infeasible(job_id=job.id, reasons=[problem]))
            return
        tenant = self.tenants.get(job.tenant)
        if tenant is not None and tenant.quota_cards is not None:
            used = self.usage[job.tenant]
            if used + job.cards > tenant.quota_cards:
                note = f" ({tenant.quota_note})" if tenant.quota_note else ""
                plan.wait.append(Wait(job_id=job.id, reason=(
                    f"quota: tenant {job.tenant} holds {used} of {tenant.quota_cards} cards, job needs {job.cards}{note}")))
                return
        cards = job.cards
        max_free = self.max_free
        if any(max_free.get(acc, 0) >= cards for acc in job.accelerators):
            best, cands, lost, blocked = self.search(job)
            if best is not None:
                e = best[3]
                bd = breakdown(job, e.pp, self.now, best[4])
                if bd.start_at > self.now:
                    # Wait only if that beats starting now at the best pool that can, by the threshold.
                    now_best, now_cands, now_lost, _ = self.search(msgspec.structs.replace(job, prefer="time"))
                    if now_best is None or now_best[0] > best[0] or \
                            now_best[1] - best[1] >= self.model.min_wait_saving * now_best[1]:
                        plan.wait.append(Wait(job_id=job.id, until=bd.start_at, pool=bd.pool,
                                              reason=self.tariff_reason(job, bd, now_best)))
                        return
                    e = now_best[3]
                    bd = breakdown(job, e.pp, self.now, now_best[4])
                    cands, lost = now_cands, now_lost
                self.place(job, bd, e, cands, lost)
                return
            if blocked:
                plan.wait.append(Wait(job_id=job.id, reason="; ".join(blocked[:3])))
                return
        static, reasons = self.static_entries(job)
        if not static:
            plan.infeasible.append(Infeasible(job_id=job.id, reasons=reasons))
            return
        if self.res is None and self.policy.backfill:
            self.head(job, static)
            return
        why = f"no pool has {cards} free {'/'.join(job.accelerators)} cards"
        if self.res is not None:
            why += f"; behind {self.res.job_id} (reserved {self.res.entry.pool.id} at {self.res.at:.0f})"
        plan.wait.append(Wait(job_id=job.id, reason=why))

    def tariff_reason(self, job: JobSpec, bd: CostBreakdown, now_best: _Cand | None) -> str:
        """Why ``job`` waits for a cheaper window: the wait, the saving against starting now, the rule."""
        why = "cost-first" if job.deadline is None else "cost-first, its deadline allows it"
        head = f"waits {(bd.start_at - self.now) / 3600.0:.1f} h for a cheaper tariff window at {bd.pool}"
        rule = f"threshold {self.model.min_wait_saving:.0%}; {why}"
        if now_best is None:
            return f"{head}: no pool may start it now (its price cap, another job's reservation; {rule})"
        saving = now_best[1] - bd.total_cny
        return (f"{head}: saves {saving:.2f} CNY ({saving / now_best[1]:.0%}) against starting now at "
                f"{now_best[3].pool.id} ({now_best[1]:.2f} CNY; {rule})")

    def search(self, job: JobSpec) -> tuple[_Cand | None, list[_Cand], list[Verdict], list[str]]:
        """Branch and bound over pools with free cards, cheapest lower bound first.

        Returns (best, every candidate estimated, filtered verdicts, why pools with room were refused).
        """
        now = self.now
        model = self.model
        cards = job.cards
        cap = self.policy.score_cap
        explain = self.policy.explain_others
        scale = cards * job.est_hours * (1.0 - job.progress)  # A800-equivalent card-hours
        long = job.est_hours * (1.0 - job.progress) >= LONG_JOB_H
        source = self.pools_by_id.get(job.checkpoint_pool) if job.checkpoint_pool else None
        max_price = job.max_price_cny
        res = self.res
        tou = self.tou_cache
        checks = self.checks_for(job)
        best: _Cand | None = None
        cands: list[_Cand] = []
        lost: list[Verdict] = []
        blocked: list[str] = []  # why pools with room were refused (price, reservation)
        pruned: list[tuple[float, _Entry]] = []  # (lower bound, entry) cut off by the bound
        n = 0
        for acc in job.accelerators:
            lst = (self.avail_long if long else self.avail).get(acc)
            if not lst or self.max_free.get(acc, 0) < cards:
                continue
            offset = cards * self.slack[acc] if long else 0.0
            for i, e in enumerate(lst):
                # Branch and bound: every later entry's lower bound is at least this one's.
                if best is not None and best[0] == 0 and \
                        (e.avg_rate if long else e.lb_rate) * scale - offset >= best[1]:
                    for nxt in lst[i:i + explain]:  # name a few of the pools cut off, for the explanation
                        pruned.append(((nxt.avg_rate if long else nxt.lb_rate) * scale - offset, nxt))
                    break
                if e.free < cards:
                    if len(lost) < explain:
                        lost.append(Verdict(pool=e.pool.id, accelerator=acc,
                                            reason=f"{e.free} free {acc} cards, job needs {cards}"))
                    continue
                pool = e.pool
                reason = e.down
                if reason is None and checks:
                    keys = e.keys
                    for check, i, by_key in checks:
                        reason = check(job, pool, acc) if i < 0 else by_key[keys[i]]
                        if reason is not None:
                            break
                if reason is not None:
                    if len(lost) < explain:
                        lost.append(Verdict(pool=pool.id, accelerator=acc, reason=reason))
                    continue
                est = estimate(job, e.pp, now, model, source, tou)
                total = est.total_cny
                n += 1
                if max_price is not None and total > max_price:
                    why = f"expected {total:.2f} CNY, over max_price {max_price:.2f}"
                    blocked.append(f"{pool.id}: {why}")
                    if len(lost) < explain:
                        lost.append(Verdict(pool=pool.id, accelerator=acc, reason=why, total_cny=total))
                elif res is not None and res.entry is e and est.start_at <= now and \
                        now + est.run_s > res.at and cards > res.spare:
                    why = f"would delay {res.job_id}, which has it reserved at {res.at:.0f}"
                    blocked.append(f"{pool.id}: {why}")
                    if len(lost) < explain:
                        lost.append(Verdict(pool=pool.id, accelerator=acc, reason=why, total_cny=total))
                else:
                    cand = (0 if est.meets_deadline else 1, total, n, e, est)
                    cands.append(cand)
                    if best is None or cand[:2] < best[:2]:
                        best = cand
                if n >= cap:
                    break
            if n >= cap:
                break
        if best is not None and pruned:
            pruned.sort(key=lambda x: x[0])
            cut = [Verdict(pool=e.pool.id, accelerator=e.acc, reason=(
                       f"costs at least {bound - best[1]:.2f} CNY more (lower bound)"))
                   for bound, e in pruned[:explain] if e is not best[3]]
            lost = cut + lost
        return best, cands, lost, blocked

    def place(self, job: JobSpec, bd: CostBreakdown, e: _Entry, cands: list[_Cand], lost: list[Verdict]) -> None:
        cards = job.cards
        acc = e.acc
        old = e.free
        e.free = old - cards
        if e.free <= 0 and e.in_avail:
            e.in_avail = False
            self.avail[acc].remove(e)
            self.avail_long[acc].remove(e)
        if old >= self.max_free[acc]:
            self.max_free[acc] = max((x.free for x in self.avail[acc]), default=0)
        self.usage[job.tenant] += cards
        end = bd.start_at + bd.run_s
        e.runs.append(_Run(job.id, job.priority, cards, end, False, False))
        res = self.res
        if res is not None and res.entry is e and end > res.at:
            res.spare -= cards
        self.plan.start.append(Placement(
            job_id=job.id, tenant=job.tenant, pool=e.pool.id, accelerator=acc, cards=cards,
            start_at=bd.start_at, breakdown=bd, explanation=self.explain(bd, e, cands, lost, cards)))

    def explain(self, bd: CostBreakdown, chosen: _Entry, cands: list[_Cand], lost: list[Verdict],
                cards: int = 0) -> Explanation:
        k = self.policy.explain_others
        offered = bd.accelerator in chosen.pp.pool.card_hour_cny
        text = (f"{bd.pool}/{bd.accelerator}: {bd.total_cny:.2f} CNY = {'offer price' if offered else 'energy'} "
                f"{bd.energy_cny:.2f} "
                f"+ failure waste {bd.failure_waste_cny:.2f} (MTBF {_hours(bd.mtbf_h)}, checkpoint every "
                f"{bd.interval_s / 60:.0f} min, waste {bd.waste_fraction:.1%}) + move {bd.move_cny:.2f}")
        if offered and cards:
            # What the owner's cards draw over the same run, by tariff: its margin over energy.
            energy = metered_energy_cny(chosen.pp.pool, bd.accelerator, cards, bd.start_at, bd.start_at + bd.work_s)
            text += f" (the owner's energy {energy:.2f}, margin over it {bd.energy_cny - energy:.2f})"
        if bd.notes:
            text += "; " + "; ".join(bd.notes)
        others: list[Verdict] = []
        if len(cands) > 1:
            for miss, total, _, e, _ in _smallest(cands, chosen, k):
                why = "misses the deadline" if bd.meets_deadline and miss else \
                    f"costs {total - bd.total_cny:.2f} CNY more"
                others.append(Verdict(pool=e.pool.id, accelerator=e.acc, reason=why, total_cny=total))
        if len(others) < k:
            others.extend(lost[: k - len(others)])
        if not others:
            others.append(Verdict(pool="*", accelerator=bd.accelerator,
                                  reason="every other pool's lower bound was above this cost"))
        return Explanation(chosen=text, others=others)

    # ----------------------------------------------------------------- head of queue

    def static_entries(self, job: JobSpec) -> tuple[list[_Entry], list[str]]:
        """Entries passing the static filters (cached per job shape), else the reasons none do."""
        key = (job.accelerators, job.cards, job.regions, job.providers, job.tee, job.workload, job.pools)
        hit = self.static_cache.get(key)
        if hit is not None:
            return hit
        ok: list[_Entry] = []
        counts: dict[str, int] = defaultdict(int)
        for acc in job.accelerators:
            lst = self.by_acc.get(acc)
            if not lst:
                counts[f"no pool has {acc} cards"] += 1
                continue
            for e in lst:
                reason = static_reason(job, e.pool, acc)
                if reason is None:
                    ok.append(e)
                else:
                    counts[reason] += 1
        reasons = [f"{n} pool(s): {r}" if not r.startswith("no pool") else r
                   for r, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
        self.static_cache[key] = (ok, reasons)
        return ok, reasons

    def head(self, job: JobSpec, static: list[_Entry]) -> None:
        now = self.now
        cards = job.cards
        best: tuple[float, float, str, int, _Entry] | None = None  # (at, lb, pool id, spare, entry)
        found: list[tuple[float, float, str, int, _Entry]] = []
        for e in static:
            free = e.free
            at = now
            if free < cards:
                at = math.inf
                for r in sorted(e.runs, key=lambda r: r.end):
                    if r.end == math.inf:
                        break
                    free += r.cards
                    if free >= cards:
                        at = max(r.end, now)
                        break
            if at == math.inf:
                continue
            # Spare: cards still free at `at` beyond the head's need (later ends add more).
            spare = free - cards
            cand = (at, e.lb_rate, e.pool.id, spare, e)
            found.append(cand)
            if best is None or cand[:3] < best[:3]:
                best = cand
        if self.policy.preemption and (best is None or best[0] - now > self.policy.preempt_after_s):
            if self.preempt(job, static):
                return
        if best is not None and best[0] > now and self.policy.reserve_within_s > 0:
            best = self.least_idle(best, found, cards)
        if best is None:
            self.plan.wait.append(Wait(job_id=job.id, reason=(
                f"no pool has {cards} free {'/'.join(job.accelerators)} cards and no running job has a known end")))
            return
        at, _, pool_id, spare, e = best
        self.res = _Res(job.id, e, cards, at, spare)
        self.plan.reservation = Reservation(job_id=job.id, pool=pool_id, accelerator=e.acc, cards=cards, at=at)
        self.plan.wait.append(Wait(job_id=job.id, pool=pool_id, reason=(
            f"head of queue: {cards} {e.acc} cards free up at {pool_id} in {(at - now) / 60:.0f} min (reserved)")))

    def least_idle(self, earliest: tuple[float, float, str, int, _Entry],
                   found: list[tuple[float, float, str, int, _Entry]], cards: int) -> tuple[float, float, str, int, _Entry]:
        """Of the pools where the head's cards free up within ``reserve_within_s`` of the earliest,
        the one where waiting holds the fewest card-seconds idle: the cards free there now that the
        head will take (no other job may use them unless it ends first) times the wait; then the
        earliest, cheapest. A pool with none free now holds none idle: the cards free at the
        earliest pool stay open to the jobs behind."""
        now = self.now
        limit = earliest[0] + self.policy.reserve_within_s
        return min((c for c in found if c[0] <= limit),
                   key=lambda c: (min(c[4].free, cards) * (c[0] - now), c[0], c[1], c[2], c[4].acc))

    def preempt(self, job: JobSpec, static: list[_Entry]) -> bool:
        cards = job.cards
        best: tuple[tuple[int, int, int, float, str], _Entry, list[_Run], int] | None = None
        for e in static:
            avail = e.free + sum(r.cards for r in e.runs if r.stopping)
            if avail >= cards:
                continue  # already freeing enough: the reservation covers it
            cands = sorted((r for r in e.runs if not r.stopping and r.preemptible and r.priority < job.priority),
                           key=lambda r: (r.priority, -r.cards, r.job_id))
            victims: list[_Run] = []
            for r in cands:
                if avail >= cards:
                    break
                victims.append(r)
                avail += r.cards
            if avail < cards:
                continue
            key = (max(r.priority for r in victims), len(victims), sum(r.cards for r in victims), e.lb_rate, e.pool.id)
            if best is None or key < best[0]:
                best = (key, e, victims, avail)
        if best is None:
            return False
        _, e, victims, avail = best
        for r in victims:
            r.stopping = True
            r.end = self.now
            self.plan.stop.append(Preemption(job_id=r.job_id, pool=e.pool.id, for_job=job.id, reason=(
                f"preempted (priority {r.priority}) for {job.id} (priority {job.priority}) needing {cards} {e.acc} cards")))
        self.res = _Res(job.id, e, cards, self.now, avail - cards)
        self.plan.reservation = Reservation(job_id=job.id, pool=e.pool.id, accelerator=e.acc, cards=cards, at=self.now)
        self.plan.wait.append(Wait(job_id=job.id, pool=e.pool.id, reason=(
            f"preempting {len(victims)} lower-priority job(s) at {e.pool.id} to free {cards} {e.acc} cards")))
        return True


def plan(snapshot: Snapshot, now: float) -> Plan:
    """Decide, for every queued job, start / wait / infeasible, and which running jobs to stop.

    Pure and deterministic for a given snapshot and ``now``.
    """
    steps = plan_steps(snapshot, now)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            result: Plan = done.value
            return result


def plan_steps(snapshot: Snapshot, now: float, *, every: int = 0) -> Generator[None, None, Plan]:
    """:func:`plan` in steps: a generator that pauses (yields None) after every ``every`` decisions
    (never, for 0) and returns the plan, the same one :func:`plan` makes. A caller on an event
    loop lets other work run between the steps of a long queue; the snapshot is its own (plain
    data), so nothing it holds changes meanwhile."""
    result, _ = yield from plan_basis_steps(snapshot, now, every=every)
    return result


def plan_basis_steps(snapshot: Snapshot, now: float, *, every: int = 0
                     ) -> Generator[None, None, tuple[Plan, Basis | None]]:
    """:func:`plan_steps` (its only loop) that also returns the plan's :class:`Basis` for
    :func:`plan_more`, or None when the plan started or stopped a job (then the next plan is a
    full one: what it placed changed what every other job sees)."""
    planner = _Planner(snapshot, now)
    for n, job in enumerate(planner.order(snapshot.queued), 1):
        planner.decide(job)
        if every and n % every == 0:
            yield None
    result = planner.plan
    if result.start or result.stop:
        return result, None
    return result, Basis(planner, snapshot.queued, now)


class Basis:
    """What a full plan that started and stopped nothing leaves behind, for :func:`plan_more`: the
    planner as its last decision left it (free cards, usage, the head's reservation; none of them
    changed during the plan but the reservation, set once by the head), the jobs it decided, and
    the head's place in the queue's order. Owned by one caller; :func:`plan_more` adds to it.

    Why planning only new jobs against it gives the full plan's decisions: a plan that places and
    stops nothing leaves free cards and usage as they were, so fair share's order is a fixed sort
    (:meth:`_Planner.order_key`) and every decision depends on the job, that fixed state and
    whether the head's reservation stands before it. A new job ordered after the head, whose own
    decision again places, stops and reserves nothing, sees what it would see in the full plan
    and changes nothing any other job sees. Anything else makes :func:`plan_more` answer None."""

    __slots__ = ("_planner", "now", "ids", "until", "head_key", "spent")

    def __init__(self, planner: _Planner, queued: list[JobSpec], now: float) -> None:
        self._planner = planner
        planner.tenants = dict(planner.tenants)  # plan_more adds the new jobs' tenants
        self.now = now
        self.ids = {j.id for j in queued}
        """Every job decided so far (the full plan's and each plan_more's)."""
        self.until = min((w.until for w in planner.plan.wait if w.until is not None), default=math.inf)
        """The earliest tariff window a decided job waits for: from then on, only a full plan."""
        res = planner.res
        head = next((j for j in queued if j.id == res.job_id), None) if res is not None else None
        self.head_key = planner.order_key(head) if head is not None else None
        self.spent = False
        """Set when a plan_more found a new job that changes what others see: the basis is no longer the plan's."""

    @property
    def reservation(self) -> Reservation | None:
        """The head's reservation, as the full plan made it (it stands for every later job)."""
        res = self._planner.res
        return None if res is None else Reservation(job_id=res.job_id, pool=res.entry.pool.id,
                                                    accelerator=res.entry.acc, cards=res.cards, at=res.at)

    def __repr__(self) -> str:
        return f"Basis(jobs={len(self.ids)}, head={self.head_key is not None}, spent={self.spent})"


def plan_more(basis: Basis, new: list[JobSpec], now: float, *,
              tenants: dict[str, Tenant] | None = None) -> Plan | None:
    """The decisions for jobs ``new`` added to the queue ``basis`` was planned with, when nothing
    else changed (pools, running jobs, tenants: the caller compares), in O(len(new)) rather than
    O(queue): the plan of only the new jobs (never a start, stop or reservation), or None when
    only a full plan can decide them (see :class:`Basis`): a new job that orders before the head
    or whose decision would start, stop or reserve; a tenant that changed; ``now`` at or past a
    decided job's tariff window (or before the basis). At the basis's ``now`` the decisions are
    the ones :func:`plan` makes for these jobs with the whole queue. At a later ``now`` the new
    jobs are decided at ``now`` and the old ones keep their basis decisions: the caller bounds how
    long it plans so before a full plan again. Jobs ``basis`` already decided are skipped.

    Pure: the same basis, jobs and ``now`` give the same plan; the basis remembers the new jobs."""
    if basis.spent or now < basis.now or now >= basis.until:
        return None
    planner = basis._planner
    for tid, tenant in (tenants or {}).items():
        known = planner.tenants.get(tid)
        if known is None:
            planner.tenants[tid] = tenant
        elif known != tenant:
            return None
    jobs = [j for j in new if j.id not in basis.ids]
    if basis.head_key is not None and any(planner.order_key(j) < basis.head_key for j in jobs):
        return None
    if now != planner.now:
        planner.now = now
        planner.tou_cache = {}
    res = planner.res
    planner.plan = out = Plan(start=[], stop=[], wait=[], infeasible=[])
    for job in jobs:
        planner.decide(job)
        if out.start or out.stop or planner.res is not res:
            basis.spent = True
            return None
        basis.ids.add(job.id)
    basis.until = min([basis.until, *(w.until for w in out.wait if w.until is not None)])
    return out


def _hours(h: float | None) -> str:
    return "no failures declared" if h is None else f"{h:.1f} h"
