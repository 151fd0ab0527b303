"""Shared by the market's stores: applying a migration once (their transaction is ``store/txn.py``'s)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import sqlite_utils


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
