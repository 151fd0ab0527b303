"""What the market billed, and the tenant settings it bills by, in SQLite.

Promises:

- Rule 1: every flushed usage line and every metered attempt is kept as billed (tokens, cards,
  times, the offer), written by the caller **in the transaction that posts its ledger entries and
  writes the usage counters** (they join the caller's ``BEGIN IMMEDIATE``). Reconciliation
  recomputes from these lines and the prices alone what the ledger must hold.
- Rule 2: a tenant's market settings (``public_facing``, its own filing number) are one row per
  tenant; a tenant without a row is internal (not public-facing).
- Rule 3: a quote remembers the hash of the job body it priced, so a submission against it must be
  the same job.

Schema: migration ``0042_market_billing`` (after ``0041_market_records``), applied by
:func:`install` (which applies the ledger's and the records' first).
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec
import sqlite_utils

from controlplane.market import budgets as budget_rules
from controlplane.market import postings, reconcile
from controlplane.store.market import records
from controlplane.store.market.db import apply_migration
from controlplane.store.txn import transaction

MIGRATION_ID = "0042_market_billing"
MIGRATION: tuple[str, ...] = (
    """CREATE TABLE market_tenants (
        tenant TEXT PRIMARY KEY,
        public_facing INTEGER NOT NULL DEFAULT 0,
        filing_number TEXT NOT NULL DEFAULT '',
        updated_at REAL NOT NULL
    )""",
    """CREATE TABLE market_usage_lines (
        flush TEXT NOT NULL,
        tenant TEXT NOT NULL,
        model TEXT NOT NULL,
        site TEXT NOT NULL,
        at REAL NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        priced INTEGER NOT NULL,
        PRIMARY KEY (flush, tenant, model, site)
    )""",
    "CREATE INDEX market_usage_lines_by_tenant ON market_usage_lines (tenant, at)",
    """CREATE TABLE market_attempt_lines (
        job TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        tenant TEXT NOT NULL,
        pool TEXT NOT NULL,
        accelerator TEXT NOT NULL,
        cards INTEGER NOT NULL,
        start_at REAL NOT NULL,
        end_at REAL NOT NULL,
        offer_id TEXT NOT NULL,
        quote_id TEXT NOT NULL,
        PRIMARY KEY (job, attempt)
    )""",
    """CREATE TABLE market_quote_specs (
        quote_id TEXT PRIMARY KEY,
        spec_hash TEXT NOT NULL
    )""",
)


class TenantSettings(msgspec.Struct, frozen=True, kw_only=True):
    tenant: str
    public_facing: bool = False
    filing_number: str = ""


class UsageLine(msgspec.Struct, frozen=True, kw_only=True):
    flush: str
    tenant: str
    model: str
    site: str
    at: float
    prompt_tokens: int
    completion_tokens: int
    priced: bool
    """False: the model had no catalogue record at ``at`` (nothing was posted)."""


class AttemptLine(msgspec.Struct, frozen=True, kw_only=True):
    job: str
    attempt: int
    tenant: str
    pool: str
    accelerator: str
    cards: int
    start_at: float
    end_at: float
    offer_id: str
    """Empty: no offer was in force (nothing was posted)."""
    quote_id: str = ""


def install(db: sqlite_utils.Database) -> bool:
    """Apply the market's migrations (0040, 0041, then this one's); True if this one was applied now."""
    records.install(db)
    return apply_migration(db, MIGRATION_ID, MIGRATION)


# --------------------------------------------------------------------------- tenant settings


def put_tenant(db: sqlite_utils.Database, settings: TenantSettings, now: float) -> None:
    with transaction(db):
        db.conn.execute(
            """INSERT INTO market_tenants (tenant, public_facing, filing_number, updated_at) VALUES (?, ?, ?, ?)
               ON CONFLICT (tenant) DO UPDATE SET public_facing = excluded.public_facing,
               filing_number = excluded.filing_number, updated_at = excluded.updated_at""",
            (settings.tenant, int(settings.public_facing), settings.filing_number, now),
        )


def tenants(db: sqlite_utils.Database) -> dict[str, TenantSettings]:
    rows = db.conn.execute("SELECT tenant, public_facing, filing_number FROM market_tenants ORDER BY tenant")
    return {r[0]: TenantSettings(tenant=r[0], public_facing=bool(r[1]), filing_number=r[2]) for r in rows.fetchall()}


def budgets(db: sqlite_utils.Database) -> dict[str, budget_rules.Budget]:
    """Every tenant's budget, by tenant."""
    rows = db.conn.execute("SELECT tenant FROM market_budgets ORDER BY tenant").fetchall()
    out = {}
    for (tenant,) in rows:
        b = records.budget(db, tenant)
        if b is not None:
            out[tenant] = b
    return out


# --------------------------------------------------------------------------- billed lines


def add_usage_lines(db: sqlite_utils.Database, lines: Iterable[UsageLine]) -> None:
    """Keep flushed usage lines (inside the caller's transaction, or one of its own). A line its
    flush already kept is left as it is (a flush written again after an unknown outcome)."""
    with transaction(db):
        db.conn.executemany(
            """INSERT INTO market_usage_lines (flush, tenant, model, site, at, prompt_tokens, completion_tokens, priced)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING""",
            [(x.flush, x.tenant, x.model, x.site, x.at, x.prompt_tokens, x.completion_tokens, int(x.priced))
             for x in lines],
        )


def usage_lines(db: sqlite_utils.Database) -> list[UsageLine]:
    rows = db.conn.execute(
        """SELECT flush, tenant, model, site, at, prompt_tokens, completion_tokens, priced FROM market_usage_lines
           ORDER BY at, flush, tenant, model, site""").fetchall()
    return [UsageLine(flush=r[0], tenant=r[1], model=r[2], site=r[3], at=r[4], prompt_tokens=r[5],
                      completion_tokens=r[6], priced=bool(r[7])) for r in rows]


def add_attempt_line(db: sqlite_utils.Database, line: AttemptLine) -> bool:
    """Keep a metered attempt; False (nothing written) if that attempt was already kept."""
    with transaction(db):
        cur = db.conn.execute(
            """INSERT INTO market_attempt_lines (job, attempt, tenant, pool, accelerator, cards, start_at, end_at,
               offer_id, quote_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (job, attempt) DO NOTHING""",
            (line.job, line.attempt, line.tenant, line.pool, line.accelerator, line.cards, line.start_at,
             line.end_at, line.offer_id, line.quote_id),
        )
        return cur.rowcount == 1


def attempt_lines(db: sqlite_utils.Database, *, job: str | None = None) -> list[AttemptLine]:
    sql = ("SELECT job, attempt, tenant, pool, accelerator, cards, start_at, end_at, offer_id, quote_id "
           "FROM market_attempt_lines")
    args: tuple[str, ...] = ()
    if job is not None:
        sql += " WHERE job = ?"
        args = (job,)
    rows = db.conn.execute(sql + " ORDER BY job, attempt", args).fetchall()
    return [AttemptLine(job=r[0], attempt=r[1], tenant=r[2], pool=r[3], accelerator=r[4], cards=r[5],
                        start_at=r[6], end_at=r[7], offer_id=r[8], quote_id=r[9]) for r in rows]


def charged_fen(db: sqlite_utils.Database, job: str, tenant_account: str) -> int:
    """What the job's attempts have charged the tenant so far (a positive number of fen)."""
    prefix = f"job:{job}:attempt:"
    row = db.conn.execute(
        """SELECT COALESCE(SUM(amount_fen), 0) FROM market_entries
           WHERE substr(key, 1, ?) = ? AND account = ? AND kind = 'charge'""",
        (len(prefix), prefix, tenant_account),
    ).fetchone()
    return -int(row[0])


def job_holds(db: sqlite_utils.Database, tenant: str, ended_states: Iterable[str]) -> list[tuple[str, int, int]]:
    """(job, hold_fen, charged_fen) of ``tenant``'s jobs holding budget (``spec.budget_hold_fen``
    > 0) and not in one of ``ended_states`` (the store reads, ``budgets.job_hold_fen`` decides)."""
    ended = sorted(ended_states)
    rows = db.conn.execute(
        f"""SELECT id, CAST(json_extract(spec, '$.budget_hold_fen') AS INTEGER) AS hold FROM jobs
            WHERE tenant = ? AND state NOT IN ({", ".join("?" * len(ended))}) AND hold > 0 ORDER BY id""",
        (tenant, *ended),
    ).fetchall()
    account = postings.tenant_account(tenant)
    return [(str(job), int(hold), charged_fen(db, job, account)) for job, hold in rows]


# --------------------------------------------------------------------------- quotes


def put_quote_spec(db: sqlite_utils.Database, quote_id: str, spec_hash: str) -> None:
    with transaction(db):
        db.conn.execute("INSERT OR IGNORE INTO market_quote_specs (quote_id, spec_hash) VALUES (?, ?)",
                        (quote_id, spec_hash))


def quote_spec(db: sqlite_utils.Database, quote_id: str) -> str | None:
    row = db.conn.execute("SELECT spec_hash FROM market_quote_specs WHERE quote_id = ?", (quote_id,)).fetchone()
    return str(row[0]) if row else None


# --------------------------------------------------------------------------- reconciliation


def expected(db: sqlite_utils.Database, fees: postings.Fees = postings.DEFAULT_FEES) -> list[reconcile.Expected]:
    """What the ledger must hold: every priced usage line at the catalogue revision in force when
    it was flushed, every priced attempt at its offer (``reconcile`` Rule 1)."""
    out: list[reconcile.Expected] = []
    for u in usage_lines(db):
        model = records.model_at(db, u.model, u.at) if u.priced else None
        if model is not None:
            out += reconcile.expected_for_tokens(
                [reconcile.TokenLine(flush=u.flush, tenant=u.tenant, model=u.model, site=u.site,
                                     prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens)],
                {u.model: model})
    by_id = {o.id: o for o in records.list_offers(db)}
    out += reconcile.expected_for_attempts(
        [reconcile.MeteredAttempt(job_id=a.job, attempt=a.attempt, cards=a.cards, start_at=a.start_at,
                                  end_at=a.end_at, offer=by_id[a.offer_id])
         for a in attempt_lines(db) if a.offer_id in by_id], fees)
    return out
