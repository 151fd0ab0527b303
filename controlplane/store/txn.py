"""One atomic, durable SQLite transaction, shared by every store (the market's included).

Its own module because ``store/db.py`` installs the market's tables: the market's stores import
this, not ``db``, so there is one transaction and no import cycle.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import sqlite_utils


class WriteHook(Protocol):
    """What a database's ``write_hook`` does around each outermost :func:`transaction` (the
    replicated record's projection, ``store/replica.py``): raising in ``before_commit`` rolls back."""

    def before_begin(self) -> None: ...

    def before_commit(self) -> None: ...

    def after_commit(self) -> None: ...

    def after_rollback(self) -> None: ...


@contextmanager
def transaction(db: sqlite_utils.Database, *, local: bool = False) -> Iterator[sqlite_utils.Database]:
    """One atomic, durable transaction: ``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on error).

    The connection runs in autocommit mode (``isolation_level=None``), so ``with db.conn:`` alone
    does *not* group statements; use this for anything that writes more than one row. Nested use
    joins the outer transaction.

    A database with a ``write_hook`` (the replicated record) runs it around the outermost
    transaction: its ``before_commit`` publishes the rows to the record and may raise, which rolls
    the transaction back. ``local``: the transaction reads and writes local-only tables (the
    outbox, sites): it skips the record's read barrier, which could hold the loop while the record
    elects a leader.
    """
    conn = db.conn
    if conn.in_transaction:
        yield db
        return
    hook: WriteHook | None = getattr(db, "write_hook", None)
    if hook is not None and not local:
        hook.before_begin()
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield db
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
