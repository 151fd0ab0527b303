"""Catalogue revisions, offers, budgets and quotes in a real SQLite file
(controlplane/store/market/records.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgspec
import pytest
import sqlite_utils

from controlplane.market import budgets, catalogue, offers, quotes
from controlplane.store.market import records


def open_db(path: Path) -> sqlite_utils.Database:
    db = sqlite_utils.Database(sqlite3.connect(str(path), isolation_level=None))
    records.install(db)
    return db


def test_catalogue_revisions_keep_the_price_in_force_at_each_time(tmp_path: Path) -> None:
    db = open_db(tmp_path / "cpn.db")
    v1 = catalogue.ModelRecord(id="qwen2-7b", owner="acme", input_fen_per_mtok=200, output_fen_per_mtok=600)
    v2 = msgspec.structs.replace(v1, output_fen_per_mtok=400, filing=catalogue.Filing(
        number="BJ-1", scope="public", filed_on="2026-01-01"))
    assert records.put_model(db, v1, 100.0) == 1 and records.put_model(db, v2, 200.0) == 2
    db.conn.close()
    db = open_db(tmp_path / "cpn.db")
    assert records.model_at(db, "qwen2-7b", 50.0) is None
    assert records.model_at(db, "qwen2-7b", 150.0) == v1 and records.model_at(db, "qwen2-7b", 200.0) == v2
    assert records.models(db, 150.0) == {"qwen2-7b": v1} and records.models(db, 1e9) == {"qwen2-7b": v2}
    with pytest.raises(ValueError, match="input_fen_per_mtok"):
        records.put_model(db, msgspec.structs.replace(v1, input_fen_per_mtok=-1), 300.0)
    with pytest.raises(ValueError, match="precede"):
        records.put_model(db, v1, 150.0)


def test_offers_are_published_once_and_withdrawn_not_edited(tmp_path: Path) -> None:
    db = open_db(tmp_path / "cpn.db")
    o = offers.Offer(id="zw-910b-1", pool="nx-zw", provider="westgrid", accelerator="910B", fen_per_card_hour=900)
    assert records.put_offer(db, o) and not records.put_offer(db, o)
    with pytest.raises(ValueError, match="publish a new offer"):
        records.put_offer(db, msgspec.structs.replace(o, fen_per_card_hour=800))
    with pytest.raises(ValueError, match="overlaps"):
        records.put_offer(db, msgspec.structs.replace(o, id="bad", windows=(
            offers.Window(start_hour=1, end_hour=5, fen_per_card_hour=1),
            offers.Window(start_hour=4, end_hour=6, fen_per_card_hour=1))))
    ended = records.withdraw_offer(db, "zw-910b-1", 1000.0)
    assert ended is not None and ended.valid_until == 1000.0
    listed = records.list_offers(db, pool="nx-zw")
    assert listed == [ended]
    assert offers.select(listed, "nx-zw", "910B", 999.0) == ended and offers.select(listed, "nx-zw", "910B", 1000.0) is None
    assert records.withdraw_offer(db, "nope", 1.0) is None


def test_budgets_and_quotes(tmp_path: Path) -> None:
    db = open_db(tmp_path / "cpn.db")
    b = budgets.Budget(tenant="acme", limit_fen=100_000)
    records.put_budget(db, b, 1.0)
    records.put_budget(db, msgspec.structs.replace(b, limit_fen=50_000), 2.0)
    assert records.budget(db, "acme") == msgspec.structs.replace(b, limit_fen=50_000)
    assert records.budget(db, "beta") is None
    q = quotes.Quote(id="q1", tenant="acme", created_at=1.0, valid_until=901.0, options=[])
    records.put_quote(db, q)
    records.put_quote(db, q)                                   # idempotent
    assert records.quote(db, "q1", "acme") == q and records.quote(db, "q1", "beta") is None
    with pytest.raises(ValueError, match="already exists"):
        records.put_quote(db, msgspec.structs.replace(q, valid_until=2.0))
