"""The training-job lifecycle: a transition table and a pure reducer with attempt fencing.

Public API (pure; no clock, no I/O — ``now`` is an argument):

- :class:`JobState`, :class:`JobEvent`, :data:`TRANSITIONS` and :func:`transition` (raises
  :class:`IllegalTransition`, a 409 ``Conflict``, naming the state and the event).
- :class:`JobRecord`: the lifecycle part of a job (state, attempt number, retry counters, progress,
  last checkpoint). Frozen; every function returns a new one.
- Hub-side steps: :func:`place`, :func:`dispatched`, :func:`cancel`, :func:`preempt`,
  :func:`infra_failure` (site lost, card fault, dispatch failed).
- Agent-side events: :func:`apply_event` takes a ``wire.AttemptStarted | Checkpointed |
  AttemptExited`` and returns an :class:`Outcome` (new record, effects, or why it was ignored).
- Effects are data for the caller to carry out: :class:`Meter` (bill an attempt's card time),
  :class:`Stop` (send ``wire.StopAttempt`` to a site), :class:`Replan` (run a scheduler tick now).

Invariants, in the manner of h11's ``_state.py``:

- Rule 1: the only way to change a job's state is :func:`transition` over :data:`TRANSITIONS`;
  ``succeeded``, ``failed`` and ``cancelled`` are terminal (no outgoing transitions).
- Rule 2: the attempt number goes up by exactly one on ``place`` and never otherwise. It is the
  fencing token: an agent event counts only if it carries the current attempt number *and* that
  attempt is live (``placed``, ``starting``, ``running``). Anything else is returned as ignored
  (``stale_attempt``), never raised; the caller counts it. A stale attempt that still reports
  progress is told to stop (a zombie after a partition).
- Rule 3: infrastructure failures (card fault, site lost) go to ``restarting`` and do not use the
  user-error retry budget; they are capped (``max_infra_restarts``, default 50) only to stop a
  crash loop. User errors (non-zero exit) get ``max_user_retries`` (default 2) retries, then
  ``failed`` with the reason.
- Rule 4: a peer's event that does not fit the table (e.g. ``checkpointed`` while ``placed``) is
  ignored as ``illegal`` and counted, never a crash: agents are peers, not callers.
"""

from __future__ import annotations

import enum
from typing import Union

import msgspec

from controlplane.core.errors import Conflict
from edge_agent import wire


class JobState(enum.StrEnum):
    QUEUED = "queued"
    PLACED = "placed"
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobEvent(str, enum.Enum):
    PLACE = "place"                  # the scheduler chose a pool; a new attempt number
    DISPATCH = "dispatch"            # the site acknowledged StartAttempt
    START = "start"                  # AttemptStarted from the agent
    CHECKPOINT = "checkpoint"        # Checkpointed from the agent
    COMPLETE = "complete"            # AttemptExited(completed)
    RETRY = "retry"                  # user error within the retry budget
    FAIL = "fail"                    # user error beyond the budget, or a crash loop
    INFRA_FAILURE = "infra_failure"  # card fault, site lost, dispatch failed
    REQUEUE = "requeue"              # stopped on purpose (preempted, drained): back to the queue
    CANCEL = "cancel"                # the tenant cancelled


S, E = JobState, JobEvent

TRANSITIONS: dict[JobState, dict[JobEvent, JobState]] = {
    S.QUEUED: {E.PLACE: S.PLACED, E.CANCEL: S.CANCELLED},
    S.PLACED: {
        E.DISPATCH: S.STARTING,
        # AttemptStarted may overtake the command's Ack (they travel on different subjects).
        E.START: S.RUNNING,
        E.INFRA_FAILURE: S.RESTARTING,
        E.REQUEUE: S.QUEUED,
        E.CANCEL: S.CANCELLED,
    },
    S.STARTING: {
        E.START: S.RUNNING,
        E.CHECKPOINT: S.RUNNING,
        E.COMPLETE: S.SUCCEEDED,
        E.RETRY: S.QUEUED,
        E.FAIL: S.FAILED,
        E.INFRA_FAILURE: S.RESTARTING,
        E.REQUEUE: S.QUEUED,
        E.CANCEL: S.CANCELLED,
    },
    S.RUNNING: {
        E.CHECKPOINT: S.RUNNING,
        E.COMPLETE: S.SUCCEEDED,
        E.RETRY: S.QUEUED,
        E.FAIL: S.FAILED,
        E.INFRA_FAILURE: S.RESTARTING,
        E.REQUEUE: S.QUEUED,
        E.CANCEL: S.CANCELLED,
    },
    S.RESTARTING: {E.PLACE: S.PLACED, E.CANCEL: S.CANCELLED},
    S.SUCCEEDED: {},
    S.FAILED: {},
    S.CANCELLED: {},
}

TERMINAL = frozenset(s for s, out in TRANSITIONS.items() if not out)
LIVE = frozenset({S.PLACED, S.STARTING, S.RUNNING})
"""States in which the current attempt holds cards and may send events."""
WAITING = frozenset({S.QUEUED, S.RESTARTING})
"""States the scheduler places from."""

DEFAULT_MAX_USER_RETRIES = 2
DEFAULT_MAX_INFRA_RESTARTS = 50


class IllegalTransition(Conflict):
    """``event`` is not allowed in ``state`` (HTTP 409 when a caller asked for it)."""

    def __init__(self, state: JobState, event: JobEvent) -> None:
        super().__init__(f"cannot {event.value} a job that is {state.value}", field="state")
        self.state = state
        self.event = event


def transition(state: JobState, event: JobEvent) -> JobState:
    """The state after ``event`` in ``state``.

    Raises:
        IllegalTransition: the table has no such edge.
    """
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise IllegalTransition(state, event) from None


class JobRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What the lifecycle knows of one job. The store keeps it in the ``jobs`` row."""

    id: str
    tenant: str
    cards: int
    state: JobState = S.QUEUED
    attempt: int = 0
    """Current attempt number (0 before the first placement); the fencing token."""
    pool: str = ""
    accelerator: str = ""
    progress: float = 0.0
    """Fraction of the work done at the last checkpoint (what a restart resumes from)."""
    checkpoint: str = ""
    checkpoint_pool: str = ""
    """Pool holding the last checkpoint (a restart elsewhere pays to move it)."""
    user_retries: int = 0
    infra_restarts: int = 0
    max_user_retries: int = DEFAULT_MAX_USER_RETRIES
    max_infra_restarts: int = DEFAULT_MAX_INFRA_RESTARTS
    attempt_since: float | None = None
    """When the current attempt began holding cards (placement, then AttemptStarted.at)."""
    reason: str = ""
    updated_at: float = 0.0


class Meter(msgspec.Struct, frozen=True, kw_only=True, tag="meter"):
    """Bill one attempt: ``cards`` of ``accelerator`` at ``pool`` from ``start_at`` to ``end_at``."""

    job_id: str
    attempt: int
    pool: str
    accelerator: str
    cards: int
    start_at: float
    end_at: float

    @property
    def card_hours(self) -> float:
        return self.cards * max(0.0, self.end_at - self.start_at) / 3600.0


class Stop(msgspec.Struct, frozen=True, kw_only=True, tag="stop"):
    """Send ``wire.StopAttempt(job, attempt, checkpoint)`` to ``pool``."""

    job_id: str
    attempt: int
    pool: str
    checkpoint: bool
    reason: str


class Replan(msgspec.Struct, frozen=True, kw_only=True, tag="replan"):
    """Run a scheduler tick now (a job needs placing again)."""

    reason: str


Effect = Union[Meter, Stop, Replan]


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """Result of applying one step: the new record (unchanged when ignored) and effects to do."""

    record: JobRecord
    effects: list[Effect] = []
    ignored: str = ""
    """Empty when applied; else ``stale_attempt``, ``terminal`` or ``illegal`` (count it)."""
    detail: str = ""

    @property
    def applied(self) -> bool:
        return not self.ignored


def _move(rec: JobRecord, event: JobEvent, now: float, **changes: object) -> JobRecord:
    state = transition(rec.state, event)
    return msgspec.structs.replace(rec, state=state, updated_at=now, **changes)


def _meter(rec: JobRecord, end_at: float) -> list[Effect]:
    if rec.attempt_since is None or not rec.pool:
        return []
    return [
        Meter(
            job_id=rec.id,
            attempt=rec.attempt,
            pool=rec.pool,
            accelerator=rec.accelerator,
            cards=rec.cards,
            start_at=rec.attempt_since,
            end_at=max(end_at, rec.attempt_since),
        )
    ]


# --------------------------------------------------------------------------- hub-side steps


def place(rec: JobRecord, pool: str, accelerator: str, now: float) -> JobRecord:
    """The scheduler placed the job: new attempt number, pool and accelerator recorded.

    Raises:
        IllegalTransition: the job is not ``queued`` or ``restarting``.
    """
    return _move(
        rec,
        E.PLACE,
        now,
        attempt=rec.attempt + 1,
        pool=pool,
        accelerator=accelerator,
        attempt_since=now,
        reason="",
    )


def dispatched(rec: JobRecord, now: float) -> JobRecord:
    """The site acknowledged ``StartAttempt``. A no-op if AttemptStarted already arrived."""
    if rec.state is S.RUNNING:
        return rec
    return _move(rec, E.DISPATCH, now)


def cancel(rec: JobRecord, now: float, reason: str = "cancelled by tenant") -> Outcome:
    """The tenant cancels: terminal at once; a live attempt is stopped (no checkpoint) and billed.

    Raises:
        IllegalTransition: the job already finished (a 409 for the API).
    """
    live = rec.state in LIVE
    new = _move(rec, E.CANCEL, now, reason=reason)
    effects: list[Effect] = []
    if live:
        effects.append(Stop(job_id=rec.id, attempt=rec.attempt, pool=rec.pool, checkpoint=False, reason=reason))
        effects.extend(_meter(rec, now))
    return Outcome(record=new, effects=effects)


def preempt(rec: JobRecord, reason: str) -> list[Effect]:
    """Ask the live attempt to checkpoint and stop. The state changes when it exits (``stopped``).

    Raises:
        IllegalTransition: no live attempt to preempt.
    """
    if rec.state not in LIVE:
        raise IllegalTransition(rec.state, E.REQUEUE)
    return [Stop(job_id=rec.id, attempt=rec.attempt, pool=rec.pool, checkpoint=True, reason=reason)]


def infra_failure(rec: JobRecord, now: float, detail: str, *, attempt: int | None = None) -> Outcome:
    """The hub saw the attempt's infrastructure fail (site lost, dispatch failed, card fault).

    ``attempt`` fences like an agent event when given. Past ``max_infra_restarts`` the job fails
    (crash loop); otherwise it goes to ``restarting`` and a :class:`Replan` is asked for.
    """
    if attempt is not None and attempt != rec.attempt:
        return Outcome(record=rec, ignored="stale_attempt", detail=f"attempt {attempt} is not current ({rec.attempt})")
    if rec.state not in LIVE:
        return Outcome(record=rec, ignored="terminal" if rec.state in TERMINAL else "stale_attempt",
                       detail=f"job is {rec.state.value}")
    effects = _meter(rec, now)
    restarts = rec.infra_restarts + 1
    if restarts > rec.max_infra_restarts:
        why = f"gave up after {rec.max_infra_restarts} infrastructure restarts; last: {detail}"
        return Outcome(record=_move(rec, E.FAIL, now, infra_restarts=restarts, reason=why, attempt_since=None),
                       effects=effects)
    why = f"attempt {rec.attempt} lost to an infrastructure failure at {rec.pool}: {detail}"
    new = _move(rec, E.INFRA_FAILURE, now, infra_restarts=restarts, reason=why, attempt_since=None)
    return Outcome(record=new, effects=[*effects, Replan(reason=f"restart {rec.id}")])


# --------------------------------------------------------------------------- agent events


def apply_event(rec: JobRecord, event: wire.AttemptEvent) -> Outcome:
    """Apply one agent event (``AttemptStarted``, ``Checkpointed``, ``AttemptExited``).

    The event's ``at`` is the time used. Events of a non-current or no-longer-live attempt come
    back with ``ignored="stale_attempt"`` (plus a :class:`Stop` for a zombie that still runs);
    events for a finished job come back ``ignored="terminal"``.

    Raises:
        ValueError: the event is for another job (a caller bug, not a peer's).
    """
    if event.job != rec.id:
        raise ValueError(f"event for job {event.job!r} applied to job {rec.id!r}")
    now = event.at
    if rec.state in TERMINAL:
        return Outcome(record=rec, ignored="terminal", detail=f"job is {rec.state.value}")
    if event.attempt != rec.attempt or rec.state not in LIVE:
        effects: list[Effect] = []
        if not isinstance(event, wire.AttemptExited):
            effects.append(Stop(job_id=rec.id, attempt=event.attempt, pool=event.site, checkpoint=False,
                                reason=f"attempt {event.attempt} is stale (current {rec.attempt}, {rec.state.value})"))
        return Outcome(record=rec, effects=effects, ignored="stale_attempt",
                       detail=f"attempt {event.attempt} from {event.site}; current {rec.attempt} ({rec.state.value})")
    try:
        if isinstance(event, wire.AttemptStarted):
            return Outcome(record=_move(rec, E.START, now, attempt_since=now))
        if isinstance(event, wire.Checkpointed):
            new = _move(rec, E.CHECKPOINT, now, progress=max(rec.progress, min(1.0, event.progress)),
                        checkpoint=event.checkpoint, checkpoint_pool=rec.pool)
            return Outcome(record=new)
        return _exited(rec, event)
    except IllegalTransition as exc:
        return Outcome(record=rec, ignored="illegal", detail=str(exc))


def _exited(rec: JobRecord, ev: wire.AttemptExited) -> Outcome:
    now = ev.at
    effects = _meter(rec, now)
    done = {"attempt_since": None}
    if ev.reason == "completed":
        return Outcome(record=_move(rec, E.COMPLETE, now, progress=1.0, reason="", **done), effects=effects)
    if ev.reason == "stopped":
        why = f"attempt {rec.attempt} stopped" + (f": {ev.detail}" if ev.detail else "")
        return Outcome(record=_move(rec, E.REQUEUE, now, reason=why, **done),
                       effects=[*effects, Replan(reason=f"requeue {rec.id}")])
    if ev.reason == "infra_failure":
        out = infra_failure(rec, now, ev.detail or "infrastructure failure reported by the agent")
        return out
    # user_error: the job's own fault (non-zero exit)
    code = "?" if ev.exit_code is None else str(ev.exit_code)
    detail = f": {ev.detail}" if ev.detail else ""
    if rec.user_retries < rec.max_user_retries:
        used = rec.user_retries + 1
        why = f"attempt {rec.attempt} exited with code {code}{detail}; retry {used} of {rec.max_user_retries}"
        return Outcome(record=_move(rec, E.RETRY, now, user_retries=used, reason=why, **done),
                       effects=[*effects, Replan(reason=f"retry {rec.id}")])
    why = f"exited with code {code}{detail}; user-error retries exhausted ({rec.max_user_retries})"
    return Outcome(record=_move(rec, E.FAIL, now, reason=why, **done), effects=effects)
