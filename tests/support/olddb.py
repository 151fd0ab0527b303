"""A hub database as an older release left it, for tests of the migrations that came after."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from controlplane.store import db as store_db
from controlplane.store.migrations import MIGRATIONS


def migrated_before(path: Path, first_missing: str) -> sqlite3.Connection:
    """Create the database ``path`` with every migration before ``first_missing`` (an id such as
    ``"0031"``) applied and recorded, as the release before that migration left it.

    Returns:
        An open autocommit connection, for the rows such a release wrote; close it before opening
        the database (which runs the missing migrations).
    """
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE _migrations (id TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    for mid, sql in MIGRATIONS:
        if mid >= first_missing:
            break
        store_db.run_migration(conn, sql)
        conn.execute("INSERT INTO _migrations VALUES (?, 0)", (mid,))
    return conn
