"""One atomic, durable SQLite transaction, shared by every store (the market's included), and
:func:`derived`, the transaction of derived state that stays out of the replicated record.

Its own module because ``store/db.py`` installs the market's tables: the market's stores import
this, not ``db``, so there is one transaction and no import cycle.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
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


@contextmanager
def derived(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """A transaction of derived state (why jobs wait: the leader works it out again at every
    tick): written to this process's SQLite only, never to the replicated record (a
    ``write_hook``'s ``uncaptured`` lets its replicated tables be written unpublished), and not
    fsynced (WAL + ``synchronous=NORMAL``: consistent; a crash may lose the last few, which the
    next tick says again). Not inside another transaction."""
    conn = db.conn
    if conn.in_transaction:
        raise RuntimeError("derived() inside a transaction")
    uncaptured = getattr(getattr(db, "write_hook", None), "uncaptured", None)
    (was,) = conn.execute("PRAGMA synchronous").fetchone()
    with uncaptured() if uncaptured is not None else nullcontext():
        conn.execute("PRAGMA synchronous = NORMAL")
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.execute(f"PRAGMA synchronous = {int(was)}")
