"""Shared by the market's stores: one transaction, and applying a migration once."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import sqlite_utils


@contextmanager
def transaction(db: sqlite_utils.Database) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on error; joins an outer transaction.

    Same contract as ``controlplane.store.db.transaction``, its database's ``write_hook`` included
    (the replicated record publishes the market's rows before SQLite commits). A copy, not an
    import: ``store/db.py`` installs the market's tables, so importing it here would be a cycle.
    """
    conn = db.conn
    if conn.in_transaction:
        yield
        return
    hook = getattr(db, "write_hook", None)
    if hook is not None:
        hook.before_begin()
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        if hook is not None:
            hook.before_commit()
    except BaseException:
        conn.execute("ROLLBACK")
        if hook is not None:
            hook.after_rollback()
        raise
    conn.execute("COMMIT")
    if hook is not None:
        hook.after_commit()


def apply_migration(db: sqlite_utils.Database, migration_id: str, statements: Sequence[str]) -> bool:
    """Run ``statements`` once, recorded under ``migration_id`` in the hub's ``_migrations`` table
    (created if missing, as ``controlplane.store.db.migrate`` does); True if applied now.
    (Migrations run before the database joins the replicated record: never through its hook.)"""
    conn: sqlite3.Connection = db.conn
    conn.execute("CREATE TABLE IF NOT EXISTS _migrations (id TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    if conn.execute("SELECT 1 FROM _migrations WHERE id = ?", (migration_id,)).fetchone():
        return False
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in statements:
            conn.execute(statement)
        conn.execute("INSERT INTO _migrations (id, applied_at) VALUES (?, julianday('now'))", (migration_id,))
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return True
