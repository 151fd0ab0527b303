"""The command outbox in SQLite: table ``outbox`` (migration 0030).

A command to a site (``StartAttempt``, ``StopAttempt``, ``LoadModel``, ``UnloadModel``) is written here in the same transaction as
the decision that causes it, and sent afterwards by ``controlplane.services.outbox.CommandOutbox``. A hub
killed between the commit and the send finds the entry ``pending`` on start and sends it then;
agents treat the commands idempotently, so a second delivery is harmless.

Promises:

- :func:`enqueue` joins the caller's transaction (``db.transaction`` nests), so the entry commits
  or rolls back with the decision.
- An entry is ``pending`` until :func:`mark_sent` or :func:`mark_dropped`; both are final (a later
  call changes nothing and returns False), so two senders cannot both finish one entry.
- :func:`due` returns pending entries oldest first (the order they were decided in).

Public API::

    enqueue(db, site, kind, job_id, attempt, body, now) -> int           # entry id
    has_pending(db, site, kind, job_id, attempt) -> bool
    due(db, now, *, site=None, limit=500, kinds=None) -> [OutboxRow]     # pending, next_at <= now
    pending(db) -> [OutboxRow]                                           # every pending entry
    pending_keys(db, kinds) -> {(kind, job_id, site)}                    # what waits, for dedupe
    next_due_at(db, kinds=None) -> float | None
    mark_sent(db, entry_id, now, detail="") -> bool
    mark_dropped(db, entry_id, now, reason) -> bool
    retry_later(db, entry_id, next_at, error) -> None                    # tries + 1
    counts(db) -> {"pending": n, "sent": n, "dropped": n}
    for_job(db, job_id) -> [OutboxRow]
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import msgspec
import sqlite_utils

from controlplane.store.db import transaction


class OutboxRow(msgspec.Struct, kw_only=True):
    id: int
    site: str
    kind: str
    """The command's wire tag (``start_attempt``, ``stop_attempt``, ``load_model``, ``unload_model``)."""
    job_id: str
    """The job (attempt commands) or the deployment (model commands) the command is about."""
    attempt: int
    body: bytes
    """The command, JSON encoded as it goes on the wire."""
    state: str
    tries: int
    next_at: float
    created_at: float
    done_at: float | None
    detail: str


_COLS = "id, site, kind, job_id, attempt, body, state, tries, next_at, created_at, done_at, detail"


def _row(r: tuple[Any, ...]) -> OutboxRow:
    body = r[5].encode() if isinstance(r[5], str) else bytes(r[5])
    return OutboxRow(id=r[0], site=r[1], kind=r[2], job_id=r[3], attempt=r[4], body=body, state=r[6],
                     tries=r[7], next_at=r[8], created_at=r[9], done_at=r[10], detail=r[11])


def enqueue(db: sqlite_utils.Database, site: str, kind: str, job_id: str, attempt: int, body: bytes | str,
            now: float) -> int:
    """Add a pending command for ``site`` (inside the caller's transaction, if any); returns its id."""
    text = body.decode() if isinstance(body, bytes) else body
    with transaction(db, local=True):
        cur = db.conn.execute(
            "INSERT INTO outbox (site, kind, job_id, attempt, body, next_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (site, kind, job_id, attempt, text, now, now),
        )
    return int(cur.lastrowid or 0)


def has_pending(db: sqlite_utils.Database, site: str, kind: str, job_id: str, attempt: int) -> bool:
    """True if the same command for the same attempt is still waiting to be sent (no need to add it)."""
    row = db.conn.execute(
        "SELECT 1 FROM outbox WHERE job_id = ? AND attempt = ? AND site = ? AND kind = ? AND state = 'pending'",
        (job_id, attempt, site, kind),
    ).fetchone()
    return row is not None


def _kinds_sql(kinds: Collection[str] | None, args: list[Any]) -> str:
    if kinds is None:
        return ""
    args.extend(sorted(kinds))
    return f" AND kind IN ({', '.join('?' * len(kinds))})"


def due(db: sqlite_utils.Database, now: float, *, site: str | None = None, limit: int = 500,
        kinds: Collection[str] | None = None) -> list[OutboxRow]:
    """Pending entries whose ``next_at`` has come, oldest first (optionally for one site, only of ``kinds``)."""
    sql = f"SELECT {_COLS} FROM outbox WHERE state = 'pending' AND next_at <= ?"
    args: list[Any] = [now]
    if site is not None:
        sql += " AND site = ?"
        args.append(site)
    sql += _kinds_sql(kinds, args)
    sql += " ORDER BY id LIMIT ?"
    args.append(int(limit))
    return [_row(r) for r in db.conn.execute(sql, args)]


def pending(db: sqlite_utils.Database) -> list[OutboxRow]:
    """Every pending entry, oldest first."""
    return [_row(r) for r in db.conn.execute(f"SELECT {_COLS} FROM outbox WHERE state = 'pending' ORDER BY id")]


def pending_keys(db: sqlite_utils.Database, kinds: Collection[str]) -> set[tuple[str, str, str]]:
    """``(kind, job_id, site)`` of every pending entry of ``kinds`` (a deployment id is its ``job_id``)."""
    args: list[Any] = []
    sql = "SELECT kind, job_id, site FROM outbox WHERE state = 'pending'" + _kinds_sql(kinds, args)
    return {(k, j, s) for k, j, s in db.conn.execute(sql, args)}


def next_due_at(db: sqlite_utils.Database, kinds: Collection[str] | None = None) -> float | None:
    """When the earliest pending entry (of ``kinds``) is due, or None if nothing is pending."""
    args: list[Any] = []
    sql = "SELECT MIN(next_at) FROM outbox WHERE state = 'pending'" + _kinds_sql(kinds, args)
    (at,) = db.conn.execute(sql, args).fetchone()
    return None if at is None else float(at)


def _finish(db: sqlite_utils.Database, entry_id: int, state: str, now: float, detail: str) -> bool:
    with transaction(db, local=True):
        cur = db.conn.execute(
            "UPDATE outbox SET state = ?, done_at = ?, detail = ?, tries = tries + 1 WHERE id = ? AND state = 'pending'",
            (state, now, detail[:1000], entry_id),
        )
    return cur.rowcount == 1


def mark_sent(db: sqlite_utils.Database, entry_id: int, now: float, detail: str = "") -> bool:
    """The site acknowledged (or answered) the command; False if the entry was already finished."""
    return _finish(db, entry_id, "sent", now, detail)


def mark_dropped(db: sqlite_utils.Database, entry_id: int, now: float, reason: str) -> bool:
    """The command is no longer wanted (obsolete, refused, expired); False if already finished."""
    return _finish(db, entry_id, "dropped", now, reason)


def retry_later(db: sqlite_utils.Database, entry_id: int, next_at: float, error: str) -> None:
    """The send failed for a reason that may pass (site unreachable): try again at ``next_at``."""
    with transaction(db, local=True):
        db.conn.execute(
            "UPDATE outbox SET tries = tries + 1, next_at = ?, detail = ? WHERE id = ? AND state = 'pending'",
            (next_at, error[:1000], entry_id),
        )


def counts(db: sqlite_utils.Database) -> dict[str, int]:
    """Entries by state."""
    out = {"pending": 0, "sent": 0, "dropped": 0}
    for state, n in db.conn.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state"):
        out[state] = n
    return out


def for_job(db: sqlite_utils.Database, job_id: str) -> list[OutboxRow]:
    """Every entry about one job, oldest first (tests and the operator's view)."""
    return [_row(r) for r in db.conn.execute(f"SELECT {_COLS} FROM outbox WHERE job_id = ? ORDER BY id", (job_id,))]
