"""The ledger in SQLite: append-only, idempotent by key, balanced, one transaction per post.

Promises (the pure rules of ``controlplane.market.ledger``, kept by the record):

- Rule 1: every transaction is re-checked with ``ledger.transaction`` before it is written (its
  entries sum to zero), and written with its entries in one ``BEGIN IMMEDIATE`` transaction:
  all of it lands or none of it. ``post_many`` writes a batch (a job's attempts, a usage flush)
  in one transaction, one fsync.
- Rule 2: the key is the primary key. Re-posting the same transaction is a ``Replayed`` and writes
  nothing; another transaction under a taken key is a ``Conflict`` and writes nothing.
- Rule 3: triggers refuse any UPDATE or DELETE of ``market_transactions`` and ``market_entries``:
  corrections are new transactions.
- Rule 4 (replicated): with the replicated record (``record = "nats"``) the ledger is part of it.
  One ledger transaction is one row of ``market_transactions`` (one record key, its entries in
  its ``body``); ``market_entries`` is derived from that body by a trigger, in every process (when
  this process posts and when it applies another process's posting), so a posting is never
  published without its entries nor split across keys. Keys are unique across processes (usage
  flushes carry the hub id, attempts the job), so two processes never post under one key; should
  they race on one, the record's compare-and-set lets one win and the other rolls back (409).
- The schema is migrations ``0040_market_ledger`` and ``0043_market_replicated`` (no process-local
  sequence number, entries derived from the body; immutable except while the replica applies or
  rebuilds from the record, which it does with foreign keys off), recorded in the same
  ``_migrations`` table as the hub's own; :func:`install` applies them once. (Their triggers hold
  semicolons, so they are lists of statements, not scripts: keep them so when they join
  ``store/migrations.py``.)
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

import msgspec
import sqlite_utils

from controlplane.market import ledger, postings
from controlplane.store.market.db import apply_migration
from controlplane.store.txn import transaction

MIGRATION_ID = "0040_market_ledger"
_ENTRIES = (
    """CREATE TABLE market_entries (
        key TEXT NOT NULL REFERENCES market_transactions (key),
        line INTEGER NOT NULL,
        at REAL NOT NULL,
        account TEXT NOT NULL,
        amount_fen INTEGER NOT NULL CHECK (typeof(amount_fen) = 'integer'),
        kind TEXT NOT NULL,
        memo TEXT NOT NULL,
        PRIMARY KEY (key, line)
    )""",
    "CREATE INDEX market_entries_by_account ON market_entries (account, at)",
    "CREATE INDEX market_transactions_by_at ON market_transactions (at)",
)
"""The entries table and the two indexes, as both migrations create them."""

MIGRATION: tuple[str, ...] = (
    """CREATE TABLE market_transactions (
        key TEXT PRIMARY KEY,
        seq INTEGER NOT NULL UNIQUE,
        at REAL NOT NULL,
        kind TEXT NOT NULL,
        ref TEXT NOT NULL,
        body TEXT NOT NULL
    )""",
    *_ENTRIES,
    """CREATE TRIGGER market_transactions_no_update BEFORE UPDATE ON market_transactions
       BEGIN SELECT RAISE(ABORT, 'ledger transactions are immutable'); END""",
    """CREATE TRIGGER market_transactions_no_delete BEFORE DELETE ON market_transactions
       BEGIN SELECT RAISE(ABORT, 'ledger transactions are immutable'); END""",
    """CREATE TRIGGER market_entries_no_update BEFORE UPDATE ON market_entries
       BEGIN SELECT RAISE(ABORT, 'ledger entries are immutable'); END""",
    """CREATE TRIGGER market_entries_no_delete BEFORE DELETE ON market_entries
       BEGIN SELECT RAISE(ABORT, 'ledger entries are immutable'); END""",
)

_GUARD = "WHEN cpn_ledger_sealed((SELECT foreign_keys FROM pragma_foreign_keys))"
"""Immutability holds on a hub's connection while foreign keys are on: always, except while the
replicated record's projection applies or rebuilds rows (``store/replica.py`` runs those with
foreign keys off). Any other connection (the sqlite3 shell, a script) lacks ``cpn_ledger_sealed``
and every UPDATE or DELETE of a ledger row fails there."""
_DERIVE_ENTRIES = """INSERT INTO market_entries (key, line, at, account, amount_fen, kind, memo)
       SELECT NEW.key, CAST(j.key AS INTEGER), NEW.at, json_extract(j.value, '$.account'),
              json_extract(j.value, '$.amount_fen'), json_extract(j.value, '$.kind'),
              COALESCE(json_extract(j.value, '$.memo'), '')
       FROM json_each(NEW.body, '$.entries') AS j"""

REPLICATED_ID = "0043_market_replicated"
REPLICATED: tuple[str, ...] = (
    """CREATE TABLE market_transactions_new (
        key TEXT PRIMARY KEY,
        at REAL NOT NULL,
        kind TEXT NOT NULL,
        ref TEXT NOT NULL,
        body TEXT NOT NULL
    )""",
    "INSERT INTO market_transactions_new (key, at, kind, ref, body) SELECT key, at, kind, ref, body FROM market_transactions",
    "DROP TABLE market_entries",
    "DROP TABLE market_transactions",
    "ALTER TABLE market_transactions_new RENAME TO market_transactions",
    *_ENTRIES,
    f"""CREATE TRIGGER market_transactions_entries AFTER INSERT ON market_transactions
       BEGIN {_DERIVE_ENTRIES}; END""",
    f"""CREATE TRIGGER market_transactions_no_update BEFORE UPDATE ON market_transactions {_GUARD}
       BEGIN SELECT RAISE(ABORT, 'ledger transactions are immutable'); END""",
    f"""CREATE TRIGGER market_transactions_no_delete BEFORE DELETE ON market_transactions {_GUARD}
       BEGIN SELECT RAISE(ABORT, 'ledger transactions are immutable'); END""",
    """CREATE TRIGGER market_transactions_deleted AFTER DELETE ON market_transactions
       BEGIN DELETE FROM market_entries WHERE key = OLD.key; END""",
    f"""CREATE TRIGGER market_entries_no_update BEFORE UPDATE ON market_entries {_GUARD}
       BEGIN SELECT RAISE(ABORT, 'ledger entries are immutable'); END""",
    f"""CREATE TRIGGER market_entries_no_delete BEFORE DELETE ON market_entries {_GUARD}
       BEGIN SELECT RAISE(ABORT, 'ledger entries are immutable'); END""",
    "INSERT INTO market_entries (key, line, at, account, amount_fen, kind, memo) "
    "SELECT t.key, CAST(j.key AS INTEGER), t.at, json_extract(j.value, '$.account'), "
    "json_extract(j.value, '$.amount_fen'), json_extract(j.value, '$.kind'), "
    "COALESCE(json_extract(j.value, '$.memo'), '') FROM market_transactions AS t, json_each(t.body, '$.entries') AS j",
)
"""The ledger made fit for the replicated record (Rule 4): the process-local ``seq`` goes (two
processes would number their postings alike), entries are derived from each transaction's body."""

_decode = msgspec.json.Decoder(ledger.Transaction).decode


def install(db: sqlite_utils.Database) -> bool:
    """Apply the market ledger's migrations if not yet applied; True if the first was applied now.
    Registers the immutability guard's function on this connection (``_GUARD``)."""
    db.conn.create_function("cpn_ledger_sealed", 1, lambda foreign_keys: foreign_keys, deterministic=True)
    first = apply_migration(db, MIGRATION_ID, MIGRATION)
    apply_migration(db, REPLICATED_ID, REPLICATED)
    return first


def _existing(conn: sqlite3.Connection, key: str) -> ledger.Transaction | None:
    row = conn.execute("SELECT body FROM market_transactions WHERE key = ?", (key,)).fetchone()
    return _decode(row[0]) if row else None


def _post_one(conn: sqlite3.Connection, txn: ledger.Transaction) -> ledger.PostResult:
    checked = ledger.transaction(txn.key, txn.at, txn.kind, txn.entries, ref=txn.ref)
    decision = ledger.repost(_existing(conn, checked.key), checked)
    if decision == "replay":
        return ledger.Replayed(checked)
    if isinstance(decision, ledger.Conflict):
        return decision
    # its entries follow from the body (trigger ``market_transactions_entries``, Rule 4)
    conn.execute("INSERT INTO market_transactions (key, at, kind, ref, body) VALUES (?, ?, ?, ?, ?)",
                 (checked.key, checked.at, checked.kind, checked.ref, msgspec.json.encode(checked).decode()))
    return ledger.Posted(checked)


def post(db: sqlite_utils.Database, txn: ledger.Transaction) -> ledger.PostResult:
    """Post one transaction (Rules 1-2).

    Raises:
        ledger.UnbalancedTransaction: the transaction does not balance (nothing is written).
    """
    return post_many(db, [txn])[0]


def post_many(db: sqlite_utils.Database, txns: Iterable[ledger.Transaction]) -> list[ledger.PostResult]:
    """Post a batch in one SQLite transaction; each is posted, replayed or a conflict on its own.

    Raises:
        ledger.UnbalancedTransaction: one of them does not balance (nothing of the batch is written).
    """
    conn = db.conn
    with transaction(db):
        return [_post_one(conn, t) for t in txns]


def get(db: sqlite_utils.Database, key: str) -> ledger.Transaction | None:
    return _existing(db.conn, key)


def load(db: sqlite_utils.Database, *, account: str | None = None, before: float | None = None) -> list[ledger.Transaction]:
    """Transactions in book order (time, key): all, or those touching ``account``, before ``before``."""
    where: list[str] = []
    args: list[object] = []
    if account is not None:
        where.append("key IN (SELECT key FROM market_entries WHERE account = ?)")
        args.append(account)
    if before is not None:
        where.append("at < ?")
        args.append(before)
    sql = "SELECT body FROM market_transactions" + (" WHERE " + " AND ".join(where) if where else "")
    rows = db.conn.execute(sql + " ORDER BY at, key", args).fetchall()
    return [_decode(r[0]) for r in rows]


def statement(db: sqlite_utils.Database, account: str, start: float, end: float) -> ledger.Statement:
    """``account``'s statement for ``[start, end)``: the opening balance summed in SQL, the lines
    by the pure ``ledger.statement``."""
    opening = db.conn.execute(
        "SELECT COALESCE(SUM(amount_fen), 0) FROM market_entries WHERE account = ? AND at < ?", (account, start),
    ).fetchone()[0]
    rows = db.conn.execute(
        """SELECT body FROM market_transactions WHERE at >= ? AND at < ?
           AND key IN (SELECT key FROM market_entries WHERE account = ?) ORDER BY at, key""",
        (start, end, account),
    ).fetchall()
    st = ledger.statement([_decode(r[0]) for r in rows], account, start, end)
    running = opening
    lines = []
    for line in st.lines:
        running += line.amount_fen
        lines.append(msgspec.structs.replace(line, balance_fen=running))
    return msgspec.structs.replace(st, opening_fen=opening, lines=lines, closing_fen=running)


def spent_fen(db: sqlite_utils.Database, tenant: str, start: float, end: float) -> int:
    """``postings.spent_fen`` summed in SQL (the budget check's ``spent``)."""
    kinds = sorted(postings.SPENDING_KINDS)
    row = db.conn.execute(
        f"""SELECT COALESCE(SUM(amount_fen), 0) FROM market_entries WHERE account = ? AND at >= ? AND at < ?
            AND kind IN ({", ".join("?" * len(kinds))})""",
        (postings.tenant_account(tenant), start, end, *kinds),
    ).fetchone()
    return -int(row[0])


def balances(db: sqlite_utils.Database) -> dict[str, int]:
    """Every account's balance, summed in SQL."""
    rows = db.conn.execute("SELECT account, SUM(amount_fen) FROM market_entries GROUP BY account ORDER BY account")
    return {a: int(v) for a, v in rows.fetchall()}


def imbalance(db: sqlite_utils.Database) -> int:
    """Sum of every entry ever posted: 0 unless the record was tampered with outside this module."""
    return int(db.conn.execute("SELECT COALESCE(SUM(amount_fen), 0) FROM market_entries").fetchone()[0])
