"""A job's events (table ``job_events``) read as a feed: in the order the hub recorded them, each
with a cursor a follower resumes from.

Promises:

- The cursor of an event is its ``rowid``. Writers are serialised (``BEGIN IMMEDIATE``) and events
  are never deleted, so a later commit always has a larger cursor: "everything after cursor N" never
  skips an event that was committed after the follower read N.
- Read-only: events are written by ``store.jobs.record_event`` and
  ``store.jobs.record_hub_event``.

Public API::

    after(db, job_id, cursor, limit) -> [FeedRow]            # cursor > given, oldest first
    last_progress_mark(db, job_id, attempt) -> float | None  # the hub's last ``progress`` event
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import sqlite_utils

from controlplane.store.jobs import HUB_EVENT_SITE


class FeedRow(msgspec.Struct, kw_only=True):
    id: int
    """The cursor: resume with ``after(..., cursor=id)``."""
    job_id: str
    attempt: int
    site: str
    seq: int
    kind: str
    body: dict[str, Any]
    at: float


def after(db: sqlite_utils.Database, job_id: str, cursor: int, limit: int) -> list[FeedRow]:
    """A job's events recorded after ``cursor`` (0: from the first), oldest first, at most ``limit``."""
    rows = db.conn.execute(
        "SELECT rowid, job_id, attempt, site, seq, kind, body, at FROM job_events "
        "WHERE job_id = ? AND rowid > ? ORDER BY rowid LIMIT ?",
        (job_id, int(cursor), int(limit)),
    )
    return [FeedRow(id=r[0], job_id=r[1], attempt=r[2], site=r[3], seq=r[4], kind=r[5], body=json.loads(r[6]),
                    at=r[7]) for r in rows]


def last_progress_mark(db: sqlite_utils.Database, job_id: str, attempt: int) -> float | None:
    """The highest progress of the hub's ``progress`` events for this attempt, or None."""
    (value,) = db.conn.execute(
        "SELECT MAX(json_extract(body, '$.progress')) FROM job_events "
        "WHERE job_id = ? AND attempt = ? AND site = ? AND kind = 'progress'",
        (job_id, attempt, HUB_EVENT_SITE),
    ).fetchone()
    return None if value is None else float(value)
