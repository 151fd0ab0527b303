"""Training attempts at one site: StartAttempt / StopAttempt, idempotent, one attempt per job.

Promises (the hub may resend any command after a crash, so every answer is safe to repeat):

- Rule 1: StartAttempt for the attempt already running -> ``Ack``; for an attempt that already
  exited here -> ``Ack`` naming how it ended (it is not run twice); for a *higher* attempt number
  of a job whose older attempt runs here -> the old one is stopped first; for a *lower* one ->
  ``ErrorReply("stale_attempt")``. Attempt numbers are fencing tokens.
- Rule 2: an attempt holds its cards from StartAttempt until its ``AttemptExited`` event;
  a start that does not fit -> ``ErrorReply("no_capacity")``.
- Rule 3: StopAttempt of an unknown (or older) attempt -> ``Ack`` with a detail; a real stop is
  acknowledged at once and finishes in the background (the exit event confirms it).
- Rule 4: the site decides what runs: StartAttempt for an executor it did not enable ->
  ``ErrorReply("unsupported")``; for a command or image its executor does not allow (or a sandbox
  it cannot set up) -> ``ErrorReply("not_allowed")``, both naming the reason; nothing is reserved.
- Commands for one job are handled one after another (a per-job lock).
- Rule 4: with a journal (the agent has a data dir), every attempt is recorded before its first
  event and forgotten once its exit event is in the outbox; :meth:`Training.recover` (at start)
  re-attaches to what an executor can find again and reports every other journalled attempt as
  ``infra_failure`` ("agent restarted; attempt lost"), numbered on from the journal, so the hub
  restarts it from its checkpoint at once. A start the journal cannot record is refused
  (``ErrorReply("internal")``, retryable): an attempt nobody would report after a crash is worse.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Collection

from edge_agent import wire
from edge_agent.clock import WALL, Clock
from edge_agent.attempt_journal import AttemptJournal, AttemptRecord
from edge_agent.executors import Event, EventSink, Executor, Publish, RunningAttempt
from edge_agent.inventory import Inventory
from edge_agent.logs import log

_FINISHED_KEPT = 4096
LOST_DETAIL = "agent restarted; attempt lost"


class Training:
    """Running attempts by job, and a memory of recently finished ones."""

    def __init__(self, site: str, inventory: Inventory, executors: dict[str, Executor], publish: Publish,
                 journal: AttemptJournal | None = None, *, clock: Clock = WALL) -> None:
        self.site = site
        self.clock = clock
        self.inventory = inventory
        self.executors = executors
        self._deliver = publish
        self.journal = journal
        self.attempts: dict[str, RunningAttempt] = {}
        self.finished: OrderedDict[tuple[str, int], str] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self._background: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<Training site={self.site} running={len(self.attempts)} finished={len(self.finished)}>"

    def offered(self) -> list[str]:
        """Executors this site can run now (told to the hub): enabled, and not ``unavailable``
        (e.g. the ``process`` executor without bubblewrap)."""
        return [name for name, ex in self.executors.items() if not getattr(ex, "unavailable", "")]

    def refs(self) -> list[wire.AttemptRef]:
        return [wire.AttemptRef(job=a.job, attempt=a.attempt, progress=round(a.progress, 6))
                for a in self.attempts.values()]

    def _lock(self, job: str) -> asyncio.Lock:
        lock = self._locks.get(job)
        if lock is None:
            lock = self._locks[job] = asyncio.Lock()
        return lock

    def _publish(self, event: Event, msg_id: str) -> None:
        # The journal's high-water mark covers the seq before the event can reach the outbox (Rule 4).
        if self.journal is not None:
            try:
                self.journal.reserve(event.job, event.attempt, event.seq)
            except OSError as exc:
                log(logging.ERROR, "attempt_journal_failed", site=self.site, job=event.job, attempt=event.attempt,
                    error=str(exc))
        self._deliver(event, msg_id)

    def _forget(self, job: str, attempt: int) -> None:
        if self.journal is not None:
            try:
                self.journal.remove(job, attempt)
            except OSError as exc:
                log(logging.ERROR, "attempt_journal_failed", site=self.site, job=job, attempt=attempt, error=str(exc))

    def _remember_finished(self, job: str, attempt: int, reason: str) -> None:
        self.finished[(job, attempt)] = reason
        while len(self.finished) > _FINISHED_KEPT:
            self.finished.popitem(last=False)

    def _on_exit(self, handle: RunningAttempt) -> None:
        self._forget(handle.job, handle.attempt)  # its exit event is in the outbox by now
        if self.attempts.get(handle.job) is handle:
            del self.attempts[handle.job]
        if handle.job not in self.attempts:
            self.inventory.release_attempt(handle.job)
        exited = handle.sink.exited
        self._remember_finished(handle.job, handle.attempt, exited.reason if exited else "unknown")
        log(logging.INFO, "attempt_exited", site=self.site, job=handle.job, attempt=handle.attempt,
            reason=exited.reason if exited else None, progress=round(handle.progress, 4))

    @staticmethod
    def _check(cmd: wire.StartAttempt) -> str:
        if not wire.is_valid_id(cmd.job):
            return f"job {cmd.job!r} is not a valid id"
        if cmd.attempt < 0 or cmd.cards < 1:
            return "attempt must be >= 0 and cards >= 1"
        if cmd.time_scale <= 0 or cmd.work_s < 0 or not 0 <= cmd.progress <= 1:
            return "time_scale must be > 0, work_s >= 0 and progress in 0..1"
        return ""

    async def start(self, cmd: wire.StartAttempt) -> wire.Ack | wire.ErrorReply:
        """Handle StartAttempt (see the module rules)."""
        problem = self._check(cmd)
        if problem:
            return wire.ErrorReply(code="bad_message", message=f"StartAttempt: {problem}")
        executor = self.executors.get(cmd.executor)
        if executor is None:
            return wire.ErrorReply(code="unsupported",
                                   message=f"executor {cmd.executor!r} is not enabled at {self.site} "
                                           f"(enabled: {', '.join(self.executors) or 'none'})")
        refused = executor.refusal(cmd)
        if refused:
            log(logging.WARNING, "attempt_refused", site=self.site, job=cmd.job, attempt=cmd.attempt,
                executor=cmd.executor, reason=refused)
            return wire.ErrorReply(code="not_allowed", message=f"{self.site}: {refused}")
        async with self._lock(cmd.job):
            done = self.finished.get((cmd.job, cmd.attempt))
            if done is not None:
                return wire.Ack(detail=f"attempt {cmd.attempt} of {cmd.job} already exited here: {done}")
            current = self.attempts.get(cmd.job)
            if current is not None:
                if current.attempt == cmd.attempt:
                    return wire.Ack(detail=f"attempt {cmd.attempt} of {cmd.job} already running")
                if current.attempt > cmd.attempt:
                    return wire.ErrorReply(code="stale_attempt",
                                           message=f"attempt {current.attempt} of {cmd.job} runs here; "
                                                   f"{cmd.attempt} is older")
                log(logging.INFO, "attempt_superseded", site=self.site, job=cmd.job, old=current.attempt,
                    new=cmd.attempt)
                await current.stop(checkpoint=False, detail=f"superseded by attempt {cmd.attempt}")
            if not self.inventory.reserve_attempt(cmd.job, cmd.accelerator, cmd.cards):
                free = self.inventory.free_cards().get(cmd.accelerator)
                have = "none" if free is None else f"{free:g} free"
                return wire.ErrorReply(code="no_capacity",
                                       message=f"needs {cmd.cards} {cmd.accelerator} cards, {self.site} has {have}")
            if self.journal is not None:
                try:
                    self.journal.begin(cmd)
                except OSError as exc:
                    self.inventory.release_attempt(cmd.job)
                    log(logging.ERROR, "attempt_journal_failed", site=self.site, job=cmd.job, attempt=cmd.attempt,
                        error=str(exc))
                    return wire.ErrorReply(code="internal", retryable=True,
                                           message=f"{self.site} cannot record the attempt on its disk")
            sink = EventSink(self.site, cmd.job, cmd.attempt, self._publish, self.clock.time, key=cmd.event_key)
            handle = await executor.start(cmd, sink, self._on_exit)
            if not handle.done:
                self.attempts[cmd.job] = handle
                self._keep_recovery(handle)
            else:
                self._forget(cmd.job, cmd.attempt)
                if cmd.job not in self.attempts:
                    self.inventory.release_attempt(cmd.job)
            if handle.done and sink.exited is not None:
                return wire.Ack(detail=f"exited at once ({sink.exited.reason}): {sink.exited.detail}")
            log(logging.INFO, "attempt_started", site=self.site, job=cmd.job, attempt=cmd.attempt,
                executor=cmd.executor, cards=cmd.cards, accelerator=cmd.accelerator, progress=cmd.progress)
            return wire.Ack(detail="started")

    def stop(self, cmd: wire.StopAttempt) -> wire.Ack:
        """Handle StopAttempt: acknowledge now, stop in the background."""
        current = self.attempts.get(cmd.job)
        if current is None or current.attempt > cmd.attempt:
            running = f" (attempt {current.attempt} runs)" if current is not None else ""
            return wire.Ack(detail=f"attempt {cmd.attempt} of {cmd.job} is not running here{running}")

        async def stop_it() -> None:
            async with self._lock(cmd.job):
                if self.attempts.get(cmd.job) is current:
                    await current.stop(checkpoint=cmd.checkpoint, detail=cmd.reason or "stopped by the hub")

        task = asyncio.create_task(stop_it(), name=f"stop-{cmd.job}-{cmd.attempt}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return wire.Ack(detail="stopping")

    def _keep_recovery(self, handle: RunningAttempt) -> None:
        state = getattr(handle, "recovery", None)
        if self.journal is not None and state:
            try:
                self.journal.set_state(handle.job, handle.attempt, dict(state))
            except OSError as exc:
                log(logging.ERROR, "attempt_journal_failed", site=self.site, job=handle.job, attempt=handle.attempt,
                    error=str(exc))

    async def recover(self, pending_exits: Collection[tuple[str, int]] = ()) -> dict[str, int]:
        """Deal with the attempts the journal holds from before a restart (Rule 4). Call once, at
        start, before any command is handled.

        Args:
            pending_exits: ``(job, attempt)`` pairs whose exit event is still in the outbox (the
                agent died between queueing it and forgetting the record): only forgotten.

        Returns:
            counts: ``recovered`` (re-attached), ``lost`` (reported ``infra_failure``), ``exited``
            (had ended; its exit is or was sent).
        """
        counts = {"recovered": 0, "lost": 0, "exited": 0}
        if self.journal is None:
            return counts
        # Newest attempt of a job first: only it may be re-attached.
        for record in sorted(self.journal.records.values(), key=lambda r: (r.job, -r.attempt)):
            cmd = record.command
            sink = EventSink(self.site, cmd.job, cmd.attempt, self._publish, self.clock.time, key=cmd.event_key,
                             seq=record.seq)
            handle = None
            if (cmd.job, cmd.attempt) not in pending_exits and cmd.job not in self.attempts:
                handle = await self._reattach(record, sink)
            if handle is not None and not handle.done:
                self.attempts[cmd.job] = handle
                counts["recovered"] += 1
                log(logging.INFO, "attempt_recovered", site=self.site, job=cmd.job, attempt=cmd.attempt,
                    executor=cmd.executor, next_seq=record.seq + 1)
                continue
            if (cmd.job, cmd.attempt) in pending_exits or sink.exited is not None:
                counts["exited"] += 1
                reason = sink.exited.reason if sink.exited is not None else "exited"
            else:
                sink.exit("infra_failure", progress=cmd.progress, detail=LOST_DETAIL)
                counts["lost"] += 1
                reason = "infra_failure"
                log(logging.WARNING, "attempt_lost", site=self.site, job=cmd.job, attempt=cmd.attempt,
                    executor=cmd.executor, seq=record.seq + 1, detail=LOST_DETAIL)
            if cmd.job not in self.attempts:
                self.inventory.release_attempt(cmd.job)
            self._forget(cmd.job, cmd.attempt)
            self._remember_finished(cmd.job, cmd.attempt, reason)
        return counts

    async def _reattach(self, record: AttemptRecord, sink: EventSink) -> RunningAttempt | None:
        """The executor's re-attached attempt (cards reserved), or None if it cannot find it."""
        cmd = record.command
        recover = getattr(self.executors.get(cmd.executor), "recover", None)
        if recover is None or not self.inventory.reserve_attempt(cmd.job, cmd.accelerator, cmd.cards):
            return None
        try:
            handle: RunningAttempt | None = await recover(record, sink, self._on_exit)
        except Exception:  # an executor bug must not keep the agent from starting
            logging.getLogger("cpn.agent").exception("attempt_recover_failed site=%s job=%s attempt=%d",
                                                     self.site, cmd.job, cmd.attempt)
            handle = None
        if handle is None:
            self.inventory.release_attempt(cmd.job)
        return handle

    async def abort_all(self, detail: str) -> None:
        """End every attempt with ``infra_failure`` (the agent is going away) and wait for them."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.gather(*(a.abort(detail) for a in list(self.attempts.values())), return_exceptions=True)
