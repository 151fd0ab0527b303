"""The market ledger in a real SQLite file (controlplane/store/market/ledger.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

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


def test_entries_cannot_be_edited_or_deleted(tmp_path: Path) -> None:
    db = open_db(tmp_path / "cpn.db")
    store.post_many(db, job_txns())
    for sql in ("UPDATE market_entries SET amount_fen = 0", "DELETE FROM market_entries",
                "UPDATE market_transactions SET at = 0", "DELETE FROM market_transactions"):
        with pytest.raises(sqlite3.IntegrityError, match="immutable"):
            db.conn.execute(sql)
    assert store.imbalance(db) == 0


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
