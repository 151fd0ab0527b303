"""Shared by the market's stores: one transaction, and applying a migration once."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import sqlite_utils


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on error; joins an outer transaction.

    Same contract as ``controlplane.store.db.transaction``; kept here while ``controlplane/store``
    moves (use that one once the restructure lands).
    """
    if conn.in_transaction:
        yield
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def apply_migration(db: sqlite_utils.Database, migration_id: str, statements: Sequence[str]) -> bool:
    """Run ``statements`` once, recorded under ``migration_id`` in the hub's ``_migrations`` table
    (created if missing, as ``controlplane.store.db.migrate`` does); True if applied now."""
    conn = db.conn
    conn.execute("CREATE TABLE IF NOT EXISTS _migrations (id TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    if conn.execute("SELECT 1 FROM _migrations WHERE id = ?", (migration_id,)).fetchone():
        return False
    with transaction(conn):
        for statement in statements:
            conn.execute(statement)
        conn.execute("INSERT INTO _migrations (id, applied_at) VALUES (?, julianday('now'))", (migration_id,))
    return True
