"""The hub's training service: jobs from the API to attempts at sites and back, metered.

It carries out what the pure core decides (CONVENTIONS example 2, "decide, then do the I/O"):

- **Tick** (every ``config.scheduler_tick_s``, and soon when poked by a submission, an event,
  a cancellation or a site change: pokes share a tick, ``config.scheduler_poke_gap_s``): build a
  ``scheduler.Snapshot`` from the store (queued and restarting jobs, live jobs) and the registry
  (pools from ``placement.pool_from_site`` with the heartbeat's free cards),
  ``scheduler.plan(snapshot, now)``, then in one transaction persist the
  placements (new attempt, explanation) and the ``StartAttempt`` / ``StopAttempt`` commands into
  the outbox; the outbox sends them after the commit. Why the others wait is derived state, said
  after it in a local transaction and handed to the other hub processes (``waits_out``).
- **Events** from JetStream (``bus.consume_events``): fenced by sender first (the bus has checked
  that the event's ``site`` is the subject it came on; an event whose site is not where the hub
  placed that attempt is dropped and counted in ``cpn_events_dropped_total``, never recorded), then
  recorded once by ``job:attempt:site:seq``, applied with ``lifecycle.apply_event`` (the attempt number is the fencing token: events of any
  attempt but the current one are counted in ``metrics.stale_events`` and change nothing), and its
  effects (metering, stop a zombie, replan) are written in the same transaction. The handler
  returns only after the commit, so JetStream acks only what is on disk; a crash before it means a
  redelivery, which the ``job:attempt:seq`` key absorbs.
- **Sites**: a lost site's live attempts fail as infrastructure failures (restart from the last
  checkpoint on the best pool now, not counted against the user-error budget). On every tick each
  site's heartbeat list of running attempts is compared with the store: an attempt the hub placed
  at that site that is not its job's current attempt there gets a ``StopAttempt`` (a site back from
  a partition, still running an old attempt); an attempt the hub never placed there is ignored and
  counted (``cpn_heartbeat_attempts_ignored_total``). A started attempt that its up site leaves out
  of ``vanished_heartbeats`` heartbeats in a row, counted while its region's event stream has no
  backlog here (``HubBus.events_behind``), fails as ``vanished`` (an infrastructure failure:
  restarted from its checkpoint, not counted against the user-error budget).
- **Workloads**: a job naming an ``image`` runs on the ``container`` executor, one naming a
  ``command`` on ``process`` (or the site's ``slurm``), else on ``sim``; placement considers only
  sites that registered such an executor (``placement.filter_executor``). A site's refusal of a
  start, a ``vanished`` attempt and a job no site can run are written to the job's events as hub
  events (site ``(hub)``), so the tenant sees why.
- **Metering**: each ended attempt is billed cards × hours and energy (``placement.metered_energy_cny``,
  time-of-use tariff × PUE × board power). Sim attempts run ``time_scale`` simulated seconds per
  wall second, so their wall time is scaled by it: the bill is for the simulated run.

Each read-decide-write step that touches SQLite is synchronous, except the awaited ones (the tick,
which reads and plans a long queue in steps and awaits its commits; events; acknowledgements;
cancels): those write only what is still as they read it, or run again on what changed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import math
import secrets
import zlib
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec

from controlplane.core import lending, lifecycle, placement, scheduler
from controlplane.core import quota as tenant_quota
from controlplane.core.clock import Clock
from controlplane.core.errors import NotFound, RecordNoQuorum
from controlplane.core.jobspec import JobSpec
from controlplane.services.outbox import START, CommandOutbox
from controlplane.core.registry import Transition
from controlplane.runtime import BackgroundTasks
from controlplane.store import deployments as store_deployments
from controlplane.store import jobs as store_jobs
from controlplane.store import outbox as store_outbox
from controlplane.store.db import Database, barrier, derived, transaction, write
# The rows this service's API answers with (the gateway renders them; it never imports the store).
from controlplane.store.jobs import AttemptRow as AttemptRow, EventRow as EventRow, JobRow as JobRow
from controlplane.store.outbox import OutboxRow
from edge_agent import wire

if TYPE_CHECKING:
    from controlplane.config import HubConfig
    from controlplane.core.registry import SiteRegistry
    from controlplane.metrics import HubMetrics
    from controlplane.nats.bus import HubBus
    from topology.layout import Layout

TICK_STEP = 250
"""A tick over a long queue pauses (lets the event loop run) after decoding, and after planning,
every this many queued jobs (``tick_async``)."""
TICK_CHUNK = 200
"""Decisions of a scheduler tick persisted per transaction (a start writes its job and attempt
rows; stops and unplaceable events go with the first chunk)."""

log = logging.getLogger("cpn.training")

S = lifecycle.JobState
LIVE_STATES = lifecycle.LIVE
WAITING_STATES = lifecycle.WAITING
ACTIVE_STATES = LIVE_STATES | WAITING_STATES

STOP_RESEND_S = 5.0
"""A stale attempt still listed in heartbeats is told to stop again at most this often."""
REFUSED_COOL_S = 1.0
"""After a site refuses a start for lack of cards, place nothing there until a newer heartbeat."""
REFUSED_OTHER_COOL_S = 30.0
"""After any other refusal (executor not enabled, ...), leave the site alone this long."""
REPORT_RETRY_S = (0.5, 5.0)
"""A refused start whose report the record did not take (no quorum): written again after these
seconds, doubling (first, most), until it lands or this process stops deciding."""
ORPHAN_GRACE_S = 5.0
"""After a hub start, a live job's site must be heard from within max(this, 2 × detection)."""
HUB_SITE = store_jobs.HUB_EVENT_SITE
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class _Decision(Generic[T]):
    """A decision on a rare path (a refused start, a lost site, vanished attempts, reclaimed lent
    cards): ``commit`` writes it with the commands it must send (it may run more than once and
    re-reads what it decides on: on the record it runs after an awaited read barrier, possibly
    again after a batch it overlapped); ``done`` gets its result once it is on a quorum (logs,
    counters, kicks); ``failed`` undoes what was marked at decision time if the write failed."""

    commit: Callable[[Database], T]
    done: Callable[[T], None]
    failed: Callable[[], None] = lambda: None


@dataclasses.dataclass(frozen=True)
class _OwnRows:
    """A commit of a tick's plan (``_carry_out``): it reads only the jobs and attempts it writes
    (each checked as the round read it), so it asks the record for no read barrier of its own
    (``store.db.write(..., optimistic=True)``): the tick's loop took one before the round's reads,
    and a stale read of a row it writes loses that row's compare-and-set, catches up and runs again.
    ``rows``: at most how many jobs it writes."""

    commit: Callable[..., None]
    i: int
    rows: int

    def __call__(self, db: Database) -> None:
        self.commit(db, i=self.i)


READ_BARRIER = object()
"""What :meth:`TrainingService._tick_steps` yields before a full round reads anything."""
@dataclasses.dataclass(frozen=True)
class _Waits:
    """What a round says of its waiting jobs (:meth:`TrainingService._say_waits`)."""

    waits: list[store_jobs.Wait]
    events: list[tuple[str, int, str, dict[str, Any]]]
    """(job, attempt, kind, body): the hub events of new reasons (``unplaceable``) and new kinds of wait."""


_Round = tuple[list[store_jobs.JobRow], scheduler.Plan | None, list[Callable[[Database], None]],
               "_Decision[list[str]] | None"]
"""A tick's read and plan: the jobs read, the plan, the commits that carry it out, and the
reclaim of lent cards due (tidal lending's stops, written before the plan's commits)."""
POKE_SPACING = 4.0
"""A poked tick waits at least this many times as long as the last tick held the loop (see
``HubConfig.scheduler_poke_gap_s``)."""


class TrainingService:
    """Training jobs for one hub (name ``training``), built by the composition root with what it
    uses, typed (no hub object).

    Args:
        db: the store's connection (a function: the hub opens the database when it starts).
        bus: the hub's NATS adapter (commands through the outbox; agent events from JetStream).
        registry: the live sites (heartbeats, free cards, attempts they list).
        layout: the layout (a function: loaded when the hub starts); prices and sites' figures.
        clock: wall time for events, ticks and the outbox.
        metrics: the hub's counters this service adds to.
        config: ``scheduler_tick_s``, ``vanished_heartbeats``, ``sim_time_scale``, ``seed``.
        tenant: a tenant's row (for its card quota), or None.
    """

    name = "training"

    def __init__(self, *, db: Callable[[], Database], bus: HubBus, registry: SiteRegistry,
                 layout: Callable[[], Layout | None], clock: Clock, metrics: HubMetrics, config: HubConfig,
                 tenant: Callable[[str], dict[str, Any] | None]) -> None:
        self._db = db
        self.bus = bus
        self.registry = registry
        self._layout = layout
        self.clock = clock
        self.metrics = metrics
        self.config = config
        self.tenant = tenant
        self.started_at = 0.0
        self.outbox: CommandOutbox | None = None
        self.lending_profiles: Callable[[Iterable[str], Sequence[float]], Mapping[str, Sequence[float]]] | None = None
        """Learnt lending forecasts per site (``LearntDemand.site_profiles``; set by the composition root)."""
        self.counters: dict[str, int] = {
            "ticks": 0, "placed": 0, "applied": 0, "duplicate": 0, "stale_attempt": 0, "terminal": 0,
            "illegal": 0, "unknown_job": 0, "site_failures": 0, "dispatch_failures": 0, "stops": 0,
            "cancelled": 0, "not_holder": 0, "unknown_attempt": 0, "never_placed": 0, "vanished": 0,
            "pokes_coalesced": 0, "ticks_incremental": 0, "jobs_planned": 0, "waits_said": 0,
        }
        self.cost_model = msgspec.structs.replace(
            placement.DEFAULT_MODEL, min_wait_saving=config.training_min_wait_saving_pct / 100.0)
        """The cost model the scheduler plans with (the hub's tariff-wait threshold)."""
        self.last_plan: scheduler.Plan | None = None
        self.last_tick_ms = 0.0
        self.last_tick_busy_s = 0.0
        """How long the last tick held the event loop (its reads, plan and bookkeeping; not the
        record's acknowledgements it awaited): it spaces poked ticks."""
        self._poke = asyncio.Event()
        self._saying: _Waits | None = None
        """The waits of the round being carried out, said once its commits are written (:meth:`_say_waits`)."""
        self.waits_out: Callable[[list[store_jobs.Wait]], None] | None = None
        """Hands the waits this process said to the other hub processes (``services/waits.py``; set by
        the composition root on the replicated record)."""
        self._full_wanted = True
        """Something other than a submission asked for a tick since the last full plan (see :meth:`poke`)."""
        self._basis: scheduler.Basis | None = None
        """The last full plan's basis while only submissions came since (``scheduler.plan_more``)."""
        self._basis_seen: tuple[list[placement.Pool], list[scheduler.Running], int, set[str]] = ([], [], 0, set())
        """What that plan saw besides the queue: pools, running jobs, the jobs' rowid mark, tenants."""
        self._decoded = store_jobs.Decoded()
        """The waiting jobs as a full round last read them: a row unchanged since is not decoded again."""
        self._specs: dict[str, tuple[store_jobs.JobRow, placement.JobSpec]] = {}
        """The scheduler's view of each waiting job, made from that very row (see :meth:`_spec`)."""
        self.running = False
        """Started (this process leads, or is a single hub): only then does it decide on site changes."""
        self.tasks = BackgroundTasks("training")
        self._preempting: dict[tuple[str, int], float] = {}
        self._stops_deferred: list[tuple[str, str, int]] | None = None
        """While an awaited commit runs (it may run again): the stops it queued, for ``_stop_sent``."""
        self._placing: tuple[list[tuple[lifecycle.JobRecord, store_jobs.Placed]], bool] = ([], False)
        """What the round being committed placed, and whether it has commands to send."""
        self._stop_sent: dict[tuple[str, str, int], float] = {}
        self._cool_until: dict[str, float] = {}
        self._losing: set[str] = set()
        """Lost sites whose attempts' failure is being written (:meth:`_site_lost`)."""
        self._missing: dict[tuple[str, int], int] = {}
        """(job, attempt) -> the site's heartbeat count when the hub first saw it missing there"""
        self._ignored: set[tuple[str, str, int]] = set()
        """(site, job, attempt) listed by a site where the hub never placed it (counted once)"""
        self.tick_listeners: list[Callable[[dict[str, store_jobs.JobRow], float], object]] = []
        """Called after every tick with the live jobs (by id) and ``now`` (the job feed's progress marks)."""
        self.billing: Callable[[store_jobs.JobRow, lifecycle.Meter], None] | None = None
        """Prices an ended attempt (the market), called inside the transaction that records it."""
        self.pricing: Callable[[list[placement.Pool], float], list[placement.Pool]] | None = None
        """Puts the offers in force on the pools before each plan (the market), so placement
        minimises what the tenant pays rather than the energy alone."""

    def __repr__(self) -> str:
        c = self.counters
        return (f"<TrainingService ticks={c['ticks']} placed={c['placed']} applied={c['applied']} "
                f"stale={c['stale_attempt']} duplicate={c['duplicate']} stops={c['stops']}>")

    @property
    def db(self) -> Database:
        return self._db()

    @property
    def layout(self) -> Layout:
        layout = self._layout()
        assert layout is not None, "the layout is loaded when the hub starts"
        return layout

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the outbox sender (re-sending what a previous run left pending), the tick loop
        and the JetStream event consumer."""
        self.started_at = self.clock.time()
        self.running = True
        self._basis, self._full_wanted = None, True
        self.outbox = CommandOutbox(
            self.db, self.bus, is_lost=self._site_is_lost, obsolete=self._obsolete,
            on_ack=self._on_ack, on_refused=self._on_refused, clock=self.clock.time,
        )
        pending = store_outbox.counts(self.db)["pending"]
        if pending:
            log.info("event=outbox_resume pending=%d", pending)
        self.tasks.spawn(self.outbox.run(), name="outbox")
        self.tasks.spawn(self._tick_loop(), name="tick")
        self.bus.consume_events(self._on_event)

    async def stop(self) -> None:
        self.running = False
        self._losing.clear()  # decisions cancelled with the tasks are asked again by the next leader's tick
        await self.tasks.close()
        if self.outbox is not None:
            await self.outbox.close()

    def poke(self, *, submitted: bool = False) -> None:
        """Run a scheduler tick now rather than at the next period. ``submitted``: only new jobs
        were submitted (the tick may plan only them); any other poke asks for a full plan."""
        if not submitted:
            self._full_wanted = True
        self._poke.set()

    async def _tick_loop(self) -> None:
        """A tick every ``scheduler_tick_s``, and sooner when poked, but never sooner than the poke
        gap after the last one: ``scheduler_poke_gap_s``, or :data:`POKE_SPACING` times as long as
        that tick held the loop if longer (at most the period). The pokes of a burst of
        submissions (each one's tick re-plans the whole queue) share one tick, and ticks over a
        long queue take at most ~1/(1 + POKE_SPACING) of the loop, whatever the submission rate."""
        period_s = self.config.scheduler_tick_s
        not_before, gap_s = -math.inf, 0.0
        while True:
            try:
                async with asyncio.timeout(period_s):
                    await self._poke.wait()
                    if (rest := not_before - self.clock.monotonic()) > 0:
                        self.counters["pokes_coalesced"] += 1
                        # pokes meanwhile join this tick (a sleep of the loop's, not the clock's: a
                        # simulated clock that stands still must not hold the scheduler)
                        await asyncio.sleep(min(rest, gap_s))
            except TimeoutError:
                pass
            self._poke.clear()
            try:
                await self.tick_async(self.clock.time(), incremental=True, read_barrier=True)
            except asyncio.CancelledError:
                raise
            except Exception:
                self._basis = None  # what the round decided may not be written: the next plans the queue
                log.exception("event=tick_failed")
            gap_s = min(period_s, max(self.config.scheduler_poke_gap_s, POKE_SPACING * self.last_tick_busy_s))
            not_before = self.clock.monotonic() + gap_s

    def _kick(self) -> None:
        if self.outbox is not None:
            self.outbox.kick()

    def _decide_now(self, d: _Decision[T]) -> T:
        """Carry out ``d`` in one blocking transaction (the synchronous :meth:`tick`, tests)."""
        outer, self._stops_deferred = self._stops_deferred, None  # stops are remembered as written
        try:
            with transaction(self.db):
                result = d.commit(self.db)
        except BaseException:
            d.failed()
            raise
        finally:
            self._stops_deferred = outer
        d.done(result)
        return result

    async def _decide_awaited(self, d: _Decision[T], now: float) -> T:
        """Carry out ``d`` as one awaited, fenced write (``store.db.write``): on the replicated
        record the loop goes on while the batch, with the outbox rows it must send, waits for a
        quorum (through a stream election too); nothing is sent before it is acknowledged."""
        def commit(db: Database) -> tuple[T, list[tuple[str, str, int]]]:
            outer, self._stops_deferred = self._stops_deferred, []
            try:
                return d.commit(db), self._stops_deferred
            finally:
                self._stops_deferred = outer

        try:
            result, stops = await write(self.db, commit)
        except BaseException:
            d.failed()
            raise
        for key in stops:
            self._stop_sent[key] = now
        d.done(result)
        return result

    # ------------------------------------------------------------------ API side

    def job(self, job_id: str, *, tenant: str | None = None) -> JobRow | None:
        """A job as recorded (only if it is ``tenant``'s, when given)."""
        return store_jobs.get_job(self.db, job_id, tenant=tenant)

    def jobs(self, tenant: str, *, state: lifecycle.JobState | None, limit: int) -> list[JobRow]:
        """A tenant's jobs, newest first."""
        return store_jobs.list_jobs(self.db, tenant, state=state, limit=limit)

    def attempts(self, job_id: str) -> list[AttemptRow]:
        """A job's attempts, oldest first."""
        return store_jobs.attempts(self.db, job_id)

    def events(self, job_id: str) -> list[EventRow]:
        """The site events recorded for a job."""
        return store_jobs.events(self.db, job_id)

    def submit(self, tenant: str, spec: JobSpec, idem_key: str | None, body_hash: str,
               now: float) -> tuple[store_jobs.JobRow, bool]:
        """Create a job (committed before this returns) or replay an earlier answer.

        Raises:
            Unprocessable: the idempotency key was used with another body.
        """
        row, replayed = store_jobs.create_job(self.db, tenant, spec, idem_key, body_hash, now)
        if not replayed:
            log.info("event=job_submitted job=%s tenant=%s cards=%s", row.id, tenant, row.cards)
            self.poke(submitted=True)
        return row, replayed

    async def submit_async(self, tenant: str, spec: JobSpec, idem_key: str | None, body_hash: str,
                           now: float) -> tuple[store_jobs.JobRow, bool]:
        """:meth:`submit`, awaited: on the replicated record the loop goes on while the record
        acknowledges, and concurrent submissions are in flight together (``store.db.write``).

        Raises:
            Unprocessable: the idempotency key was used with another body.
        """
        row, replayed = await store_jobs.create_job_async(self.db, tenant, spec, idem_key, body_hash, now)
        if not replayed:
            log.info("event=job_submitted job=%s tenant=%s cards=%s", row.id, tenant, row.cards)
            self.poke(submitted=True)
        return row, replayed

    def replayed(self, tenant: str, idem_key: str, body_hash: str) -> store_jobs.JobRow | None:
        """The job an earlier submission with this ``Idempotency-Key`` created, or None.

        Raises:
            Unprocessable: the key was used with another body.
        """
        return store_jobs.idempotent_answer(self.db, tenant, idem_key, body_hash)

    def cancel(self, job_id: str, tenant: str, now: float) -> store_jobs.JobRow:
        """Cancel a tenant's job: terminal at once; a live attempt is stopped and billed.

        Raises:
            NotFound: no such job for this tenant.
            lifecycle.IllegalTransition: the job already finished (409).
        """
        db = self.db
        with transaction(db):
            row = self._cancel_commit(db, job_id, tenant, now)
        return self._cancelled(row, tenant, now)

    async def cancel_async(self, job_id: str, tenant: str, now: float) -> store_jobs.JobRow:
        """:meth:`cancel`, awaited (``store.db.write``; not fenced: a tenant's write, which any
        gateway makes): on the replicated record the loop goes on while the record acknowledges.
        The stop of a live attempt is in the outbox once the cancellation is on a quorum.

        Raises:
            NotFound, lifecycle.IllegalTransition: as :meth:`cancel`.
        """
        def commit(db: Database) -> tuple[store_jobs.JobRow, list[tuple[str, str, int]]]:
            outer, self._stops_deferred = self._stops_deferred, []
            try:
                return self._cancel_commit(db, job_id, tenant, now), self._stops_deferred
            finally:
                self._stops_deferred = outer

        row, stops = await write(self.db, commit, fenced=False)
        for key in stops:
            self._stop_sent[key] = now
        return self._cancelled(row, tenant, now)

    def _cancel_commit(self, db: Database, job_id: str, tenant: str, now: float) -> store_jobs.JobRow:
        row = store_jobs.get_job(db, job_id, tenant=tenant)
        if row is None:
            raise NotFound(f"job {job_id} not found", field="job_id")
        out = lifecycle.cancel(row.record(), now)
        store_jobs.save_record(db, out.record)
        self._effects(row, out.effects, now, exit_reason="cancelled", detail=out.record.reason)
        return row

    def _cancelled(self, row: store_jobs.JobRow, tenant: str, now: float) -> store_jobs.JobRow:
        self.counters["cancelled"] += 1
        log.info("event=job_cancelled job=%s tenant=%s was=%s", row.id, tenant, row.state)
        self._kick()
        self.poke()
        new = store_jobs.get_job(self.db, row.id)
        assert new is not None
        return new

    def usage(self, tenant: str) -> dict[str, Any]:
        """Training usage of a tenant: totals of ended attempts and a line per job (newest 100)."""
        db = self.db
        out = store_jobs.usage_by_tenant(db, tenant)
        out["card_hours"] = round(out["card_hours"], 6)
        out["energy_cny"] = round(out["energy_cny"], 6)
        out["by_job"] = [
            {"id": r.id, "name": r.name, "state": r.state, "attempts": r.attempt,
             "card_hours": round(r.card_hours, 6), "energy_cny": round(r.energy_cny, 6)}
            for r in store_jobs.list_jobs(db, tenant, limit=100)
        ]
        return out

    def accrued(self, row: store_jobs.JobRow, now: float) -> tuple[float, float]:
        """Card-hours and energy (CNY) of the current attempt so far, not yet billed."""
        if row.state not in LIVE_STATES or row.attempt_since is None:
            return 0.0, 0.0
        scale = _time_scale(row, row.attempt)
        end = row.attempt_since + max(0.0, now - row.attempt_since) * scale
        hours = row.cards * (end - row.attempt_since) / 3600.0
        pool = self._static_pool(row.pool)
        energy = 0.0 if pool is None else placement.metered_energy_cny(
            pool, row.accelerator, row.cards, row.attempt_since, end)
        return hours, energy

    def live_progress(self, row: store_jobs.JobRow) -> float | None:
        """The current attempt's progress from its site's last heartbeat, if the site lists it."""
        view = self.registry.get(row.pool) if row.pool else None
        if view is None or row.state not in LIVE_STATES:
            return None
        for ref in view.attempts:
            if ref.job == row.id and ref.attempt == row.attempt:
                return ref.progress
        return None

    # ------------------------------------------------------------------ the tick

    def tick(self, now: float, *, incremental: bool = False) -> scheduler.Plan | None:
        """One scheduling round (synchronous: read, plan, write, in one go). Returns the plan (of
        the new jobs only, when ``incremental`` and only they changed: see :meth:`_tick_steps`)."""
        started = self.clock.monotonic()
        rows, plan, commits, reclaim = self._tick_plan(now, incremental)
        if reclaim is not None:
            self._decide_now(reclaim)
        for commit in commits:
            with transaction(self.db):
                commit(self.db)
        self._say_waits(now)
        if commits:
            self._carried_out(plan, rows)
        for d in self._tick_end(rows, now):
            self._decide_now(d)
        self._tick_ended(rows, now, started)
        return plan

    async def tick_async(self, now: float, *, incremental: bool = False,
                         read_barrier: bool = False) -> scheduler.Plan | None:
        """:meth:`tick` whose decisions are committed awaited (``store.db.write``): on the
        replicated record the loop goes on (heartbeats, the lease's renewals, requests) while each
        chunk of decisions waits for its quorum, through a stream election too. Each chunk's
        outbox entries are written with its acknowledged rows, so nothing is sent before its batch
        is on a quorum; each chunk carries the leader's fence. What changed meanwhile (a job
        cancelled) is checked before each chunk is written, and the rest of the round (stale
        attempts, vanished ones, orphans) reads the jobs again after the writes. ``read_barrier``:
        a full round first awaits the record's read barrier (``store.db.barrier``; the tick loop's
        rounds), a round of new jobs alone takes none (:meth:`_tick_steps`). The round's waits are
        derived state, said locally once its commits are written (:meth:`_say_waits`)."""
        started = self.clock.monotonic()
        steps, busy_s = self._tick_steps(now, incremental), 0.0
        while True:  # the round's reads and plan, in steps: the loop serves requests between them
            resumed = self.clock.monotonic()
            try:
                step = next(steps)
            except StopIteration as done:
                read: _Round = done.value
                busy_s += self.clock.monotonic() - resumed
                break
            busy_s += self.clock.monotonic() - resumed
            if step is READ_BARRIER and read_barrier:
                await barrier(self.db)  # awaited: the loop goes on meanwhile
            else:
                await asyncio.sleep(0)
        rows, plan, commits, reclaim = read
        if reclaim is not None:
            await self._decide_awaited(reclaim, now)
        for commit in commits:  # (a failed one: the next round plans the whole queue and says its waits)
            await write(self.db, commit, optimistic=isinstance(commit, _OwnRows))
            self._kick()
        self._say_waits(now)
        resumed = self.clock.monotonic()
        if commits:
            self._carried_out(plan, rows)
            rows = store_jobs.jobs_in_states(self.db, LIVE_STATES)  # what the rest of the round reads
        for d in self._tick_end(rows, now):  # vanished attempts, orphaned sites: awaited too
            busy_s += self.clock.monotonic() - resumed
            await self._decide_awaited(d, now)
            resumed = self.clock.monotonic()
        self._tick_ended(rows, now, started)
        self.last_tick_busy_s = busy_s + self.clock.monotonic() - resumed
        return plan

    def _tick_plan(self, now: float, incremental: bool = False) -> _Round:
        """Read and plan a round: the jobs read, the plan, and the commits that carry it out."""
        steps = self._tick_steps(now, incremental)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                result: _Round = done.value
                return result

    def _tick_steps(self, now: float, incremental: bool = False) -> Generator[object, None, _Round]:
        """:meth:`_tick_plan` in steps of ``TICK_STEP`` queued jobs (read and decoded a page at a
        time, then planned), so the tick of a long queue lets the loop serve requests between them
        (one read of the whole queue held the loop for 10-40 ms with a few thousand jobs queued).
        The queue is the waiting jobs created up to a mark taken first (rowid); lending is decided
        before the first pause; the snapshot the plan works on is its own, and what changes
        meanwhile (a job cancelled between pages, or after its page) is checked before each
        decision is written (``_carry_out``).

        ``incremental`` (the tick loop's rounds): when the last full plan started and stopped
        nothing, only submissions poked since, it is younger than ``scheduler_full_plan_s``, the
        queue is that plan's jobs plus jobs created since (its count says no job left it), and the
        pools, running jobs and tenants are as that plan saw them, the round reads and plans only
        the new jobs (``scheduler.plan_more``: the full plan's decisions for them), O(new jobs)
        rather than O(queue); anything else, a full round, which first yields :data:`READ_BARRIER`
        (``tick_async`` then awaits the record's read barrier before the round reads anything).
        A round of new jobs alone takes none: it reads only jobs this process's projection holds,
        a job submitted elsewhere and not yet here is the next round's, and what it writes is
        compare-and-set on the jobs it read."""
        db = self.db
        self._saying = None  # what an earlier round that failed would have said is stale
        full_wanted, self._full_wanted = self._full_wanted, False
        basis, self._basis = self._basis, None  # kept only by a round that planned against it
        added = self._added(basis, now) if incremental and not full_wanted and basis is not None else None
        if added is None:
            yield READ_BARRIER
        live_rows = store_jobs.jobs_in_states(db, LIVE_STATES)
        live = {r.id: r for r in live_rows}
        self._preempting = {k: v for k, v in self._preempting.items()
                            if k[0] in live and live[k[0]].attempt == k[1]}
        mark = store_jobs.jobs_mark(db)  # the full read's end: a job created later is the next round's
        plan = None
        commits: list[Callable[[Database], None]] = []
        waiting_n = (store_jobs.count_in_states(db, WAITING_STATES) if added is None
                     else len(added[0]) + len(basis.ids if basis is not None else ()))
        lent, reclaim = self._lend(live, now, bool(waiting_n)) if self.config.lending.enabled else (None, None)
        if added is not None and basis is not None:
            new_rows, new_mark = added
            pools = self._plan_pools(live, lent, now)
            plan = self._plan_added(basis, new_rows, pools, live, now)
            if plan is not None:  # the queue's other jobs keep the decisions the full plan wrote
                self._basis = basis
                self._basis_seen = (pools, self._basis_seen[1], new_mark,
                                    self._basis_seen[3] | {r.tenant for r in new_rows})
                self.counters["ticks_incremental"] += 1
                self.counters["jobs_planned"] += plan.decisions
                rows = live_rows + new_rows
                commits = self._carry_out(plan, {r.id: r for r in rows}, now, len(pools))
                return rows, plan, commits, reclaim
        waiting: list[store_jobs.JobRow] = []
        for state in sorted(WAITING_STATES):  # read and decoded a page at a time (see the docstring)
            after = 0
            while True:
                page, after = store_jobs.jobs_page(db, state, after, mark, TICK_STEP, self._decoded)
                waiting.extend(page)
                if len(page) < TICK_STEP:
                    break
                yield None
        waiting = sorted({r.id: r for r in waiting}.values(), key=lambda r: (r.submitted_at, r.id))
        read = {r.id for r in waiting}
        self._decoded.keep(read)
        self._specs = {k: v for k, v in self._specs.items() if k in read}
        rows = live_rows + waiting
        if waiting:
            pools = self._plan_pools(live, lent, now)
            specs = []
            for n, r in enumerate(waiting, 1):
                specs.append(self._spec(r))
                if n % TICK_STEP == 0:
                    yield None
            running = [self._running(r) for r in live.values()]
            snapshot = scheduler.Snapshot(
                pools=pools, queued=specs, running=running,
                tenants=self._tenants({r.tenant for r in rows}), model=self.cost_model,
            )
            plan, new_basis = yield from scheduler.plan_basis_steps(snapshot, now, every=TICK_STEP)
            self.counters["jobs_planned"] += plan.decisions
            if new_basis is not None and self.config.scheduler_full_plan_s > 0:
                self._basis, self._basis_seen = new_basis, (pools, running, mark, set(snapshot.tenants))
            commits = self._carry_out(plan, {r.id: r for r in rows}, now, len(pools))
            self.last_plan = plan
            if lent is not None:
                lent_plan, ids = lent
                full_plan = plan
                commits.append(lambda db: self._say_lent(full_plan, lent_plan, ids, now))
        return rows, plan, commits, reclaim

    def _added(self, basis: scheduler.Basis, now: float) -> tuple[list[store_jobs.JobRow], int] | None:
        """The waiting jobs created since the full plan of ``basis`` (and the new rowid mark), if
        that plan is still young enough and no job left the queue meanwhile; else None."""
        if basis.spent or now - basis.now >= self.config.scheduler_full_plan_s:
            return None
        db = self.db
        mark = store_jobs.jobs_mark(db)
        new_rows = [r for r in store_jobs.jobs_added(db, WAITING_STATES, self._basis_seen[2], mark)
                    if r.id not in basis.ids]
        if store_jobs.count_in_states(db, WAITING_STATES) != len(basis.ids) + len(new_rows):
            return None  # a job left the queue (or came back to it): a full plan
        return new_rows, mark

    def _plan_added(self, basis: scheduler.Basis, new_rows: list[store_jobs.JobRow], pools: list[placement.Pool],
                    live: dict[str, store_jobs.JobRow], now: float) -> scheduler.Plan | None:
        """The decisions for ``new_rows`` against ``basis`` if the pools, the running jobs and the
        tenants are as its full plan saw them, else None (``scheduler.plan_more``)."""
        seen_pools, seen_running, _, seen_tenants = self._basis_seen
        if pools != seen_pools or [self._running(r) for r in live.values()] != seen_running:
            return None
        tenants = self._tenants(seen_tenants | {r.tenant for r in new_rows})
        return scheduler.plan_more(basis, [self._spec(r) for r in new_rows], now, tenants=tenants)

    def _plan_pools(self, live: dict[str, store_jobs.JobRow], lent: tuple[lending.LendPlan, set[str]] | None,
                    now: float) -> list[placement.Pool]:
        """The pools a plan sees: free cards less what live jobs hold, lent cards, offers' prices."""
        pools = self._pools(live.values(), now)
        if lent is not None:
            pools = lending.lend_pools(pools, lent[0], lent[1])
        if self.pricing is not None:
            pools = self.pricing(pools, now)
        return pools

    def _spec(self, r: store_jobs.JobRow) -> placement.JobSpec:
        """The scheduler's view of the waiting job ``r``; made once per row object: a row the full
        read found unchanged is the same object (``store_jobs.Decoded``), so its spec is too."""
        hit = self._specs.get(r.id)
        if hit is not None and hit[0] is r:
            return hit[1]
        spec = r.spec.waiting(id=r.id, tenant=r.tenant, priority=r.priority, submitted_at=r.submitted_at,
                              progress=r.progress, checkpoint_pool=r.checkpoint_pool,
                              restarting=r.state is S.RESTARTING)
        self._specs[r.id] = (r, spec)
        return spec

    def _tick_end(self, rows: list[store_jobs.JobRow], now: float) -> list[_Decision[list[str]]]:
        """The rest of a round: stale attempts stopped (the outbox alone, local), and the decisions
        to write (vanished attempts, sites silent since the start), for the caller to carry out."""
        live = {r.id: r for r in rows if r.state in LIVE_STATES}
        self._reconcile(live, now)
        vanished = self._vanished(live, now)
        return ([vanished] if vanished is not None else []) + self._orphans(live, now)

    def _tick_ended(self, rows: list[store_jobs.JobRow], now: float, started: float) -> None:
        live = {r.id: r for r in rows if r.state in LIVE_STATES}
        for listener in self.tick_listeners:
            try:
                listener(live, now)
            except Exception:
                log.exception("event=tick_listener_failed")
        self.counters["ticks"] += 1
        self.last_tick_ms = (self.clock.monotonic() - started) * 1000.0

    # ------------------------------------------------------------------ tidal lending

    def _lend(self, live: dict[str, store_jobs.JobRow], now: float, waiting: bool
              ) -> tuple[tuple[lending.LendPlan, set[str]] | None, _Decision[list[str]] | None]:
        """Tidal lending's decision at ``now`` (``lending.decide``, pure): returns the plan (its
        offers cap the lent pools) and the lending sites, None when no job waits and none runs on
        lent cards; and the reclaim of the lent attempts due, if any (each told to checkpoint and
        stop: its StopAttempt and its event in one write, fenced by attempt; marked stopping at
        once, so this round's plan counts them so, and unmarked if the write fails)."""
        cfg = self.config.lending
        layout = self.layout
        tiers = set(cfg.tiers)
        lending_sites = set()
        for view in self.registry:
            try:
                if layout.site(view.id).tier in tiers:
                    lending_sites.add(view.id)
            except KeyError:
                continue
        if not waiting and not any(r.pool in lending_sites for r in live.values()):
            return None, None  # nothing to offer to, nothing to reclaim
        holdings = []
        held = store_deployments.allocated_cards_by_site(self.db)
        for view in self.registry:
            try:
                site = layout.site(view.id)
            except KeyError:
                continue
            if site.tier in tiers:
                holdings.append(lending.Holding(site=site.id, cards=dict(site.accelerators), held=held.get(site.id, {})))
        ids = {h.site for h in holdings}
        running = [lending.Attempt(job_id=r.id, attempt=r.attempt, site=r.pool, accelerator=r.accelerator,
                                   cards=r.cards, checkpoint_s=r.spec.checkpoint_cost_s)
                   for r in live.values() if r.pool in ids]
        learnt = (self.lending_profiles(ids, cfg.profile)
                  if self.lending_profiles is not None and cfg.forecast == "learnt" else {})
        rules = lending.Rules(tiers=tuple(cfg.tiers), profile=tuple(cfg.profile), peak_need_share=cfg.peak_need_share,
                              headroom=cfg.headroom, margin_s=cfg.margin_s, min_lend_s=cfg.min_lend_s,
                              site_profiles=learnt, inference_first=cfg.inference_first)
        plan = lending.decide(now, holdings, running, rules)
        due = [st for st in plan.stops if st.at <= now and st.job_id in live
               and (st.job_id, st.attempt) not in self._preempting]  # each stop is sent once
        if not due:
            return (plan, ids), None
        assert self.outbox is not None
        why_of = {(st.job_id, st.attempt): f"reclaimed for inference: {st.reason}" for st in due}
        for key in why_of:
            self._preempting[key] = now

        def commit(db: Database) -> list[str]:
            reclaimed = []
            for (job_id, attempt), why in why_of.items():
                row = store_jobs.get_job(db, job_id)  # as it is now, not as the round read it
                if row is None or row.attempt != attempt or row.state not in LIVE_STATES:
                    continue
                for e in lifecycle.preempt(row.record(), why):
                    if isinstance(e, lifecycle.Stop):
                        self._enqueue_stop(e.pool, e.job_id, e.attempt, now, checkpoint=True, reason=why)
                store_jobs.record_hub_event(db, row.id, row.attempt, "reclaimed", {"site": row.pool, "reason": why}, now)
                reclaimed.append(job_id)
            return reclaimed

        def done(reclaimed: list[str]) -> None:
            self.counters["reclaimed"] = self.counters.get("reclaimed", 0) + len(reclaimed)
            for st in due:
                if st.job_id in reclaimed:
                    log.info("event=lent_attempt_reclaimed job=%s attempt=%d reason=%r", st.job_id, st.attempt,
                             st.reason)
            self._kick()

        def failed() -> None:  # asked again at the next round
            for key in why_of:
                if self._preempting.get(key) == now:
                    del self._preempting[key]

        return (plan, ids), _Decision(commit, done, failed)

    def _say_lent(self, plan: scheduler.Plan, lent: lending.LendPlan, ids: set[str], now: float) -> None:
        """A start on lent cards says so in the job's events: where, and until when."""
        until = lending.until_by_site(lent)
        for p in plan.start:
            if p.pool not in ids or p.pool not in until:
                continue
            row = self.job(p.job_id)
            if row is None:
                continue
            at = until[p.pool]
            store_jobs.record_hub_event(self.db, row.id, row.attempt, "lent", {
                "site": p.pool, "until": at,
                "reason": f"lent until {_iso(at)}: idle inference cards at {p.pool}, reclaimed before the forecast ramp"},
                now)

    def pools_now(self, now: float) -> list[placement.Pool]:
        """The pools as the next tick would see them (free cards less what live jobs hold)."""
        live = [r for r in store_jobs.jobs_in_states(self.db, LIVE_STATES)]
        return self._pools(live, now)

    def _pools(self, live: Any, now: float) -> list[placement.Pool]:
        layout = self.layout
        held: dict[str, list[store_jobs.JobRow]] = {}
        for r in live:
            held.setdefault(r.pool, []).append(r)
        pools = []
        for view in self.registry:
            try:
                site = layout.site(view.id)
            except KeyError:
                continue  # a site outside the layout has no tariff or PUE we could price it with
            free = dict(view.free_cards)
            shown = {(a.job, a.attempt) for a in view.attempts}
            for r in held.get(view.id, ()):
                # Placed here, not in the heartbeat yet: its cards are taken all the same.
                if (r.id, r.attempt) not in shown:
                    free[r.accelerator] = free.get(r.accelerator, 0.0) - r.cards
            if self._cool_until.get(view.id, 0.0) > now:
                free = {a: 0.0 for a in free}
            pools.append(placement.pool_from_site(
                site, layout.accelerators, free=free, healthy=view.state == "up", draining=view.draining,
                executors=frozenset(view.executors)))
        return pools

    def _static_pool(self, site_id: str) -> placement.Pool | None:
        layout = self._layout()
        if layout is None or not site_id:
            return None
        try:
            return placement.pool_from_site(layout.site(site_id), layout.accelerators)
        except KeyError:
            return None

    def _running(self, r: store_jobs.JobRow) -> scheduler.Running:
        bd = r.placement.breakdown if r.placement is not None else None
        run_s = bd.run_s if bd is not None else None
        scale = _time_scale(r, r.attempt)
        end = r.attempt_since + run_s / scale if run_s and r.attempt_since is not None else None
        return scheduler.Running(
            job_id=r.id, tenant=r.tenant, pool=r.pool, accelerator=r.accelerator, cards=r.cards,
            priority=r.priority, expected_end_at=end, stopping=(r.id, r.attempt) in self._preempting,
        )

    def _tenants(self, ids: set[str]) -> dict[str, scheduler.Tenant]:
        """The scheduler's view of tenants: a card quota less what their deployments hold."""
        out = {}
        inference: dict[str, float] | None = None
        for tid in ids:
            row = self.tenant(tid) or {}
            quota = row.get("quota_cards")
            note = ""
            if quota is not None:
                if inference is None:
                    inference = store_deployments.held_cards_by_tenant(self.db)
                if inference.get(tid):
                    note = f"of its {quota}, deployments hold {inference[tid]:g}"
                quota = tenant_quota.training_quota(int(quota), inference.get(tid, 0.0))
            out[tid] = scheduler.Tenant(id=tid, quota_cards=quota, quota_note=note)
        return out

    def _carry_out(self, plan: scheduler.Plan, rows: dict[str, store_jobs.JobRow], now: float,
                   plan_pools: int = 0) -> list[Callable[[Database], None]]:
        """The commits that persist ``plan`` with what it must send, one per ``TICK_CHUNK``
        decisions; ``plan_pools`` is how many pools it saw (with none, a job's being unplaceable
        says nothing about the job and is not written to its events). Each commit may run more
        than once (``store.db.write``) and writes only the decisions whose job is still as read."""
        assert self.outbox is not None
        outbox = self.outbox
        placed: list[tuple[lifecycle.JobRecord, store_jobs.Placed]] = []
        starts: list[tuple[str, wire.StartAttempt]] = []
        for p in plan.start:
            row = rows.get(p.job_id)
            if row is None or row.state not in WAITING_STATES:
                continue
            rec = lifecycle.place(row.record(), p.pool, p.accelerator, now)
            cmd = self._start_command(row, rec, p)
            placed.append((rec, store_jobs.Placed(
                attempt=rec.attempt, pool=p.pool, accelerator=p.accelerator, decided_at=now,
                start_at=p.start_at, executor=cmd.executor, time_scale=cmd.time_scale,
                checkpoint_interval_s=cmd.checkpoint_interval_s, breakdown=p.breakdown,
                explanation=p.explanation,
            )))
            starts.append((p.pool, cmd))
        stops: list[lifecycle.Stop] = []
        for pre in plan.stop:
            row = rows.get(pre.job_id)
            if row is None or row.state not in LIVE_STATES or (row.id, row.attempt) in self._preempting:
                continue
            stops.extend(e for e in lifecycle.preempt(row.record(), pre.reason) if isinstance(e, lifecycle.Stop))
            self._preempting[(row.id, row.attempt)] = now
        stops = [st for st in stops if now - self._stop_sent.get((st.pool, st.job_id, st.attempt), -math.inf)
                 >= STOP_RESEND_S]
        for st in stops:
            self._stop_sent[(st.pool, st.job_id, st.attempt)] = now
        self.counters["stops"] += len(stops)
        infeasible = [(i.job_id, "infeasible: " + "; ".join(i.reasons)) for i in plan.infeasible]
        # Only the waits whose reason changed are said: a job still waiting for the reason it was
        # read with has nothing to record, so a tick over a long, unchanged queue says nothing.
        waits = [(job_id, old.attempt, reason)
                 for job_id, reason in [(w.job_id, w.reason) for w in plan.wait] + infeasible
                 if (old := rows.get(job_id)) is not None and old.reason != reason]
        unplaceable = [(job_id, reason) for job_id, reason in (infeasible if plan_pools else ())
                       if (old := rows.get(job_id)) is not None and old.reason != reason]
        now_waiting = [w for w in plan.wait if (old := rows.get(w.job_id)) is not None and
                       scheduler.wait_topic(scheduler.wait_kind(old.reason)) != scheduler.wait_topic(w.kind)]

        def as_read(db: Database, ids: list[str]) -> set[str]:
            """The jobs among ``ids`` still as this round read them (nothing wrote them since)."""
            now_ = store_jobs.states_of(db, ids)
            return {i for i in ids if (r := rows.get(i)) is not None
                    and now_.get(i) == (r.state.value, r.attempt, r.updated_at)}

        def commit(db: Database, i: int) -> None:
            if i == 0:
                for stop in stops:  # (asked for at plan time: _stop_sent; the commit may run twice)
                    outbox.add(stop.pool, wire.StopAttempt(job=stop.job_id, attempt=stop.attempt,
                                                           checkpoint=stop.checkpoint, reason=stop.reason),
                               now, dedupe=True)
            chunk = placed[i:i + TICK_CHUNK]
            fresh = as_read(db, [rec.id for rec, _ in chunk])
            store_jobs.record_placements(db, [(rec, pl) for rec, pl in chunk if rec.id in fresh], now)
            for site, cmd in starts[i:i + TICK_CHUNK]:
                if cmd.job in fresh:
                    outbox.add(site, cmd, now)

        # One transaction per TICK_CHUNK decisions (each with what it must send): the replicated
        # record takes at most 1,000 rows in one atomic batch, and a start writes two. The waits
        # are not among them (:meth:`_say_waits`): a plan that places and stops nothing commits nothing.
        self._placing = (placed, bool(starts or stops))
        self._saying = _Waits(waits=waits, events=[
            (job_id, rows[job_id].attempt, "unplaceable", {"reason": reason}) for job_id, reason in unplaceable] + [
            (w.job_id, rows[w.job_id].attempt, "waiting", {"kind": w.kind, "reason": w.reason, "until": w.until})
            for w in now_waiting]) if waits or unplaceable or now_waiting else None
        if not (placed or stops):
            return []
        n = max(len(placed), 1)
        return [_OwnRows(commit, i=i, rows=min(TICK_CHUNK, n - i)) for i in range(0, n, TICK_CHUNK)]

    def _say_waits(self, now: float) -> None:
        """Say why the round's waiting jobs wait: their reasons and the events of new ones, in one
        local transaction (``db.derived``: a reason is derived state, worked out again by every
        tick and by a new leader's first, so it is neither a write of the replicated record nor
        fsynced), then to the other hub processes (``waits_out``). A job no longer waiting after
        the attempt it was planned at keeps what it has."""
        saying, self._saying = self._saying, None
        if saying is None:
            return
        with derived(self.db) as db:
            store_jobs.apply_waits(db, saying.waits)
            for job_id, attempt, kind, body in saying.events:  # a new reason, or a new kind of wait
                store_jobs.record_hub_event(db, job_id, attempt, kind, body, now)
        self.counters["waits_said"] += len(saying.waits)
        if self.waits_out is not None and saying.waits:
            self.waits_out(saying.waits)

    def _carried_out(self, plan: scheduler.Plan | None, rows: list[store_jobs.JobRow]) -> None:
        placed, send = self._placing
        self._placing = ([], False)
        for rec, pl in placed:
            log.info("event=job_placed job=%s attempt=%d pool=%s accelerator=%s expected_cny=%.2f progress=%.3f",
                     rec.id, rec.attempt, rec.pool, rec.accelerator, pl.breakdown.total_cny if pl.breakdown else 0.0,
                     rec.progress)
        self.counters["placed"] += len(placed)
        if send:
            self._kick()

    def _start_command(self, row: store_jobs.JobRow, rec: lifecycle.JobRecord,
                       p: scheduler.Placement) -> wire.StartAttempt:
        layout = self.layout
        spec = row.spec
        site = layout.site(p.pool)
        acc = layout.accelerators.get(p.accelerator)
        units = acc.units if acc is not None and acc.units > 0 else 1.0
        executor = spec.workload
        view = self.registry.get(p.pool)
        if executor == "process" and view is not None and "process" not in view.executors and "slurm" in view.executors:
            executor = "slurm"  # a command on a site whose only way to run one is its own Slurm
        interval_s = spec.checkpoint_interval_s or p.breakdown.interval_s
        if not math.isfinite(interval_s) or interval_s <= 0:
            interval_s = 0.0  # the executor reads <= 0 as "no checkpoint until the end"
        seed = zlib.crc32(f"{self.config.seed}:{row.id}:{rec.attempt}".encode())
        return wire.StartAttempt(
            job=row.id, attempt=rec.attempt, cards=row.cards, accelerator=p.accelerator, executor=executor,
            command=list(spec.command), work_s=spec.est_hours * 3600.0 / units, progress=row.progress,
            resume_from=row.checkpoint, checkpoint_interval_s=interval_s, checkpoint_cost_s=spec.checkpoint_cost_s,
            restart_s=site.restart_s, failure_rate_per_card_hour=site.failure_rate_per_card_hour,
            time_scale=self.config.sim_time_scale if executor == "sim" else 1.0, seed=seed, tenant=row.tenant,
            event_key=secrets.token_urlsafe(16),  # stored with the command in the outbox, so resends carry the same key
            image=spec.image or "",
        )

    def _reconcile(self, live: dict[str, store_jobs.JobRow], now: float) -> None:
        """Stop every attempt a site reports running that the hub placed there but that is not its
        job's current attempt there; ignore (and count) attempts the hub never placed there."""
        wanted: list[tuple[str, str, int, str]] = []
        suspects: list[tuple[str, wire.AttemptRef]] = []
        for view in self.registry:
            if view.state != "up":
                continue
            for ref in view.attempts:
                row = live.get(ref.job)
                if row is not None and row.attempt == ref.attempt and row.pool == view.id:
                    continue
                key = (view.id, ref.job, ref.attempt)
                if key in self._ignored or now - self._stop_sent.get(key, -math.inf) < STOP_RESEND_S:
                    continue
                suspects.append((view.id, ref))
        placed = store_jobs.attempt_pools(self.db, {(r.job, r.attempt) for _, r in suspects}) if suspects else {}
        for site, ref in suspects:
            if placed.get((ref.job, ref.attempt)) != site:
                # Not ours to stop: a command for it would only let a site multiply the hub's work.
                if len(self._ignored) > 100_000:
                    self._ignored.clear()
                self._ignored.add((site, ref.job, ref.attempt))
                self.counters["never_placed"] += 1
                self.metrics.count(self.metrics.heartbeat_attempts_ignored, site)
                continue
            row = live.get(ref.job)
            if row is None:
                known = store_jobs.get_job(self.db, ref.job)
                why = f"job is {known.state}" if known is not None else "job unknown to the hub"
            else:
                why = f"current attempt is {row.attempt} at {row.pool}"
            wanted.append((site, ref.job, ref.attempt, f"attempt {ref.attempt} is stale: {why}"))
        if not wanted:
            if len(self._stop_sent) > 1000:
                self._stop_sent = {k: v for k, v in self._stop_sent.items() if now - v < 60.0}
            return
        with transaction(self.db, local=True):  # the outbox alone: no read barrier of the record
            for site, job, attempt, reason in wanted:
                self._enqueue_stop(site, job, attempt, now, checkpoint=False, reason=reason)
        for site, job, attempt, reason in wanted:
            log.warning("event=stale_attempt_running site=%s job=%s attempt=%d reason=%s", site, job, attempt, reason)
        self._kick()

    def _vanished(self, live: dict[str, store_jobs.JobRow], now: float) -> _Decision[list[str]] | None:
        """Fail, as ``vanished``, every started attempt (acknowledged by its site: ``starting``,
        ``running``, or ``placed`` with its start sent) its up site has left out of
        ``vanished_heartbeats`` heartbeats in a row (a site that restarted without it: without this
        the job would stay ``running`` at its last progress for ever, and be billed)."""
        limit = max(1, self.config.vanished_heartbeats)
        started = (S.PLACED, S.STARTING, S.RUNNING)
        gone: list[tuple[store_jobs.JobRow, int]] = []
        current: set[tuple[str, int]] = set()
        for r in live.values():
            view = self.registry.get(r.pool) if r.pool else None
            if r.state not in started or view is None or view.state != "up":
                continue
            key = (r.id, r.attempt)
            current.add(key)
            if any(a.job == r.id and a.attempt == r.attempt for a in view.attempts):
                self._missing.pop(key, None)
                continue
            if r.state is S.PLACED and not self._start_delivered(r):
                # Not yet acknowledged: the site cannot list it. Count from the acknowledgement on (a
                # start sent slowly was failed as vanished the moment its ack came, and placed again).
                self._missing.pop(key, None)
                continue
            if self.bus.events_behind(r.pool):
                # Its region's stream holds events not applied yet (a backlog after a cut, drained
                # one per round trip while the heartbeats arrive at once): its exit may be among
                # them. Count from when the backlog is gone.
                self._missing[key] = view.heartbeats
                continue
            first = self._missing.setdefault(key, view.heartbeats)
            if view.heartbeats - first >= limit:
                gone.append((r, view.heartbeats - first))
        self._missing = {k: v for k, v in self._missing.items() if k in current}
        if not gone:
            return None

        def commit(db: Database) -> list[str]:
            failed = []
            for r, beats in gone:
                row = store_jobs.get_job(db, r.id)  # as it is now: an exit may have come meanwhile
                if row is None or row.attempt != r.attempt or row.state not in started:
                    continue
                why = f"vanished: {r.pool} left attempt {r.attempt} out of its last {beats} heartbeats"
                out = lifecycle.infra_failure(row.record(), now, why, attempt=r.attempt)
                if not out.applied:
                    continue
                store_jobs.save_record(db, out.record)
                self._effects(row, out.effects, now, exit_reason="vanished", detail=why)
                store_jobs.record_hub_event(db, r.id, r.attempt, "vanished", {"site": r.pool, "reason": why}, now)
                failed.append(r.id)
            return failed

        def done(failed: list[str]) -> None:
            for r, _ in gone:
                if r.id not in failed:
                    continue
                self._missing.pop((r.id, r.attempt), None)
                self.counters["vanished"] += 1
                self.metrics.attempts_vanished.inc()
                log.warning("event=attempt_vanished job=%s attempt=%d site=%s", r.id, r.attempt, r.pool)
            if failed:
                self._kick()
                self.poke()

        return _Decision(commit, done)

    def _start_delivered(self, r: store_jobs.JobRow) -> bool:
        """The attempt's StartAttempt was acknowledged (sent) though the job is still ``placed``: the
        hub stopped between marking the command sent and recording the acknowledgement."""
        return any(e.kind == START and e.attempt == r.attempt and e.state == "sent"
                   for e in store_outbox.for_job(self.db, r.id))

    def _orphans(self, live: dict[str, store_jobs.JobRow], now: float) -> list[_Decision[list[str]]]:
        """Live jobs at a site this hub process has never heard from, a grace period after start,
        or at a site it holds lost (a listener's write that failed is decided again).

        The registry declares lost only sites it has a view of; a site that died while the hub was
        down never heartbeats again, so without this its jobs would stay ``running`` for ever.
        """
        grace_s = max(2.0 * self.registry.detection_s, ORPHAN_GRACE_S)
        if now - self.started_at < grace_s:
            return []
        silent = {r.pool for r in live.values() if r.pool and self.registry.get(r.pool) is None}
        for site in sorted(silent):
            log.warning("event=site_silent_since_start site=%s grace_s=%.1f", site, grace_s)
        # A lost site whose attempts are still live: its listener's write failed (no quorum until
        # its deadline) or this process took the lead after the loss. Decided again here.
        lost = {r.pool for r in live.values() if r.pool and r.pool not in self._losing
                and (view := self.registry.get(r.pool)) is not None and view.state == "lost"}
        return ([self._site_lost(site, now, why=f"site {site} not heard from since the hub started")
                 for site in sorted(silent)] + [self._site_lost(site, now) for site in sorted(lost)])

    def _enqueue_stop(self, site: str, job: str, attempt: int, now: float, *, checkpoint: bool, reason: str) -> None:
        """Queue a StopAttempt (inside the caller's transaction): not while one for the same attempt
        and site is pending, nor again within ``STOP_RESEND_S`` (each late event of a zombie asks)."""
        assert self.outbox is not None
        if now - self._stop_sent.get((site, job, attempt), -math.inf) < STOP_RESEND_S:
            return
        cmd = wire.StopAttempt(job=job, attempt=attempt, checkpoint=checkpoint, reason=reason)
        if self.outbox.add(site, cmd, now, dedupe=True) is not None:
            self.counters["stops"] += 1
        if self._stops_deferred is not None:  # a commit that may run again: remembered once it is written
            self._stops_deferred.append((site, job, attempt))
        else:
            self._stop_sent[(site, job, attempt)] = now

    # ------------------------------------------------------------------ effects and metering

    def _effects(self, row: store_jobs.JobRow, effects: list[lifecycle.Effect], now: float, *,
                 exit_reason: str, exit_code: int | None = None, detail: str = "", ran: bool = True) -> None:
        """Carry out a lifecycle outcome's effects inside the caller's transaction."""
        for e in effects:
            if isinstance(e, lifecycle.Meter):
                self._bill(row, e, exit_reason=exit_reason, exit_code=exit_code, detail=detail, ran=ran)
            elif isinstance(e, lifecycle.Stop):
                self._enqueue_stop(e.pool, e.job_id, e.attempt, now, checkpoint=e.checkpoint, reason=e.reason)
            elif isinstance(e, lifecycle.Replan):
                self.poke()

    def _bill(self, row: store_jobs.JobRow, meter: lifecycle.Meter, *, exit_reason: str, exit_code: int | None,
              detail: str, ran: bool) -> None:
        # Sim attempts run time_scale simulated seconds per wall second: bill the simulated run.
        duration_s = max(0.0, meter.end_at - meter.start_at) * _time_scale(row, meter.attempt) if ran else 0.0
        billed = msgspec.structs.replace(meter, end_at=meter.start_at + duration_s)
        pool = self._static_pool(meter.pool)
        energy = 0.0 if pool is None else placement.metered_energy_cny(
            pool, meter.accelerator, meter.cards, billed.start_at, billed.end_at)
        store_jobs.end_attempt(self.db, billed, energy_cny=energy, exit_reason=exit_reason,
                               exit_code=exit_code, detail=detail[:2000])
        if self.billing is not None and ran:
            self.billing(row, billed)

    # ------------------------------------------------------------------ events

    async def _on_event(self, event: wire.AttemptStarted | wire.Checkpointed | wire.AttemptExited) -> None:
        """An agent event from the consumer, committed awaited (``store.db.write``): the loop goes
        on while the record acknowledges, through a stream election too."""
        now = self.clock.time()
        self._stops_deferred = []
        try:
            result, holder = await write(self.db, lambda db: self._event_commit(db, event, now))
            stops = self._stops_deferred
        finally:
            self._stops_deferred = None
        for key in stops:
            self._stop_sent[key] = now
        self._event_applied(event, result, holder)

    def apply_event(self, event: wire.AttemptStarted | wire.Checkpointed | wire.AttemptExited, now: float) -> str:
        """Record and apply one agent event in one transaction; returns what happened to it
        (``applied``, ``duplicate``, ``stale_attempt``, ``terminal``, ``illegal``, ``unknown_job``).

        Raises whatever the store raises (the bus then naks, and JetStream redelivers).
        """
        with transaction(self.db):
            result, holder = self._event_commit(self.db, event, now)
        return self._event_applied(event, result, holder)

    def _event_commit(self, db: Database, event: wire.AttemptStarted | wire.Checkpointed | wire.AttemptExited,
                      now: float) -> tuple[str, str | None]:
        """The transaction of :meth:`apply_event` (it may run more than once: ``store.db.write``)."""
        kind = str(type(event).__struct_config__.tag)
        if self._stops_deferred is not None:
            self._stops_deferred.clear()
        # Fence by sender before anything is recorded: only the site the hub placed this
        # attempt at may speak for it (event.site is the subject's site: the bus checked).
        holder = store_jobs.attempt_pools(db, [(event.job, event.attempt)]).get((event.job, event.attempt))
        row = None
        if holder is None:
            result = "unknown_attempt"
        elif holder != event.site:
            result = "not_holder"
        elif not store_jobs.record_event(db, event.job, event.attempt, event.seq, kind, wire.encode(event), now,
                                         site=event.site):
            result = "duplicate"
        else:
            row = store_jobs.get_job(db, event.job)
            if row is None:
                result = "unknown_job"
            else:
                out = lifecycle.apply_event(row.record(), event)
                if out.applied:
                    store_jobs.save_record(db, out.record)
                    if isinstance(event, wire.AttemptStarted):
                        store_jobs.mark_attempt_started(db, event.job, event.attempt, event.at)
                result = "applied" if out.applied else out.ignored
                if isinstance(event, wire.AttemptExited):
                    self._effects(row, out.effects, now, exit_reason=event.reason, exit_code=event.exit_code,
                                  detail=event.detail)
                else:
                    self._effects(row, out.effects, now, exit_reason="")
        return result, holder

    def _event_applied(self, event: wire.AttemptStarted | wire.Checkpointed | wire.AttemptExited, result: str,
                       holder: str | None) -> str:
        kind = str(type(event).__struct_config__.tag)
        self.counters[result] = self.counters.get(result, 0) + 1
        if result in ("unknown_attempt", "not_holder"):
            self.metrics.count(self.metrics.events_dropped, result)
            log.warning("event=event_dropped reason=%s job=%s attempt=%d seq=%d kind=%s site=%s holder=%s",
                        result, event.job, event.attempt, event.seq, kind, event.site, holder or "-")
            return result
        if result == "stale_attempt":
            self.metrics.stale_events.inc()
            log.info("event=stale_event job=%s attempt=%d seq=%d kind=%s site=%s",
                     event.job, event.attempt, event.seq, kind, event.site)
        elif result in ("illegal", "unknown_job"):
            log.warning("event=event_ignored reason=%s job=%s attempt=%d seq=%d kind=%s site=%s",
                        result, event.job, event.attempt, event.seq, kind, event.site)
        if result != "duplicate":
            self._kick()
            if isinstance(event, wire.AttemptExited):
                self.poke()  # cards were freed
        return result

    # ------------------------------------------------------------------ sites

    def on_site(self, t: Transition) -> None:
        """Site listener: a lost site's live attempts fail (infrastructure; written awaited, in a
        task: the loop goes on while the record acknowledges; only while this service runs, i.e.
        this process decides); a site back gets a tick at once (its stale attempts are stopped by
        the reconciliation)."""
        try:
            # Only the deciding process fails a lost site's attempts: a gateway (or a follower) cut
            # off from a site sees it "lost" too, and its write, unfenced, would fail healthy attempts.
            if t.new == "lost" and self.running:
                try:
                    asyncio.get_running_loop()
                except RuntimeError:  # no loop (a synchronous caller): the blocking way
                    self._decide_now(self._site_lost(t.site, t.at))
                else:
                    self.tasks.spawn(self._decide_awaited(self._site_lost(t.site, t.at), t.at),
                                     name=f"site-lost-{t.site}")
            self._kick()
            self.poke()
        except Exception:
            log.exception("event=site_listener_failed site=%s", t.site)

    def _site_lost(self, site: str, now: float, why: str = "") -> _Decision[list[str]]:
        why = why or f"site {site} lost"
        self._losing.add(site)  # its decision is under way: the tick does not ask again meanwhile

        def commit(db: Database) -> list[str]:
            failed = []
            for row in store_jobs.jobs_in_states(db, LIVE_STATES):
                if row.pool != site:
                    continue
                out = lifecycle.infra_failure(row.record(), now, why, attempt=row.attempt)
                if not out.applied:
                    continue
                store_jobs.save_record(db, out.record)
                self._effects(row, out.effects, now, exit_reason="site_lost", detail=why)
                failed.append(row.id)
            return failed

        def done(failed: list[str]) -> None:
            self._losing.discard(site)
            self.counters["site_failures"] += len(failed)
            for job in failed:
                log.warning("event=attempt_lost job=%s site=%s", job, site)
            if failed:
                self._kick()
                self.poke()

        return _Decision(commit, done, lambda: self._losing.discard(site))

    def _site_is_lost(self, site: str) -> bool:
        view = self.registry.get(site)
        return view is not None and view.state == "lost"

    # ------------------------------------------------------------------ outbox callbacks

    def _obsolete(self, entry: OutboxRow, cmd: Any, now: float) -> str | None:
        if not isinstance(cmd, wire.StartAttempt):
            return None  # stopping something is never obsolete; stops expire instead
        row = store_jobs.get_job(self.db, cmd.job)
        if row is None:
            return "job unknown"
        if row.attempt != cmd.attempt:
            return f"attempt {cmd.attempt} is no longer current ({row.attempt})"
        if row.state not in LIVE_STATES:
            return f"job is {row.state}"
        if row.pool != entry.site:
            return f"job is placed at {row.pool}"
        return None

    async def _on_ack(self, entry: OutboxRow, cmd: Any, ack: wire.Ack, now: float) -> None:
        """A start acknowledged: the job is dispatched (committed awaited: the loop goes on)."""
        if not isinstance(cmd, wire.StartAttempt):
            return

        def commit(db: Database) -> None:
            row = store_jobs.get_job(db, cmd.job)
            if row is None or row.attempt != cmd.attempt or row.state is not S.PLACED or row.pool != entry.site:
                return
            store_jobs.save_record(db, lifecycle.dispatched(row.record(), now))

        await write(self.db, commit)

    async def _on_refused(self, entry: OutboxRow, cmd: Any, why: str, now: float) -> None:
        """A start refused (or given up): the attempt fails as an infrastructure failure, written
        awaited (the entry's sender waits for the quorum, the loop does not)."""
        if entry.kind != START or not isinstance(cmd, wire.StartAttempt):
            return
        cool_s = REFUSED_COOL_S if why.startswith(("no_capacity", "draining")) else REFUSED_OTHER_COOL_S
        self._cool_until[entry.site] = now + cool_s

        def commit(db: Database) -> bool:
            row = store_jobs.get_job(db, cmd.job)
            if row is None:
                return False
            out = lifecycle.infra_failure(row.record(), now, f"dispatch to {entry.site} failed: {why}",
                                          attempt=cmd.attempt)
            if not out.applied:
                return False
            store_jobs.save_record(db, out.record)
            self._effects(row, out.effects, now, exit_reason="dispatch_failed", detail=why, ran=False)
            store_jobs.record_hub_event(db, cmd.job, cmd.attempt, "start_refused", {"site": entry.site, "reason": why}, now)
            return True

        def done(failed: bool) -> None:
            if not failed:
                return
            self.counters["dispatch_failures"] += 1
            log.warning("event=dispatch_failed job=%s attempt=%d site=%s error=%s", cmd.job, cmd.attempt, entry.site, why)
            self.poke()

        delay_s = REPORT_RETRY_S[0]
        while True:
            try:
                await self._decide_awaited(_Decision(commit, done), now)
                return
            except RecordNoQuorum as exc:
                # The entry is already dropped: this report is the refusal's only trace, so it is
                # written again until it lands (the outcome of the failed try is unknown; the
                # commit re-reads the job, so one that landed after all is not applied twice).
                if not self.running:
                    raise
                log.warning("event=refusal_unwritten job=%s attempt=%d retry_in_s=%.1f error=%s", cmd.job,
                            cmd.attempt, delay_s, exc)
                await self.clock.sleep(delay_s)
                delay_s = min(delay_s * 2, REPORT_RETRY_S[1])


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, tz=datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _time_scale(row: store_jobs.JobRow, attempt: int) -> float:
    """Simulated seconds per wall second of ``attempt`` (1 unless it was a sim attempt)."""
    pl = row.placement
    if pl is None or pl.attempt != attempt:
        return 1.0
    return pl.time_scale if pl.time_scale > 0 else 1.0
