"""The market ledger in a real SQLite file (controlplane/store/market/ledger.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgspec
import pytest
import sqlite_utils

from controlplane.market import catalogue, ledger, offers, postings, quotes
from controlplane.store.market import ledger as store

T0 = 1_796_000_400.0
MODEL = catalogue.ModelRecord(id="qwen2-7b", owner="modelco", input_fen_per_mtok=200, output_fen_per_mtok=600)
OFFER = offers.Offer(id="zw-o", pool="nx-zw", provider="westgrid", accelerator="910B", fen_per_card_hour=900)


def open_db(path: Path) -> sqlite_utils.Database:
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    db = sqlite_utils.Database(conn)
    store.install(db)
    return db


def job_txns() -> list[ledger.Transaction]:
    attempts = [quotes.AttemptUsage(attempt=n, pool="nx-zw", cards=8, start_at=T0 + n * 7200.0,
                                    end_at=T0 + n * 7200.0 + 3600.0, offer=OFFER) for n in (1, 2)]
    return postings.job_transactions("acme", "j1", quotes.charge_for(None, attempts))


def test_posts_survive_reopening_and_reposting_changes_nothing(tmp_path: Path) -> None:
    db = open_db(tmp_path / "cpn.db")
    assert not store.install(db)                       # applied once
    results = store.post_many(db, job_txns())
    assert [type(r) for r in results] == [ledger.Posted, ledger.Posted]
    usage = postings.usage_transaction("f1", T0, "acme", MODEL, "hz", 10**6, 10**6)
    assert isinstance(store.post(db, usage), ledger.Posted)
    db.conn.close()

    db = open_db(tmp_path / "cpn.db")
    before = store.balances(db)
    assert [type(r) for r in store.post_many(db, [*job_txns(), usage])] == [ledger.Replayed] * 3
    assert store.balances(db) == before == {"operator:margin": 800 + 2 * 720, "provider:westgrid": 2 * 6480,
                                            "tenant:acme": -(2 * 7200 + 800)}
    assert store.imbalance(db) == 0
    conflict = store.post(db, postings.usage_transaction("f1", T0, "acme", MODEL, "hz", 10**6, 1))
    assert isinstance(conflict, ledger.Conflict) and conflict.existing == usage
    assert store.get(db, usage.key) == usage
    assert store.load(db) == ledger.ordered([*job_txns(), usage])


def test_an_unbalanced_transaction_in_a_batch_writes_nothing(tmp_path: Path) -> None:
    db = open_db(tmp_path / "cpn.db")
    bad = ledger.Transaction(key="bad", at=T0, kind="x",
                             entries=(ledger.Entry(account="tenant:acme", amount_fen=-1, kind="x"),))
    with pytest.raises(ledger.UnbalancedTransaction):
        store.post_many(db, [*job_txns(), bad])
    assert store.load(db) == [] and store.balances(db) == {}


EDITS = ("UPDATE market_entries SET amount_fen = 0", "DELETE FROM market_entries",
         "UPDATE market_transactions SET at = 0", "DELETE FROM market_transactions")


def test_entries_cannot_be_edited_or_deleted(tmp_path: Path) -> None:
    db = open_db(tmp_path / "cpn.db")
    db.conn.execute("PRAGMA foreign_keys = ON")        # as every hub connection (store/db.open_db)
    store.post_many(db, job_txns())
    for sql in EDITS:
        with pytest.raises(sqlite3.IntegrityError, match="immutable"):
            db.conn.execute(sql)
    assert store.imbalance(db) == 0
    # another connection (a shell, a script) cannot edit it either, foreign keys on or off
    for fk in ("ON", "OFF"):
        other = sqlite3.connect(str(tmp_path / "cpn.db"), isolation_level=None)
        other.execute(f"PRAGMA foreign_keys = {fk}")
        for sql in EDITS:
            with pytest.raises(sqlite3.OperationalError, match="cpn_ledger_sealed"):
                other.execute(sql)
        other.close()
    assert len(store.load(db)) == 2 and store.imbalance(db) == 0


def test_the_replicas_rebuild_may_empty_it_and_entries_follow_their_transactions(tmp_path: Path) -> None:
    """The replicated record's projection rebuilds the tables with foreign keys off (store/replica.py
    Rule 6): only then may rows go, and a transaction's entries go with it and come back with it."""
    db = open_db(tmp_path / "cpn.db")
    db.conn.execute("PRAGMA foreign_keys = ON")
    txns = job_txns()
    store.post_many(db, txns)
    rows = db.conn.execute("SELECT key, at, kind, ref, body FROM market_transactions").fetchall()
    entries = db.conn.execute("SELECT * FROM market_entries ORDER BY key, line").fetchall()
    assert len(entries) == sum(len(t.entries) for t in txns)
    db.conn.execute("PRAGMA foreign_keys = OFF")
    db.conn.execute("DELETE FROM market_transactions")
    assert db.conn.execute("SELECT COUNT(*) FROM market_entries").fetchone()[0] == 0
    db.conn.executemany("INSERT INTO market_transactions (key, at, kind, ref, body) VALUES (?, ?, ?, ?, ?)", rows)
    db.conn.execute("PRAGMA foreign_keys = ON")
    assert db.conn.execute("SELECT * FROM market_entries ORDER BY key, line").fetchall() == entries
    assert store.load(db) == sorted(txns, key=lambda t: (t.at, t.key))


def test_a_ledger_from_before_0043_keeps_its_entries(tmp_path: Path) -> None:
    """Migration 0043 drops the process-local ``seq`` and derives entries from the bodies: the
    entries a 0040 ledger held are exactly those derived."""
    conn = sqlite3.connect(str(tmp_path / "cpn.db"), isolation_level=None)
    db = sqlite_utils.Database(conn)
    from controlplane.store.market.db import apply_migration
    apply_migration(db, store.MIGRATION_ID, store.MIGRATION)
    txns = job_txns()
    for seq, t in enumerate(txns, 1):
        conn.execute("INSERT INTO market_transactions (key, seq, at, kind, ref, body) VALUES (?, ?, ?, ?, ?, ?)",
                     (t.key, seq, t.at, t.kind, t.ref, msgspec.json.encode(t).decode()))
        conn.executemany("INSERT INTO market_entries VALUES (?, ?, ?, ?, ?, ?, ?)",
                         [(t.key, i, t.at, e.account, e.amount_fen, e.kind, e.memo) for i, e in enumerate(t.entries)])
    before = conn.execute("SELECT * FROM market_entries ORDER BY key, line").fetchall()
    store.install(db)
    assert conn.execute("SELECT * FROM market_entries ORDER BY key, line").fetchall() == before
    assert "seq" not in [r[1] for r in conn.execute("PRAGMA table_info(market_transactions)")]
    assert store.imbalance(db) == 0 and store.load(db) == sorted(txns, key=lambda t: (t.at, t.key))


def test_statement_from_the_record_equals_the_pure_one(tmp_path: Path) -> None:
    db = open_db(tmp_path / "cpn.db")
    txns = job_txns()
    store.post_many(db, txns)
    start = T0 + 4 * 3600.0                             # after attempt 1 ended (3 h), before attempt 2 (5 h)
    for account in ("tenant:acme", "provider:westgrid", "operator:margin"):
        assert store.statement(db, account, start, T0 + 86_400) == ledger.statement(txns, account, start, T0 + 86_400)
    st = store.statement(db, "provider:westgrid", start, T0 + 86_400)
    assert (st.opening_fen, st.closing_fen) == (6480, 2 * 6480)


def test_spent_in_a_period_matches_the_pure_sum(tmp_path: Path) -> None:
    db = open_db(tmp_path / "cpn.db")
    txns = [*job_txns(), postings.usage_transaction("f1", T0, "acme", MODEL, "hz", 10**6, 10**6),
            postings.adjustment("credit-1", T0 + 60, "tenant:acme", 500, "operator:margin", "goodwill")]
    store.post_many(db, txns)
    for start, end in ((T0, T0 + 86_400), (T0 + 4 * 3600.0, T0 + 86_400), (0.0, T0)):
        assert store.spent_fen(db, "acme", start, end) == postings.spent_fen(txns, "acme", start, end)
    assert store.spent_fen(db, "acme", T0, T0 + 86_400) == 2 * 7200 + 800 - 500
