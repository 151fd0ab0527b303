"""The market's other records in SQLite: catalogue revisions, offers, budgets and quotes.

Promises:

- Rule 1: prices that past usage was billed at stay readable. A catalogue change is a new
  revision of the model (:func:`put_model`), and :func:`model_at` returns the revision in force at
  a time. Offers are never edited: a new price is a new offer, and :func:`withdraw_offer` ends one
  (sets ``valid_until``). Reconciliation can therefore recompute any past line.
- Rule 2: each write is one ``BEGIN IMMEDIATE`` transaction; records are JSON (msgspec) of the
  pure structs, with the columns the queries need.
- Rule 3: invalid records are refused with ``ValueError`` naming the field (the pure modules'
  ``*_problem`` checks); the gateway checks first and answers 400.

Schema: migration ``0041_market_records`` (after ``0040_market_ledger``), applied by :func:`install`.
"""

from __future__ import annotations

import msgspec
import sqlite_utils

from controlplane.market import budgets, catalogue, offers, quotes
from controlplane.store.market import ledger as ledger_store
from controlplane.store.market.db import apply_migration
from controlplane.store.txn import transaction

MIGRATION_ID = "0041_market_records"
MIGRATION: tuple[str, ...] = (
    """CREATE TABLE market_models (
        id TEXT NOT NULL,
        revision INTEGER NOT NULL,
        valid_from REAL NOT NULL,
        owner TEXT NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (id, revision)
    )""",
    """CREATE TABLE market_offers (
        id TEXT PRIMARY KEY,
        pool TEXT NOT NULL,
        provider TEXT NOT NULL,
        accelerator TEXT NOT NULL,
        valid_from REAL NOT NULL,
        valid_until REAL,
        body TEXT NOT NULL
    )""",
    "CREATE INDEX market_offers_by_pool ON market_offers (pool, accelerator)",
    """CREATE TABLE market_budgets (
        tenant TEXT PRIMARY KEY,
        body TEXT NOT NULL,
        updated_at REAL NOT NULL
    )""",
    """CREATE TABLE market_quotes (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        created_at REAL NOT NULL,
        valid_until REAL NOT NULL,
        body TEXT NOT NULL
    )""",
)

_model = msgspec.json.Decoder(catalogue.ModelRecord).decode
_offer = msgspec.json.Decoder(offers.Offer).decode
_budget = msgspec.json.Decoder(budgets.Budget).decode
_quote = msgspec.json.Decoder(quotes.Quote).decode


def install(db: sqlite_utils.Database) -> bool:
    """Apply the ledger's and these tables' migrations if not yet applied; True if this one was."""
    ledger_store.install(db)
    return apply_migration(db, MIGRATION_ID, MIGRATION)


# --------------------------------------------------------------------------- catalogue


def put_model(db: sqlite_utils.Database, model: catalogue.ModelRecord, now: float) -> int:
    """Add a revision of ``model`` in force from ``now``; returns its revision number (1, 2, ...).

    Raises:
        ValueError: the record is invalid (naming the field), or ``now`` is before the current
            revision's start (revisions are in time order).
    """
    problem = catalogue.record_problem(model)
    if problem is not None:
        raise ValueError(f"model {model.id}: {problem}")
    conn = db.conn
    with transaction(db):
        row = conn.execute("SELECT MAX(revision), MAX(valid_from) FROM market_models WHERE id = ?",
                           (model.id,)).fetchone()
        if row[1] is not None and now < row[1]:
            raise ValueError(f"model {model.id}: a revision from {now} would precede the current one ({row[1]})")
        revision = (row[0] or 0) + 1
        conn.execute("INSERT INTO market_models (id, revision, valid_from, owner, body) VALUES (?, ?, ?, ?, ?)",
                     (model.id, revision, now, model.owner, msgspec.json.encode(model).decode()))
    return int(revision)


def model_at(db: sqlite_utils.Database, model_id: str, at: float) -> catalogue.ModelRecord | None:
    """The revision of ``model_id`` in force at ``at`` (None before its first, or if unknown)."""
    row = db.conn.execute(
        "SELECT body FROM market_models WHERE id = ? AND valid_from <= ? ORDER BY revision DESC LIMIT 1",
        (model_id, at),
    ).fetchone()
    return _model(row[0]) if row else None


def models(db: sqlite_utils.Database, at: float) -> dict[str, catalogue.ModelRecord]:
    """The whole catalogue as in force at ``at``, by model id."""
    rows = db.conn.execute(
        """SELECT m.body FROM market_models m WHERE m.valid_from <= ? AND m.revision = (
               SELECT MAX(revision) FROM market_models WHERE id = m.id AND valid_from <= ?) ORDER BY m.id""",
        (at, at),
    ).fetchall()
    out = [_model(r[0]) for r in rows]
    return {m.id: m for m in out}


# --------------------------------------------------------------------------- offers


def put_offer(db: sqlite_utils.Database, offer: offers.Offer) -> bool:
    """Publish ``offer``; True if new, False if the same offer was already there.

    Raises:
        ValueError: the offer is invalid (naming the field), or its id is taken by another offer.
    """
    problem = offers.offer_problem(offer)
    if problem is not None:
        raise ValueError(f"offer {offer.id}: {problem}")
    conn = db.conn
    with transaction(db):
        row = conn.execute("SELECT body FROM market_offers WHERE id = ?", (offer.id,)).fetchone()
        if row is not None:
            if _offer(row[0]) == offer:
                return False
            raise ValueError(f"offer {offer.id} already exists with other terms: publish a new offer instead")
        conn.execute(
            """INSERT INTO market_offers (id, pool, provider, accelerator, valid_from, valid_until, body)
               VALUES (?, ?, ?, ?, ?, ?, ?)""",
            (offer.id, offer.pool, offer.provider, offer.accelerator, offer.valid_from, offer.valid_until,
             msgspec.json.encode(offer).decode()),
        )
    return True


def withdraw_offer(db: sqlite_utils.Database, offer_id: str, now: float) -> offers.Offer | None:
    """End an offer at ``now`` (no effect if it already ended earlier); None if unknown."""
    conn = db.conn
    with transaction(db):
        row = conn.execute("SELECT body FROM market_offers WHERE id = ?", (offer_id,)).fetchone()
        if row is None:
            return None
        offer = _offer(row[0])
        if offer.valid_until is not None and offer.valid_until <= now:
            return offer
        ended = msgspec.structs.replace(offer, valid_until=max(now, offer.valid_from))
        conn.execute("UPDATE market_offers SET valid_until = ?, body = ? WHERE id = ?",
                     (ended.valid_until, msgspec.json.encode(ended).decode(), offer_id))
    return ended


def list_offers(db: sqlite_utils.Database, *, pool: str | None = None, provider: str | None = None) -> list[offers.Offer]:
    """Offers (all, or of one pool or provider), past ones included; filter with ``offers.select``."""
    where: list[str] = []
    args: list[object] = []
    for column, value in (("pool", pool), ("provider", provider)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    sql = "SELECT body FROM market_offers" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
    return [_offer(r[0]) for r in db.conn.execute(sql, args).fetchall()]


# --------------------------------------------------------------------------- budgets and quotes


def put_budget(db: sqlite_utils.Database, budget: budgets.Budget, now: float) -> None:
    """Set (or replace) a tenant's budget.

    Raises:
        ValueError: the budget is invalid (naming the field).
    """
    problem = budgets.budget_problem(budget)
    if problem is not None:
        raise ValueError(f"budget of {budget.tenant}: {problem}")
    with transaction(db):
        db.conn.execute(
            """INSERT INTO market_budgets (tenant, body, updated_at) VALUES (?, ?, ?)
               ON CONFLICT (tenant) DO UPDATE SET body = excluded.body, updated_at = excluded.updated_at""",
            (budget.tenant, msgspec.json.encode(budget).decode(), now),
        )


def budget(db: sqlite_utils.Database, tenant: str) -> budgets.Budget | None:
    row = db.conn.execute("SELECT body FROM market_budgets WHERE tenant = ?", (tenant,)).fetchone()
    return _budget(row[0]) if row else None


def put_quote(db: sqlite_utils.Database, q: quotes.Quote) -> None:
    """Keep a quote (insert only: a quote binds as made).

    Raises:
        ValueError: the id is taken by another quote.
    """
    with transaction(db):
        row = db.conn.execute("SELECT body FROM market_quotes WHERE id = ?", (q.id,)).fetchone()
        if row is not None:
            if _quote(row[0]) == q:
                return
            raise ValueError(f"quote {q.id} already exists")
        db.conn.execute("INSERT INTO market_quotes (id, tenant, created_at, valid_until, body) VALUES (?, ?, ?, ?, ?)",
                        (q.id, q.tenant, q.created_at, q.valid_until, msgspec.json.encode(q).decode()))


def quote(db: sqlite_utils.Database, quote_id: str, tenant: str) -> quotes.Quote | None:
    """A tenant's quote by id; another tenant's quote is None (a 404, as jobs)."""
    row = db.conn.execute("SELECT body FROM market_quotes WHERE id = ? AND tenant = ?", (quote_id, tenant)).fetchone()
    return _quote(row[0]) if row else None
