"""A job's events as a feed a tenant can follow: pages after a cursor, long-polls, progress marks.

- **Feed.** Every event the hub recorded for a job (the agent's ``attempt_started``,
  ``checkpointed``, ``attempt_exited`` and the hub's own ``progress``, ``start_refused``,
  ``vanished``, ``unplaceable``) in the order it was recorded, each with a cursor
  (``store.job_feed``). :meth:`JobFeed.page` reads after a cursor; :meth:`JobFeed.wait` waits up to
  ``wait_s`` for the first event after it (a long-poll; the gateway's Server-Sent Events stream is a
  loop of these). Waiting polls the record every ``poll_s``: the events may be written by another
  hub process (a controller apart from the gateway), so there is nothing in this process to wake on.
- **Progress marks.** Progress lives in heartbeats, which the hub does not store. After every
  scheduler tick (``TrainingService.tick_listeners``) each live attempt whose site reports progress
  past its next ``step`` (5 % by default) gets a hub ``progress`` event, so a follower sees the
  job move between checkpoints, with at most 1/step such events per attempt.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from controlplane.core import lifecycle
from controlplane.core.clock import Clock
from controlplane.services.training import JobRow, TrainingService
from controlplane.store import job_feed as store_feed
from controlplane.store import jobs as store_jobs
from controlplane.store.db import transaction
from controlplane.store.job_feed import FeedRow as FeedRow

if TYPE_CHECKING:
    from controlplane.store.handle import Store

PROGRESS_STEP = 0.05
"""A ``progress`` event each time an attempt's reported progress passes another 5 %."""
POLL_S = 0.5
"""How often a waiting follower reads the record."""
TERMINAL_STATES = frozenset(s.value for s in lifecycle.TERMINAL)

Key = tuple[str, int]


def progress_marks(last: Mapping[Key, float], seen: Mapping[Key, float], step: float) -> dict[Key, float]:
    """Pure: the attempts whose progress ``seen`` reached a step above their ``last`` mark, each with
    the step it reached (a multiple of ``step``; 1.0 is left to the exit event)."""
    out: dict[Key, float] = {}
    for key, progress in seen.items():
        if not math.isfinite(progress):
            continue
        mark = round(math.floor(min(progress, 1.0) / step + 1e-9) * step, 6)
        if 0.0 < mark < 1.0 and mark > last.get(key, 0.0) + 1e-9:
            out[key] = mark
    return out


class JobFeed:
    """Followable job events (name ``job_feed``)."""

    name = "job_feed"

    def __init__(self, *, store: Store, training: TrainingService, clock: Clock, poll_s: float = POLL_S,
                 step: float = PROGRESS_STEP) -> None:
        self.store = store
        self.training = training
        self.clock = clock
        self.poll_s = poll_s
        self.step = step
        self._last: dict[Key, float] = {}
        """(job, attempt) -> the progress of its last mark (read from the record on first sight)"""
        self.marks = 0

    def __repr__(self) -> str:
        return f"<JobFeed attempts={len(self._last)} marks={self.marks} step={self.step}>"

    # ------------------------------------------------------------------ reading

    def page(self, job_id: str, cursor: int, limit: int) -> list[FeedRow]:
        """Events of ``job_id`` after ``cursor``, oldest first, at most ``limit``."""
        return store_feed.after(self.store.db, job_id, cursor, limit)

    def finished(self, job_id: str) -> bool:
        """The job is in a final state (no event will follow once its last ones are read)."""
        row = self.training.job(job_id)
        return row is None or row.state in TERMINAL_STATES

    async def wait(self, job_id: str, cursor: int, limit: int, wait_s: float) -> list[FeedRow]:
        """Events after ``cursor``; if there are none yet, wait up to ``wait_s`` for the first (and
        not at all once the job has finished)."""
        deadline = self.clock.monotonic() + max(0.0, wait_s)
        while True:
            rows = self.page(job_id, cursor, limit)
            left = deadline - self.clock.monotonic()
            if rows or left <= 0 or self.finished(job_id):
                # the job may have finished between the read and the check: read once more
                return rows or self.page(job_id, cursor, limit)
            await self.clock.sleep(min(self.poll_s, left))

    # ------------------------------------------------------------------ progress marks

    def record_progress(self, live: Mapping[str, JobRow], now: float) -> int:
        """Tick listener: write a ``progress`` event for every live attempt past its next step."""
        seen: dict[Key, float] = {}
        for row in live.values():
            progress = self.training.live_progress(row)
            if progress is not None:
                seen[(row.id, row.attempt)] = progress
        db = self.store.db
        for key in seen.keys() - self._last.keys():
            self._last[key] = store_feed.last_progress_mark(db, *key) or 0.0
        due = progress_marks(self._last, seen, self.step)
        if due:
            with transaction(db, local=True):  # job events are local: no read barrier of the record
                for (job, attempt), mark in sorted(due.items()):
                    store_jobs.record_hub_event(db, job, attempt, "progress",
                                                {"site": live[job].pool, "progress": mark}, now)
            self._last.update(due)
            self.marks += len(due)
        current = {(r.id, r.attempt) for r in live.values()}
        if len(self._last) > 2 * len(current) + 1000:
            self._last = {k: v for k, v in self._last.items() if k in current}
        return len(due)
