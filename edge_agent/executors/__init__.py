"""Training executors: how a site runs one attempt of a job.

Promises every executor keeps:

- Rule 1: an attempt emits ``AttemptStarted`` first (unless it could not start at all), any number
  of ``Checkpointed``, and exactly one ``AttemptExited`` last; ``seq`` counts 1, 2, 3 ... per
  attempt and ``at`` is wall-clock epoch seconds. :class:`EventSink` enforces the numbering and the
  single exit.
- Rule 2: ``stop()`` ends the attempt with reason ``stopped``; ``abort()`` (the agent itself is
  going away) ends it with ``infra_failure`` so the hub restarts it elsewhere from its checkpoint.
  Both return only once the attempt's task (and any process) is gone.
- Rule 3: ``on_exit`` is called once, after the exit event, so the agent frees the cards.
- Rule 4 (restarts): the agent journals every attempt it starts (:mod:`edge_agent.attempt_journal`).
  On its next start it offers each journalled attempt to its executor's optional
  ``recover(record, sink, on_exit)`` (see :class:`Recoverable`): an executor whose attempts outlive
  the agent (a container, a Slurm job) returns a running attempt re-attached to it, with events
  numbered on from the record through ``sink``; one that cannot (``sim``, ``process``: their
  attempts die with the agent) has no ``recover`` or returns None, and the agent reports the attempt
  ``infra_failure`` ("agent restarted; attempt lost") so the hub restarts it from its checkpoint.
  A running attempt may expose ``recovery: dict[str, str]`` (facts to find it again); the agent
  journals it right after ``start`` returns and hands it back as ``record.state``.
- Rule 5: an executor runs only what the site's config allows (``refusal``); a sandbox that cannot
  be set up refuses every attempt with the reason, it never runs one unconfined.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from edge_agent import wire
from edge_agent.clock import WALL

if TYPE_CHECKING:
    from edge_agent.attempt_journal import AttemptRecord

Event = wire.AttemptStarted | wire.Checkpointed | wire.AttemptExited
Publish = Callable[[Event, str], None]
"""Hands one event and its JetStream message id to the outbox."""


class EventSink:
    """Numbers and stamps one attempt's events and hands them to ``publish`` (the outbox)."""

    def __init__(self, site: str, job: str, attempt: int, publish: Publish,
                 clock: Callable[[], float] = WALL.time, *, key: str = "", seq: int = 0) -> None:
        self.site = site
        self.job = job
        self.attempt = attempt
        self._deliver = publish
        self._key = key
        self._clock = clock
        self._seq = seq
        """Last seq used: 0 for a new attempt, the journalled mark for one recovered after a restart."""
        self.exited: wire.AttemptExited | None = None

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def _publish(self, event: Event) -> None:
        self._deliver(event, wire.event_msg_id(event.job, event.attempt, event.seq, self._key))

    def started(self, resumed_from: str = "") -> None:
        self._publish(wire.AttemptStarted(job=self.job, attempt=self.attempt, seq=self._next(), site=self.site,
                                          at=self._clock(), resumed_from=resumed_from))

    def checkpointed(self, progress: float, checkpoint: str) -> None:
        if self.exited is not None:
            return
        self._publish(wire.Checkpointed(job=self.job, attempt=self.attempt, seq=self._next(), site=self.site,
                                        at=self._clock(), progress=progress, checkpoint=checkpoint))

    def exit(self, reason: wire.ExitReason, *, progress: float, exit_code: int | None = None, detail: str = "") -> bool:
        """Emit the attempt's one ``AttemptExited``; False (and nothing sent) if it already exited."""
        if self.exited is not None:
            return False
        self.exited = wire.AttemptExited(job=self.job, attempt=self.attempt, seq=self._next(), site=self.site,
                                         at=self._clock(), reason=reason, exit_code=exit_code,
                                         progress=progress, detail=detail)
        self._publish(self.exited)
        return True


class RunningAttempt(Protocol):
    job: str
    attempt: int
    cards: int
    accelerator: str
    sink: EventSink

    @property
    def progress(self) -> float:
        """Fraction of the job's work done, 0..1, as of now."""
        ...

    @property
    def done(self) -> bool: ...

    async def stop(self, *, checkpoint: bool = True, detail: str = "") -> None:
        """End with reason ``stopped`` (checkpointing first when asked and able)."""
        ...

    async def abort(self, detail: str) -> None:
        """End with reason ``infra_failure`` (the agent is shutting down)."""
        ...

    async def wait(self) -> wire.AttemptExited:
        """Wait for the exit event."""
        ...


class Executor(Protocol):
    name: str

    def refusal(self, command: wire.StartAttempt) -> str:
        """Why this site will not run ``command`` ("" when it will): checked before any card is
        reserved; the agent answers ``ErrorReply("not_allowed", <reason>)``."""
        ...

    async def start(self, command: wire.StartAttempt, sink: EventSink,
                    on_exit: Callable[[RunningAttempt], None]) -> RunningAttempt:
        """Start an attempt; failures to start are reported as an ``AttemptExited`` event."""
        ...


class Recoverable(Protocol):
    """The optional restart hook of an :class:`Executor` (Rule 4)."""

    async def recover(self, record: AttemptRecord, sink: EventSink,
                      on_exit: Callable[[RunningAttempt], None]) -> RunningAttempt | None:
        """Re-attach to the attempt ``record`` describes if it still runs, else None (the
        default for an executor without this method). Must not emit ``AttemptStarted`` again."""
        ...


class AttemptTask:
    """Shared plumbing: the attempt's asyncio task, its exit callback and waiting for it."""

    def __init__(self, command: wire.StartAttempt, sink: EventSink,
                 on_exit: Callable[[RunningAttempt], None]) -> None:
        self.job = command.job
        self.attempt = command.attempt
        self.cards = command.cards
        self.accelerator = command.accelerator
        self.command = command
        self.sink = sink
        self._on_exit = on_exit
        self._task: asyncio.Task[None] | None = None
        self._finished = asyncio.Event()

    def __repr__(self) -> str:
        state = self.sink.exited.reason if self.sink.exited else "running"
        return f"<{type(self).__name__} {self.job}#{self.attempt} {state} progress={self.progress:.3f}>"

    @property
    def progress(self) -> float:
        raise NotImplementedError

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def _launch(self, coro: object) -> None:
        self._task = asyncio.create_task(self._guard(coro), name=f"attempt-{self.job}-{self.attempt}")

    async def _guard(self, coro: object) -> None:
        try:
            await coro  # type: ignore[misc]
        except asyncio.CancelledError:
            self.sink.exit("infra_failure", progress=self.progress, detail="attempt task cancelled")
            raise
        except Exception as exc:  # a bug in an executor must still end the attempt visibly
            self.sink.exit("infra_failure", progress=self.progress, detail=f"executor error: {exc!r}")
        finally:
            self._finished.set()
            try:
                self._on_exit(self)  # type: ignore[arg-type]
            except Exception:
                pass

    async def wait(self) -> wire.AttemptExited:
        await self._finished.wait()
        assert self.sink.exited is not None
        return self.sink.exited

    async def _cancel_task(self) -> None:
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
