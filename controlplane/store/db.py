"""Opening the database: pragmas asserted, migrations applied, one connection per process.

Promises: WAL journal and ``synchronous=FULL`` (every commit is on disk before a 2xx answer);
refuses to start if SQLite will not give us those; migrations are applied in order, once each.
The database, its -wal and -shm files are mode 0600 and a directory created for them 0700,
whatever the umask (SQLite gives the -wal and -shm files the database file's mode).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from controlplane.core.errors import StoreError
from controlplane.store.migrations import MIGRATIONS, Migration
from controlplane.store.txn import transaction as transaction  # re-exported: the stores' one transaction
from controlplane.store.txn import derived as derived  # re-exported: derived state, never the record's
from edge_agent import private_files
from controlplane.store.market import billing as market_billing

T = TypeVar("T")

Database = sqlite_utils.Database
"""The record's connection, as the layers above name it (only the store imports SQLite)."""


def open_db(path: Path | str, *, factory: Any = sqlite_utils.Database) -> sqlite_utils.Database:
    """Open (creating) the database at ``path`` and bring its schema up to date.

    Raises:
        StoreError: the journal mode or synchronous setting could not be enforced, or a
            migration failed.
    """
    path = Path(path)
    private_files.private_dir(path.parent, tighten_existing=False)  # an existing one may be the user's cwd
    for part in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if part == path or part.exists():
            private_files.private_file(part)
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 5000")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    sync = conn.execute("PRAGMA synchronous").fetchone()[0]
    if str(mode).lower() != "wal" or sync != 2:
        raise StoreError(f"{path}: need journal_mode=wal and synchronous=FULL, got {mode} and {sync}")
    db: sqlite_utils.Database = factory(conn)
    migrate(db)
    market_billing.install(db)  # the market's tables (migrations 0040-0042: lists of statements, see there)
    return db


def migrate(db: sqlite_utils.Database) -> list[str]:
    """Apply the migrations not yet applied; return their ids."""
    conn = db.conn
    conn.execute("CREATE TABLE IF NOT EXISTS _migrations (id TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    done = {row[0] for row in conn.execute("SELECT id FROM _migrations")}
    ids = [mid for mid, _ in MIGRATIONS]
    if len(set(ids)) != len(ids) or ids != sorted(ids):
        raise StoreError(f"migration ids must be unique and ascending: {ids}")
    applied = []
    for mid, sql in MIGRATIONS:
        if mid in done:
            continue
        try:
            conn.execute("BEGIN IMMEDIATE")
            run_migration(conn, sql)
            conn.execute("INSERT INTO _migrations (id, applied_at) VALUES (?, julianday('now'))", (mid,))
            conn.execute("COMMIT")
        except Exception as exc:  # SQL, or a bug in a data migration: nothing of it is kept
            conn.execute("ROLLBACK")
            raise StoreError(f"migration {mid} failed: {exc}") from exc
        applied.append(mid)
    return applied


def run_migration(conn: sqlite3.Connection, migration: Migration) -> None:
    """Run one migration's statements (or its function) on ``conn``, in the caller's transaction."""
    if callable(migration):
        migration(conn)
        return
    for statement in _statements(migration):
        conn.execute(statement)


def _statements(sql: str) -> list[str]:
    # Our migrations hold no semicolons inside literals or triggers, so a split is exact.
    return [s.strip() for s in sql.split(";") if s.strip()]


async def write(db: sqlite_utils.Database, fn: Callable[[sqlite_utils.Database], T], *, fenced: bool = True,
                optimistic: bool = False) -> T:
    """``fn(db)`` as one :func:`transaction`, awaited: on the replicated record the loop goes on
    while the record acknowledges, and several such writes of one process are in flight at once
    (``Replica.write``; ``fenced=False`` for a write made for a tenant rather than a leader's
    decision). ``fn`` may run more than once and must have no effect outside the database.
    ``optimistic``: ``fn`` reads only rows it also writes, so the record's compare-and-set catches
    a stale read and the read barrier before it is skipped (``Replica.write``, Rule 8).
    """
    hook = getattr(db, "write_hook", None)
    pipelined = getattr(hook, "write", None)
    if pipelined is not None and getattr(hook, "pipelined", False) and not db.conn.in_transaction:
        result: T = await pipelined(fn, fenced=fenced, optimistic=optimistic)
        return result
    with transaction(db):
        return fn(db)


async def barrier(db: sqlite_utils.Database) -> bool:
    """On the replicated record: the read barrier of the synchronous transactions that follow in
    this turn of the event loop, awaited rather than blocking (``Replica.barrier``). Else nothing.
    False when the record did not answer it in time (what is read is then what was here).
    A transaction open across an await elsewhere does not skip it: the hook waits for it to end."""
    hook = getattr(db, "write_hook", None)
    awaited = getattr(hook, "barrier", None)
    if awaited is not None:
        return bool(await awaited())
    return True


def close(db: sqlite_utils.Database) -> None:
    """Close the database and, for a projection of the replicated record, its link to the record."""
    hook = getattr(db, "write_hook", None)
    db.conn.close()
    closer = getattr(hook, "close", None)
    if closer is not None:
        closer()


def pragmas(db: sqlite_utils.Database) -> dict[str, object]:
    """Current journal mode and synchronous level (for /healthz and tests)."""
    conn = db.conn
    return {
        "journal_mode": conn.execute("PRAGMA journal_mode").fetchone()[0],
        "synchronous": conn.execute("PRAGMA synchronous").fetchone()[0],
    }
