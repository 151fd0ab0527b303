"""Training on a simulated clock: the hub's scheduler and job lifecycle, with baselines. Pure.

What it promises:

- The cpn policy is ``scheduler.plan(Snapshot, now)`` over pools built by
  ``placement.pool_from_site``; jobs move through ``lifecycle`` (``place``, ``Checkpointed`` /
  ``AttemptExited`` events via ``apply_event``, ``infra_failure``), and every attempt's card time is
  billed from the lifecycle's ``Meter`` effects with ``placement.metered_energy_cny`` (time-of-use).
- Baselines run the same job stream and the same failure draws (``core_workload.FaultClock``):
  ``nearest-hub`` (each job goes to the hub nearest its origin that can ever hold it, first fit,
  no tariff awareness) and ``random`` (a random pool among those with room now). Both checkpoint at
  Daly's interval for their pool, so cost differences come from placement and timing alone.
- Attempt model: ``restart_s`` of set-up (plus moving the checkpoint when restarting away from
  it), then cycles of ``T`` compute + ``C`` checkpoint writing; no checkpoint after the last
  segment. A failure after ``variate × 3600 / (cards × failure rate)`` seconds (an N-card gang fails
  N times as often) loses the work since the last completed checkpoint. A stop (preemption,
  lending reclaimed) checkpoints what was computed and requeues the job. The planner is told when
  an attempt is expected to end (start + the expected run time, failure waste included, as the
  hub's ``TrainingService`` tells it), never when its drawn failure comes.
- Ticks: the planner runs at most every ``tick_s``, and only when something changed (arrival,
  end, failure, outage, a larger lending offer) or a job's tariff wait is over.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import msgspec

from controlplane.core import checkpointing, lifecycle, placement, scheduler
from controlplane.tools.sim.core_workload import JobDraw, Rng
from edge_agent import wire
from topology import layout as tlayout


@dataclass(slots=True)
class Decisions:
    """What a planner decided in one tick: starts ``(job, pool, accelerator, interval_s)``,
    stops (job ids to checkpoint and stop), and times at which it wants to be asked again."""

    starts: list[tuple[str, str, str, float]] = field(default_factory=list)
    stops: list[str] = field(default_factory=list)
    wake: list[float] = field(default_factory=list)
    infeasible: list[str] = field(default_factory=list)
    waits: list[tuple[str, str]] = field(default_factory=list)
    """(job, kind of wait: ``scheduler.wait_kind``) for every job told to wait with a reason."""


Planner = Callable[[scheduler.Snapshot, float], Decisions]


def cpn_planner(snap: scheduler.Snapshot, now: float) -> Decisions:
    """The hub's own scheduler, unchanged."""
    plan = scheduler.plan(snap, now)
    return Decisions(
        starts=[(p.job_id, p.pool, p.accelerator, p.breakdown.interval_s) for p in plan.start],
        stops=[s.job_id for s in plan.stop],
        wake=[w.until for w in plan.wait if w.until is not None],
        infeasible=[i.job_id for i in plan.infeasible],
        waits=[(w.job_id, w.kind) for w in plan.wait],
    )


def _daly(job: placement.JobSpec, pool: placement.Pool, acc: str, model: placement.CostModel) -> float:
    rate = pool.failure_rate_per_card_hour
    mtbf = 3600.0 / (rate * job.cards) if rate > 0 else math.inf
    work_s = job.est_hours * 3600.0 * (1.0 - job.progress) / pool.units.get(acc, 1.0)
    return checkpointing.practical_unchecked(checkpointing.daly_unchecked(job.checkpoint_cost_s, mtbf), work_s,
                                             model.checkpoint_floor_s)


def _order(snap: scheduler.Snapshot) -> list[placement.JobSpec]:
    return sorted(snap.queued, key=lambda j: (-j.priority, not j.restarting, j.submitted_at, j.id))


def nearest_hub_planner(home: Mapping[str, Sequence[str]]) -> Planner:
    """Baseline: each job to the hub nearest its origin that could ever hold it; first fit there.

    ``home[job_id]`` lists hub pool ids by RTT from the job's origin.
    """

    def plan(snap: scheduler.Snapshot, now: float) -> Decisions:
        pools = {p.id: p for p in snap.pools}
        free = {(p.id, a): n for p in snap.pools for a, n in p.cards_free.items()}
        out = Decisions()
        for job in _order(snap):
            target = None
            for pid in home.get(job.id, ()):
                pool = pools.get(pid)
                if pool is None:
                    continue
                accs = [a for a in job.accelerators if placement.static_reason(job, pool, a) is None]
                if accs:
                    target = (pool, accs)
                    break
            if target is None:
                out.infeasible.append(job.id)
                continue
            pool, accs = target
            for acc in accs:
                if free[(pool.id, acc)] >= job.cards:
                    free[(pool.id, acc)] -= job.cards
                    out.starts.append((job.id, pool.id, acc, _daly(job, pool, acc, snap.model)))
                    break
        return out

    return plan


def random_planner(rng: Rng) -> Planner:
    """Baseline: a uniformly random pool among those with room for the job now."""

    def plan(snap: scheduler.Snapshot, now: float) -> Decisions:
        free = {(p.id, a): n for p in snap.pools for a, n in p.cards_free.items()}
        out = Decisions()
        # The (pool, accelerator) pairs passing the static filters, per job shape (the filters read
        # only ``placement.FILTER_INPUTS`` of a job, and the accelerator): asked once per plan.
        static: dict[tuple[object, ...], list[tuple[placement.Pool, str]]] = {}
        for job in _order(snap):
            key = (placement.filter_inputs(job), job.accelerators)
            passing = static.get(key)
            if passing is None:
                passing = static[key] = [(p, a) for p in snap.pools for a in job.accelerators
                                         if a in p.cards_total and placement.static_reason(job, p, a) is None]
            ok = [(p, a) for p, a in passing if free[(p.id, a)] >= job.cards]
            if not ok:
                if not passing:
                    out.infeasible.append(job.id)
                continue
            pool, acc = ok[int(rng.random() * len(ok))]
            free[(pool.id, acc)] -= job.cards
            out.starts.append((job.id, pool.id, acc, _daly(job, pool, acc, snap.model)))
        return out

    return plan


class _Attempt:
    __slots__ = ("number", "pool", "acc", "cards", "start", "setup_s", "move_s", "interval_s", "ckpt_s",
                 "work_s", "units", "end", "failing", "expected_w", "min_w", "after_failure", "expected_end",
                 "running")
    number: int
    pool: str
    acc: str
    cards: int
    start: float
    setup_s: float
    move_s: float
    interval_s: float
    ckpt_s: float
    work_s: float
    units: float
    end: float
    """When the attempt ends: its completion, or its failure (drawn ahead; the planner never sees it)."""
    expected_end: float
    """When the hub expects it to end: start + the expected run time (placement's ``run_s``, failure
    waste included), as ``TrainingService`` tells the scheduler (``Running.expected_end_at``)."""
    running: scheduler.Running
    """What the planner is told of it while it runs (made once per attempt: it does not change)."""
    failing: bool
    expected_w: float
    min_w: float
    after_failure: bool

    def __init__(self) -> None:
        self.end = 0.0
        self.failing = False


class _Job:
    __slots__ = ("draw", "rec", "spec", "att", "first_start", "done_at", "fail_at", "infeasible", "cost_cny",
                 "card_s", "useful_s", "work_a800_card_h", "wait_kinds", "planned")

    def __init__(self, draw: JobDraw) -> None:
        self.draw = draw
        self.rec = lifecycle.JobRecord(id=draw.id, tenant=draw.tenant, cards=draw.cards, updated_at=draw.submitted_at)
        self.spec = placement.JobSpec(
            id=draw.id, tenant=draw.tenant, cards=draw.cards, accelerators=draw.accelerators,
            est_hours=draw.est_hours, checkpoint_cost_s=draw.checkpoint_cost_s, priority=draw.priority,
            deadline=draw.deadline, submitted_at=draw.submitted_at,
            prefer="cost" if draw.prefer == "cost" else None)
        self.planned = False
        """The planner has seen this job since it last entered the queue (it waits by decision)."""
        self.wait_kinds: set[str] = set()
        """Kinds of wait the planner gave this job a reason for (``scheduler.wait_kind``)."""
        self.att: _Attempt | None = None
        self.first_start: float | None = None
        self.done_at: float | None = None
        self.fail_at: float | None = None
        self.infeasible = False
        self.cost_cny = 0.0
        self.card_s = 0.0
        self.useful_s = 0.0
        self.work_a800_card_h = 0.0


class Waste:
    """Card-seconds by where they went."""

    def __init__(self) -> None:
        self.useful = 0.0
        self.checkpoint = 0.0
        self.lost = 0.0
        self.setup_first = 0.0
        self.setup_restart = 0.0
        self.move = 0.0
        self.expected_w_x_useful = 0.0
        self.min_w_x_useful = 0.0


class TrainingSim:
    """One training policy over the run: its pools, queue, attempts and accounting."""

    def __init__(self, name: str, planner: Planner, lay: tlayout.Layout, sites: Sequence[tlayout.Site],
                 jobs: Sequence[JobDraw], *, start_s: float, tick_s: float, failure_scale: float,
                 reserved_cards: Mapping[str, float], lent: Sequence[str] = (), detection_s: float = 3.0,
                 model: placement.CostModel = placement.DEFAULT_MODEL,
                 reserved_by_acc: Mapping[tuple[str, str], float] | None = None) -> None:
        self.name = name
        self.planner = planner
        self.accels = lay.accelerators
        self.sites = {s.id: s for s in sites}
        self.site_order = [s.id for s in sites]
        self.tick_s = tick_s
        self.failure_scale = failure_scale
        self.detection_s = detection_s
        self.model = model
        self.lent = set(lent)
        self.free: dict[tuple[str, str], int] = {}
        self.held: dict[str, int] = {}
        """Cards held by running attempts, per site (kept as they start and end)."""
        self.total: dict[tuple[str, str], int] = {}
        for s in sites:
            reserved = reserved_cards.get(s.id, 0.0)
            for acc, n in sorted(s.accelerators.items()):
                # Inference replicas hold cards first: of the type they use when known, else off
                # the types in name order.
                if reserved_by_acc is not None:
                    take = min(n, math.ceil(reserved_by_acc.get((s.id, acc), 0.0) - 1e-9))
                else:
                    take = min(n, int(math.ceil(reserved - 1e-9))) if reserved > 0 else 0
                reserved -= take
                self.total[(s.id, acc)] = n - take
                self.free[(s.id, acc)] = n - take
        self.healthy = {s.id: True for s in sites}
        self.draining = {s.id: False for s in sites}
        """A lent site without an offer is not draining (a static filter would find its gangs
        infeasible for good): it shows no free cards (``_pool``), so they wait, as live."""
        self.offered: dict[str, dict[str, int]] = {}
        """Lent sites: the cards new gangs may take there now (``offer``)."""
        self._pool_cache: dict[str, tuple[tuple[object, ...], placement.Pool]] = {}
        self.jobs = {d.id: _Job(d) for d in jobs}
        self.queue: dict[str, _Job] = {}
        self.running: dict[str, _Job] = {}
        self.heap: list[tuple[float, int, str, str, int]] = []
        self.seq = 0
        for d in jobs:
            self._push(d.submitted_at, "arrive", d.id, 0)
        self.now = start_s
        self.last_tick = -math.inf
        self.tick_at: float | None = None
        self.ticks = 0
        self.waste = Waste()
        self.card_failures = 0
        self.outage_failures = 0
        self.stops = 0
        self.recovery_s: list[float] = []
        self.lent_card_s = 0.0
        self.queue_delay_s: list[float] = []
        self.idle_waiting_card_s = 0.0
        self.waiting_card_s = 0.0
        self.metered: list[tuple[str, str, int, str, str, int, float, float]] = []
        """Every attempt's card time as billed: (job, tenant, attempt, pool, accelerator, cards, start, end)."""

    def __repr__(self) -> str:
        return f"<TrainingSim {self.name} queued={len(self.queue)} running={len(self.running)} ticks={self.ticks}>"

    # ------------------------------------------------------------------ events

    def _push(self, t: float, kind: str, job: str, n: int) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, job, n))

    def _want_tick(self, t: float) -> None:
        at = max(t, self.last_tick + self.tick_s)
        if self.tick_at is None or at < self.tick_at:
            self.tick_at = at
            self._push(at, "tick", "", 0)

    def advance(self, until: float) -> None:
        """Process every event up to ``until`` (inclusive)."""
        heap = self.heap
        while heap and heap[0][0] <= until:
            t, _, kind, jid, n = heapq.heappop(heap)
            self.now = t
            if kind == "arrive":
                self.queue[jid] = self.jobs[jid]
                self.jobs[jid].planned = False
                self._want_tick(t)
            elif kind == "end":
                job = self.jobs[jid]
                if job.att is not None and job.att.number == n:
                    self._end(job, t, "failure" if job.att.failing else "completed")
            elif kind == "tick":
                if self.tick_at == t:
                    self.tick_at = None
                    self._tick(t)
        self.now = max(self.now, until)

    # ------------------------------------------------------------------ pools

    def _pool(self, sid: str) -> placement.Pool:
        site = self.sites[sid]
        free = {acc: self.free[(sid, acc)] for acc in site.accelerators}
        total = {acc: self.total[(sid, acc)] for acc in site.accelerators}
        if sid in self.lent:  # lent cards: only what is offered now
            cap = self.offered.get(sid, {})
            free = {acc: min(n, cap.get(acc, 0)) for acc, n in free.items()}
            # All its cards, as live: what replicas hold there now they hold for hours, not for good
            # (a smaller total would find gangs infeasible for good); the offer already leaves them out.
            total = dict(site.accelerators)
        key = (tuple(free.values()), tuple(total.values()), self.healthy[sid], self.draining[sid])
        hit = self._pool_cache.get(sid)
        if hit is not None and hit[0] == key:
            return hit[1]
        pool = placement.pool_from_site(site, self.accels, free={a: float(n) for a, n in free.items()},
                                        healthy=self.healthy[sid], draining=self.draining[sid])
        # Cards held by replicas are not the scheduler's to give: the total it may use shrinks too.
        pool = msgspec.structs.replace(pool, cards_total={a: n for a, n in total.items() if n > 0},
                                       cards_free={a: n for a, n in pool.cards_free.items() if total[a] > 0})
        self._pool_cache[sid] = (key, pool)
        return pool

    def _tick(self, now: float) -> None:
        self.last_tick = now
        self.ticks += 1
        if not self.queue:
            return
        running = [j.att.running for j in self.running.values() if j.att is not None]
        snap = scheduler.Snapshot(pools=[self._pool(sid) for sid in self.site_order],
                                  queued=[j.spec for j in self.queue.values() if not j.infeasible],
                                  running=running, model=self.model)
        dec = self.planner(snap, now)
        for j in self.queue.values():
            j.planned = True
        for jid in dec.infeasible:
            self.jobs[jid].infeasible = True
        for jid, kind in dec.waits:
            self.jobs[jid].wait_kinds.add(kind)
        for jid in dec.stops:
            job = self.jobs[jid]
            if job.att is not None:
                self._end(job, now, "stopped", replan=False)
        for jid, pool, acc, interval_s in dec.starts:
            self._start(self.jobs[jid], pool, acc, interval_s, now)
        for t in dec.wake:
            if t > now:
                self._want_tick(t)
        if dec.stops:
            self._want_tick(now)

    # ------------------------------------------------------------------ attempts

    def _start(self, job: _Job, pool: str, acc: str, interval_s: float, now: float) -> None:
        d = job.draw
        if self.free[(pool, acc)] < d.cards:  # a planner bug would over-commit: refuse loudly
            raise AssertionError(f"{self.name}: {pool}/{acc} has {self.free[(pool, acc)]} free, {d.id} needs {d.cards}")
        site = self.sites[pool]
        after_failure = job.rec.state is lifecycle.JobState.RESTARTING
        job.rec = lifecycle.place(job.rec, pool, acc, now)
        self.free[(pool, acc)] -= d.cards
        self.held[pool] = self.held.get(pool, 0) + d.cards
        if pool in self.lent:  # a lending offer is used up by the gangs it takes (until offered anew)
            cap = self.offered.get(pool, {})
            cap[acc] = max(0, cap.get(acc, 0) - d.cards)
        self.queue.pop(d.id, None)
        self.running[d.id] = job
        if job.first_start is None:
            job.first_start = now
            self.queue_delay_s.append(now - d.submitted_at)
        if job.fail_at is not None:
            self.recovery_s.append(now - job.fail_at)
            job.fail_at = None
        a = _Attempt()
        a.number = job.rec.attempt
        a.pool, a.acc, a.cards, a.start = pool, acc, d.cards, now
        a.units = self.accels[acc].units if acc in self.accels else 1.0
        a.work_s = d.est_hours * 3600.0 * (1.0 - job.rec.progress) / a.units
        a.move_s = 0.0
        src = job.rec.checkpoint_pool
        if src and src != pool and job.rec.progress > 0:
            gbps = min(site.egress_gbps, self.sites[src].egress_gbps if src in self.sites else site.egress_gbps)
            a.move_s = d.cards * self.model.state_gb_per_card * 8.0 / gbps
        a.setup_s = site.restart_s + a.move_s
        a.interval_s = max(interval_s, 1.0)
        a.ckpt_s = d.checkpoint_cost_s
        a.after_failure = after_failure
        rate = site.failure_rate_per_card_hour * self.failure_scale * d.cards / 3600.0
        mtbf = 1.0 / rate if rate > 0 else math.inf
        a.expected_w = checkpointing.waste_unchecked(a.interval_s, a.ckpt_s, site.restart_s, mtbf)
        a.min_w = 0.0 if mtbf == math.inf else math.sqrt(2.0 * a.ckpt_s / mtbf) + site.restart_s / mtbf
        segments = max(1, math.ceil(a.work_s / a.interval_s - 1e-9))
        done_at = now + a.setup_s + a.work_s + (segments - 1) * a.ckpt_s
        fail_at = now + d.faults.variate(a.number - 1) / rate if rate > 0 else math.inf
        a.failing = fail_at < done_at
        a.end = fail_at if a.failing else done_at
        a.expected_end = now + a.work_s * (1.0 + checkpointing.goodput_waste_unchecked(
            a.interval_s, a.ckpt_s, site.restart_s, mtbf))
        a.running = scheduler.Running(job_id=d.id, tenant=d.tenant, pool=pool, accelerator=acc, cards=d.cards,
                                      priority=d.priority, expected_end_at=a.expected_end,
                                      preemptible=pool in self.lent or d.priority == 0)
        job.att = a
        self._push(a.end, "end", d.id, a.number)

    def _end(self, job: _Job, now: float, how: str, *, replan: bool = True, failed_at: float | None = None) -> None:
        """Close the current attempt at ``now``: ``completed``, ``failure``, ``outage`` or ``stopped``."""
        a = job.att
        assert a is not None
        d = job.draw
        held = now - a.start
        x = max(0.0, held - a.setup_s)  # time past set-up
        cycle = a.interval_s + a.ckpt_s
        k = int(x // cycle)
        rem = x - k * cycle
        if how == "completed":
            saved_s, ckpt_s, lost_s = a.work_s, held - a.setup_s - a.work_s, 0.0
        elif how == "stopped":
            part = min(rem, a.interval_s)
            saved_s, ckpt_s, lost_s = min(a.work_s, k * a.interval_s + part), k * a.ckpt_s + (rem - part), 0.0
        else:
            saved_s, ckpt_s, lost_s = min(a.work_s, k * a.interval_s), k * a.ckpt_s, rem
        setup_s = min(held, a.setup_s)
        w = self.waste
        cards = a.cards
        w.useful += saved_s * cards
        w.checkpoint += max(0.0, ckpt_s) * cards
        w.lost += lost_s * cards
        move = min(setup_s, a.move_s)
        w.move += move * cards
        if a.after_failure:
            w.setup_restart += (setup_s - move) * cards
        else:
            w.setup_first += (setup_s - move) * cards
        w.expected_w_x_useful += a.expected_w * saved_s * cards
        w.min_w_x_useful += a.min_w * saved_s * cards
        gained = saved_s * a.units / (d.est_hours * 3600.0) if d.est_hours > 0 else 1.0
        job.work_a800_card_h += saved_s * a.units * cards / 3600.0
        job.useful_s += saved_s * cards
        self.free[(a.pool, a.acc)] += cards
        self.held[a.pool] -= cards
        self.running.pop(d.id, None)
        job.att = None
        rec = job.rec
        seq = rec.attempt * 4
        if rec.state is lifecycle.JobState.PLACED:
            rec = lifecycle.dispatched(rec, a.start)
        effects: list[lifecycle.Effect] = []
        if gained > 0 and how != "completed":
            out = lifecycle.apply_event(rec, wire.Checkpointed(
                job=d.id, attempt=rec.attempt, seq=seq + 1, site=a.pool, at=now,
                progress=min(1.0, rec.progress + gained), checkpoint=f"sim://{d.id}/{rec.attempt}"))
            rec = out.record
        if how == "completed":
            out = lifecycle.apply_event(rec, wire.AttemptExited(job=d.id, attempt=rec.attempt, seq=seq + 2, site=a.pool,
                                                                at=now, reason="completed", progress=1.0))
            job.done_at = now
        elif how == "stopped":
            self.stops += 1
            out = lifecycle.apply_event(rec, wire.AttemptExited(job=d.id, attempt=rec.attempt, seq=seq + 2, site=a.pool,
                                                                at=now, reason="stopped", detail="preempted"))
        else:
            if how == "failure":
                self.card_failures += 1
            else:
                self.outage_failures += 1
            out = lifecycle.infra_failure(rec, now, "card fault" if how == "failure" else "site lost")
            job.fail_at = now if failed_at is None else failed_at
        rec = out.record
        effects.extend(out.effects)
        for eff in effects:
            if isinstance(eff, lifecycle.Meter):
                self.metered.append((d.id, d.tenant, eff.attempt, eff.pool, eff.accelerator, eff.cards, eff.start_at,
                                     eff.end_at))
                if eff.pool in self.lent:
                    self.lent_card_s += eff.cards * (eff.end_at - eff.start_at)
                pool = self._pool(eff.pool)
                job.cost_cny += placement.metered_energy_cny(pool, eff.accelerator, eff.cards, eff.start_at, eff.end_at)
                job.card_s += eff.cards * (eff.end_at - eff.start_at)
        job.rec = rec
        if rec.state in (lifecycle.JobState.QUEUED, lifecycle.JobState.RESTARTING):
            job.spec = msgspec.structs.replace(job.spec, progress=rec.progress, checkpoint_pool=rec.checkpoint_pool,
                                               restarting=rec.state is lifecycle.JobState.RESTARTING)
            self.queue[d.id] = job
            job.planned = False
        if replan:
            self._want_tick(now)

    # ------------------------------------------------------------------ faults and lending

    def site_lost(self, sid: str, now: float, failed_at: float) -> None:
        """The hub declared ``sid`` lost at ``now`` (it died at ``failed_at``): its attempts restart."""
        if sid not in self.sites:
            return
        self.healthy[sid] = False
        for job in [j for j in self.running.values() if j.att is not None and j.att.pool == sid]:
            self._end(job, now, "outage", failed_at=failed_at)
        self._want_tick(now)

    def site_back(self, sid: str, now: float) -> None:
        if sid in self.sites:
            self.healthy[sid] = True
            self._want_tick(now)

    def offer(self, sid: str, cards: Mapping[str, int]) -> None:
        """Tidal lending (``core_lending``): new gangs may take at most ``cards`` (by accelerator) of
        lent site ``sid``; none: the site takes no new gangs (its running ones stay until reclaimed)."""
        new = {acc: n for acc, n in sorted(cards.items()) if n > 0}
        if new != self.offered.get(sid, {}):
            grew = any(n > self.offered.get(sid, {}).get(acc, 0) for acc, n in new.items())
            self.offered[sid] = new
            if grew:
                self._want_tick(self.now)

    def lent_attempts(self) -> list[tuple[str, int, str, str, int, float]]:
        """Running attempts on lent sites: (job, attempt, site, accelerator, cards, checkpoint cost s)."""
        return [(j.draw.id, j.att.number, j.att.pool, j.att.acc, j.att.cards, j.draw.checkpoint_cost_s)
                for j in self.running.values() if j.att is not None and j.att.pool in self.lent]

    def stop(self, job_id: str, attempt: int, now: float) -> bool:
        """Checkpoint and stop ``job_id``'s attempt ``attempt`` (a lending reclaim); it requeues. False:
        that attempt is no longer running (the fencing token)."""
        job = self.jobs[job_id]
        if job.att is None or job.att.number != attempt:
            return False
        self._end(job, now, "stopped")
        return True

    # ------------------------------------------------------------------ inference holds (cpn scaling)

    def hold(self, sid: str, acc: str, cards: int) -> None:
        """Inference takes ``cards`` free cards of ``sid`` (a scaled-out replica): training may no longer use them."""
        if cards <= 0 or (sid, acc) not in self.free:
            return
        if self.free[(sid, acc)] < cards:
            raise AssertionError(f"{self.name}: inference wants {cards} {acc} at {sid}, {self.free[(sid, acc)]} free")
        self.free[(sid, acc)] -= cards
        self.total[(sid, acc)] -= cards
        self._want_tick(self.now)

    def release(self, sid: str, acc: str, cards: int) -> None:
        """A scaled-in replica gives its cards back to training."""
        if cards <= 0 or (sid, acc) not in self.free:
            return
        self.free[(sid, acc)] += cards
        self.total[(sid, acc)] += cards
        self._want_tick(self.now)

    # ------------------------------------------------------------------ reading

    def idle_while_waiting(self) -> tuple[int, int]:
        """(cards of waiting jobs that could start now, cards of all waiting jobs): hidden throughput loss.

        A waiting job (queued or restarting, not infeasible, and seen by the planner since it
        entered the queue: a job not yet planned waits for the next tick, at most ``tick_s``, not
        for a decision) could start now when some healthy,
        not draining pool has at least its cards free of a type it accepts, whatever the reason it
        waits (a tariff window, a reservation, a tick not yet run). Jobs are checked one by one
        against the largest free block per type (no packing), and the sum is capped by the free
        cards of the types they accept, so it never exceeds what is really idle.
        """
        waiting = [j for j in self.queue.values() if j.planned and not j.infeasible]
        if not waiting:
            return 0, 0
        best: dict[str, int] = {}
        free_by_acc: dict[str, int] = {}
        for (sid, acc), f in self.free.items():
            if sid in self.lent:  # lent cards: only what is offered now
                f = min(f, self.offered.get(sid, {}).get(acc, 0))
            if f <= 0 or not self.healthy[sid] or self.draining[sid]:
                continue
            free_by_acc[acc] = free_by_acc.get(acc, 0) + f
            if f > best.get(acc, 0):
                best[acc] = f
        could = 0
        accs: set[str] = set()
        for j in waiting:
            d = j.draw
            if any(best.get(a, 0) >= d.cards for a in d.accelerators):
                could += d.cards
                accs.update(d.accelerators)
        idle = min(could, sum(free_by_acc.get(a, 0) for a in sorted(accs)))
        return idle, sum(j.draw.cards for j in waiting)

    def held_cards(self, out: dict[str, float]) -> None:
        """Add cards held by attempts, per site, to ``out``."""
        for sid, n in self.held.items():
            if n:
                out[sid] = out.get(sid, 0.0) + n

    def close(self, now: float) -> None:
        """Bill and account attempts still running at the end of the run (they are not ended)."""
        for job in self.running.values():
            a = job.att
            if a is None:
                continue
            job.cost_cny += placement.metered_energy_cny(self._pool(a.pool), a.acc, a.cards, a.start, now)
            self.metered.append((job.draw.id, job.draw.tenant, a.number, a.pool, a.acc, a.cards, a.start, now))
            if a.pool in self.lent:
                self.lent_card_s += a.cards * (now - a.start)
            job.card_s += a.cards * (now - a.start)
            held = now - a.start
            x = max(0.0, held - a.setup_s)
            cycle = a.interval_s + a.ckpt_s
            k = int(x // cycle)
            rem = x - k * cycle
            part = min(rem, a.interval_s)
            useful = min(a.work_s, k * a.interval_s + part)
            w = self.waste
            w.useful += useful * a.cards
            w.checkpoint += (k * a.ckpt_s + rem - part) * a.cards
            s = min(held, a.setup_s)
            w.move += min(s, a.move_s) * a.cards
            if a.after_failure:
                w.setup_restart += (s - min(s, a.move_s)) * a.cards
            else:
                w.setup_first += (s - min(s, a.move_s)) * a.cards
            w.expected_w_x_useful += a.expected_w * useful * a.cards
            w.min_w_x_useful += a.min_w * useful * a.cards
            job.work_a800_card_h += useful * a.units * a.cards / 3600.0
            job.useful_s += useful * a.cards


def oracle_energy(jobs: Sequence[JobDraw], pools: Sequence[placement.Pool],
                  model: placement.CostModel = placement.DEFAULT_MODEL, *, windows: bool = True) -> dict[str, float]:
    """Lower bound per job: the cheapest energy over every pool that could ever hold it (all cards
    free, no queueing, no failures), with the best start window its deadline allows (any saving
    counts; a job without a deadline waits only if it asked ``prefer = "cost"``), or
    (``windows=False``) starting at submission: the bound of a policy that never waits."""
    model = msgspec.structs.replace(model, min_wait_saving=0.0, max_wait_h=model.max_wait_h if windows else 0)
    cache: dict[object, list[float]] = {}
    priced = {(p.id, a): placement.priced(p, a, cache) for p in pools for a in p.cards_total}
    out: dict[str, float] = {}
    for d in jobs:
        spec = placement.JobSpec(id=d.id, tenant=d.tenant, cards=d.cards, accelerators=d.accelerators,
                                 est_hours=d.est_hours, checkpoint_cost_s=d.checkpoint_cost_s,
                                 priority=d.priority, deadline=d.deadline, submitted_at=d.submitted_at,
                                 prefer="cost" if d.prefer == "cost" or d.deadline is not None else None)
        best = math.inf
        for p in pools:
            for a in d.accelerators:
                pp = priced.get((p.id, a))
                if pp is None or placement.static_reason(spec, p, a) is not None:
                    continue
                # Cheapest hour bound first: skip pools that cannot beat the best so far.
                if pp.lb_rate * d.cards * d.est_hours >= best:
                    continue
                bd = placement.score_priced(spec, pp, d.submitted_at, model)
                best = min(best, bd.energy_cny)
        if best < math.inf:
            out[d.id] = best
    return out


def capacity_bound(pools: Sequence[placement.Pool], start_s: float, hours: int, work_a800_h: float) -> float:
    """The lowest energy cost per A800-equivalent card-hour of doing ``work_a800_h`` A800-equivalent
    card-hours within ``pools``' cards over ``hours`` hours from ``start_s``: fill the cheapest
    card-hours first (each pool's price at each hour, per unit of work), ignoring when jobs arrive,
    gangs, deadlines, which accelerators a job accepts and failures, so no policy that does that much
    work in these pools pays less. 0 when the work exceeds the capacity (or is 0)."""
    slots: list[tuple[float, float]] = []  # (CNY per A800-card-hour, A800-card-hours available)
    for p in pools:
        for acc, n in p.cards_total.items():
            units = p.units.get(acc, 1.0)
            if n <= 0 or units <= 0:
                continue
            for h in range(hours):
                t = start_s + h * 3600.0
                slots.append((placement.metered_energy_cny(p, acc, 1, t, t + 3600.0) / units, n * units))
    cost, left = _cheapest_first(sorted(slots), work_a800_h)
    return cost / work_a800_h if left <= 0 < work_a800_h else 0.0


def _cheapest_first(slots: Iterable[tuple[float, float]], work: float) -> tuple[float, float]:
    """The cost of ``work`` put on ``slots`` (price, capacity), sorted cheapest first, and the work
    they could not hold."""
    left, cost = work, 0.0
    for price, cap in slots:
        take = min(cap, left)
        cost += take * price
        left -= take
        if left <= 0:
            break
    return cost, left


def hourly_floor(pools: Sequence[placement.Pool], start_s: float, hours: int,
                 metered: Sequence[tuple[str, str, int, str, str, float, float, float]],
                 units: Mapping[str, float], groups: Mapping[str, str] | None = None) -> float:
    """The lowest energy cost (CNY) of a policy's own hour-by-hour load: each hour, the
    A800-equivalent cards its attempts held (``metered``) sit on the cheapest card-hours of that
    hour in ``pools`` (any pool, any type, no gangs). A schedule that keeps the same cards busy each
    hour cannot pay less; only moving work to other hours (waiting) can.

    ``groups`` (accelerator -> group, :func:`accelerator_groups`): the floor that respects the
    accelerators jobs accept: each hour, each group's load sits on the cheapest cards of that
    group's types only (cards of a type no job accepts, or of another group, do not count)."""
    def group_of(acc: str) -> str:
        return "" if groups is None else groups.get(acc, acc)

    demand: dict[str, list[float]] = {}
    for _, _, _, _, acc, cards, a, b in metered:
        u = units.get(acc, 1.0)
        row = demand.setdefault(group_of(acc), [0.0] * hours)
        h0 = max(0, int((a - start_s) // 3600.0))
        h1 = min(hours - 1, int((b - start_s) // 3600.0))
        for h in range(h0, h1 + 1):
            lo, hi = max(a, start_s + h * 3600.0), min(b, start_s + (h + 1) * 3600.0)
            if hi > lo:
                row[h] += cards * u * (hi - lo) / 3600.0
    cost = 0.0
    for h in range(hours):
        t = start_s + h * 3600.0
        for g in sorted(demand):
            slots = sorted((placement.metered_energy_cny(p, acc, 1, t, t + 3600.0) / p.units.get(acc, 1.0),
                            n * p.units.get(acc, 1.0))
                           for p in pools for acc, n in p.cards_total.items()
                           if n > 0 and p.units.get(acc, 1.0) > 0 and group_of(acc) == g)
            cost += _cheapest_first(slots, demand[g][h])[0]
    return cost


def accelerator_groups(jobs: Sequence[JobDraw]) -> dict[str, str]:
    """Accelerator types joined when some job accepts both (union of the jobs' accepted sets):
    type -> its group's name (its types in name order, ``+``-joined). A type no job accepts has
    no group, so :func:`hourly_floor` with these groups never counts its cards."""
    parent: dict[str, str] = {}

    def root(a: str) -> str:
        while parent[a] != a:
            a = parent[a]
        return a

    for d in jobs:
        for a in d.accelerators:
            parent.setdefault(a, a)
        for a in d.accelerators[1:]:
            ra, rb = root(a), root(d.accelerators[0])
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    members: dict[str, list[str]] = {}
    for a in parent:
        members.setdefault(root(a), []).append(a)
    return {a: "+".join(sorted(members[root(a)])) for a in sorted(parent)}


def cost_by_gang_size(sim: TrainingSim, bins: Sequence[tuple[int, int]]) -> list[dict[str, object]]:
    """Where a policy's money went, by gang size: for each ``(lo, hi)`` cards bin (ascending; a job
    in the first bin whose ``hi`` it does not exceed, the last takes the rest), its jobs, completed
    jobs, useful A800-equivalent card-hours, CNY per A800-hour (failures and restarts included, as
    in the policy's total) and share of the policy's energy cost."""
    his = [hi for _, hi in bins]
    rows = [[0, 0, 0.0, 0.0] for _ in bins]  # jobs, completed, work, cost
    for job in sim.jobs.values():
        i = min(bisect.bisect_left(his, job.draw.cards), len(bins) - 1)
        row = rows[i]
        row[0] += 1
        row[1] += job.done_at is not None
        row[2] += job.work_a800_card_h
        row[3] += job.cost_cny
    total = sum(row[3] for row in rows)
    return [{"cards": [lo, hi], "jobs": int(n), "completed": int(done), "work_a800_card_hours": round(work, 1),
             "cny_per_a800_card_hour": round(cost / work, 4) if work else 0.0,
             "share_of_cost": round(cost / total, 4) if total else 0.0}
            for (lo, hi), (n, done, work, cost) in zip(bins, rows)]
