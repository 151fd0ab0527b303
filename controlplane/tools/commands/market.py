"""``cpn market ...``: the market in the hub's database (docs/market.md).

::

    cpn market model set ID --owner T --input-fen-per-mtok N --output-fen-per-mtok N
                            [--version V] [--filing-number X --filing-scope public|internal
                            --filed-on YYYY-MM-DD [--filing-covers-version V]]
    cpn market model list
    cpn market offer add ID --pool P --provider X --accelerator A --fen-per-card-hour N
                            [--window 23-7:400 ...] [--min-lease-h H]
    cpn market offer list | offer withdraw ID
    cpn market budget set TENANT (--limit-cny X | --limit-fen N) [--period month|day]
    cpn market budget show TENANT
    cpn market tenant TENANT (--public-facing | --internal) [--filing-number X]
    cpn market statement ACCOUNT [--period month|day] [--at EPOCH] [--csv]
    cpn market totals [--period month|day] [--at EPOCH]
    cpn market reconcile           (exit 1 if the ledger differs from billed lines × prices)

A running hub reading the same database applies a change within a second. Bad input exits 2 with
one line saying why.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("market", help="prices, offers, budgets, statements (in the hub's SQLite database)",
                       description=__doc__)
    msub = p.add_subparsers(dest="market_command", metavar="PART", required=True)

    def part(name: str, help: str) -> argparse._SubParsersAction:  # type: ignore[type-arg]
        parts: argparse._SubParsersAction = msub.add_parser(name, help=help).add_subparsers(  # type: ignore[type-arg]
            dest="action", metavar="ACTION", required=True)
        return parts

    def leaf(parent: argparse._SubParsersAction, name: str, help: str, run: Any, *,  # type: ignore[type-arg]
             listing: bool = False, period: bool = False) -> argparse.ArgumentParser:
        """A command: ``--db`` always; ``--json`` for a listing; ``--period``/``--at`` for a period."""
        q: argparse.ArgumentParser = parent.add_parser(name, help=help)
        q.add_argument("--db", default=".cpn/hub.db", help="the hub's database (must exist; default .cpn/hub.db)")
        if listing:
            q.add_argument("--json", action="store_true", help="one JSON object a line")
        if period:
            q.add_argument("--period", choices=["month", "day"], default="month")
            q.add_argument("--at", type=float, help="epoch seconds inside the period (default now)")
        q.set_defaults(run=run)
        return q

    model = part("model", "the model catalogue")
    m = leaf(model, "set", "add a revision of a model, in force from now", run_model_set)
    m.add_argument("id")
    m.add_argument("--owner", required=True, help="owner tenant")
    m.add_argument("--version", default="1")
    for price in ("--input-fen-per-mtok", "--output-fen-per-mtok"):
        m.add_argument(price, type=int, required=True, metavar="FEN")
    m.add_argument("--accelerators", default="", help="comma-separated accelerator types it serves on")
    m.add_argument("--memory-gb", type=float, default=0.0)
    m.add_argument("--owner-share-bp", type=int, default=0, help="owner's share of token revenue, basis points")
    m.add_argument("--filing-number")
    m.add_argument("--filing-scope", choices=["public", "internal"])
    m.add_argument("--filed-on", metavar="YYYY-MM-DD")
    m.add_argument("--filing-covers-version", default="")
    leaf(model, "list", "the catalogue in force", run_model_list, listing=True)

    offer = part("offer", "pool owners' offers")
    o = leaf(offer, "add", "publish an offer (for the pool's declared provider)", run_offer_add)
    o.add_argument("id")
    for name in ("--pool", "--provider", "--accelerator"):
        o.add_argument(name, required=True)
    o.add_argument("--fen-per-card-hour", type=int, required=True, metavar="FEN")
    o.add_argument("--window", action="append", default=[], metavar="START-END:FEN",
                   help="a time-of-use price, China local hours, e.g. 23-7:400 (repeatable)")
    o.add_argument("--min-lease-h", type=float, default=0.0)
    o.add_argument("--layout", metavar="FILE", help="the hub's layout, to check --pool (default: the shipped one)")
    leaf(offer, "list", "every offer, past ones included", run_offer_list, listing=True)
    leaf(offer, "withdraw", "end an offer now", run_offer_withdraw).add_argument("id")

    budget = part("budget", "tenants' spend limits")
    b = leaf(budget, "set", "set a tenant's spend limit", run_budget_set)
    b.add_argument("tenant")
    lim = b.add_mutually_exclusive_group(required=True)
    lim.add_argument("--limit-cny", help="e.g. 1000 or 12.50")
    lim.add_argument("--limit-fen", type=int)
    b.add_argument("--period", choices=["month", "day"], default="month")
    leaf(budget, "show", "a tenant's budget and spending this period", run_budget_show).add_argument("tenant")

    t = leaf(msub, "tenant", "mark a tenant public-facing (filed models only) or internal", run_tenant)
    t.add_argument("tenant")
    side = t.add_mutually_exclusive_group(required=True)
    side.add_argument("--public-facing", action="store_true")
    side.add_argument("--internal", action="store_true")
    t.add_argument("--filing-number", default="", help="the tenant's own service filing (kept and shown)")

    s = leaf(msub, "statement", "an account's statement for a period", run_statement, period=True)
    s.add_argument("account", help="tenant:ID, provider:ID or operator:NAME")
    s.add_argument("--csv", action="store_true", help="CSV instead of JSON")
    leaf(msub, "totals", "what each tenant owes, each provider earns, the network kept", run_totals, period=True)
    leaf(msub, "reconcile", "check the ledger against billed lines × prices (exit 1 if not equal)", run_reconcile)


@contextlib.contextmanager
def _database(path: str) -> Iterator[Any]:
    """The hub's database at ``path``, open for the ``with`` block (a missing file is the user's error)."""
    from pathlib import Path

    from controlplane.core.errors import RequestError
    from controlplane.store import db as store_db

    if not Path(path).is_file():
        raise RequestError(f"no hub database at {path} (give the hub's with --db)")
    db = store_db.open_db(path)
    try:
        yield db
    finally:
        db.conn.close()


def _tenant(db: Any, tenant: str) -> None:
    from controlplane.store import tenants

    tenants.get_tenant(db, tenant)  # NotFound (a CpnError): exit 2 naming it


def _print(body: Any) -> None:
    print(json.dumps(body, ensure_ascii=False, indent=2, sort_keys=True))


def run_model_set(args: argparse.Namespace) -> int:
    import time

    from controlplane.core.errors import RequestError
    from controlplane.market import catalogue
    from controlplane.store.market import records

    filing = None
    given = [args.filing_number, args.filing_scope, args.filed_on]
    if any(x is not None for x in given):
        if not all(x is not None for x in given):
            raise RequestError("a filing needs --filing-number, --filing-scope and --filed-on together")
        filing = catalogue.Filing(number=args.filing_number, scope=args.filing_scope, filed_on=args.filed_on,
                                  covers_version=args.filing_covers_version)
    model = catalogue.ModelRecord(
        id=args.id, owner=args.owner, version=args.version,
        accelerators=tuple(a for a in args.accelerators.split(",") if a), memory_gb=args.memory_gb,
        input_fen_per_mtok=args.input_fen_per_mtok, output_fen_per_mtok=args.output_fen_per_mtok, filing=filing,
        owner_share_bp=args.owner_share_bp)
    problem = catalogue.record_problem(model)
    if problem is not None:
        raise RequestError(f"model {args.id}: {problem}")
    with _database(args.db) as db:
        _tenant(db, args.owner)
        try:
            revision = records.put_model(db, model, time.time())
        except ValueError as exc:
            raise RequestError(str(exc)) from None
    print(f"model {args.id} revision {revision}")
    return 0


def run_model_list(args: argparse.Namespace) -> int:
    import time

    import msgspec

    from controlplane.market import money
    from controlplane.store.market import records

    with _database(args.db) as db:
        models = records.models(db, time.time())
    if args.json:
        for m in models.values():
            print(msgspec.json.encode(m).decode())
        return 0
    print(f"{'model':24} {'owner':12} {'ver':4} {'in CNY/Mtok':>12} {'out CNY/Mtok':>12}  filing")
    for m in models.values():
        filing = f"{m.filing.number} ({m.filing.scope}, {m.filing.filed_on})" if m.filing else "-"
        print(f"{m.id:24} {m.owner:12} {m.version:4} {money.cny_text(m.input_fen_per_mtok):>12} "
              f"{money.cny_text(m.output_fen_per_mtok):>12}  {filing}")
    return 0


def _window(text: str) -> Any:
    from controlplane.core.errors import RequestError
    from controlplane.market import offers

    try:
        hours, fen = text.split(":")
        start, end = hours.split("-")
        return offers.Window(start_hour=int(start), end_hour=int(end), fen_per_card_hour=int(fen))
    except ValueError:
        raise RequestError(f"--window {text!r} is not START-END:FEN (e.g. 23-7:400)") from None


def run_offer_add(args: argparse.Namespace) -> int:
    import time

    from controlplane.core.errors import RequestError
    from controlplane.market import offers
    from controlplane.store import sites
    from controlplane.store.market import records
    from topology import loader

    if not args.min_lease_h >= 0:
        raise RequestError(f"--min-lease-h must be >= 0, got {args.min_lease_h:g}")
    offer = offers.Offer(id=args.id, pool=args.pool, provider=args.provider, accelerator=args.accelerator,
                         fen_per_card_hour=args.fen_per_card_hour, windows=tuple(_window(w) for w in args.window),
                         min_lease_s=int(round(args.min_lease_h * 3600)), valid_from=time.time())
    problem = offers.offer_problem(offer)
    if problem is not None:
        raise RequestError(f"offer {args.id}: {problem}")
    lay = loader.load(args.layout) if args.layout else loader.load_default()
    with _database(args.db) as db:
        known = {s.id for s in lay.sites} | {r["id"] for r in sites.list_sites(db)}
        if args.pool not in known:
            raise RequestError(f"--pool {args.pool!r} is not a site of layout {lay.name!r} nor one the hub has seen")
        declared = (sites.declarations(db).get(args.pool) or {}).get("provider") or next(
            (s.provider for s in lay.sites if s.id == args.pool), "")
        problem = offers.provider_problem(offer, declared)
        if problem is not None:
            raise RequestError(f"--{problem}")
        try:
            new = records.put_offer(db, offer)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
    print(f"offer {args.id} {'published' if new else 'already published'}")
    return 0


def run_offer_list(args: argparse.Namespace) -> int:
    import time

    import msgspec

    from controlplane.market import money, offers
    from controlplane.store.market import records

    with _database(args.db) as db:
        found = records.list_offers(db)
    now = time.time()
    if args.json:
        for o in found:
            print(msgspec.json.encode(o).decode())
        return 0
    print(f"{'offer':20} {'pool':14} {'provider':14} {'acc':6} {'CNY/card-h':>10} {'windows':8} in force")
    for o in found:
        print(f"{o.id:20} {o.pool:14} {o.provider:14} {o.accelerator:6} {money.cny_text(o.fen_per_card_hour):>10} "
              f"{len(o.windows):<8} {'yes' if offers.valid_at(o, now) else 'no'}")
    return 0


def run_offer_withdraw(args: argparse.Namespace) -> int:
    import time

    from controlplane.core.errors import NotFound
    from controlplane.store.market import records

    with _database(args.db) as db:
        ended = records.withdraw_offer(db, args.id, time.time())
    if ended is None:
        raise NotFound(f"offer {args.id!r} not found")
    print(f"offer {args.id} withdrawn")
    return 0


def run_budget_set(args: argparse.Namespace) -> int:
    import time

    from controlplane.core.errors import RequestError
    from controlplane.market import budgets, money
    from controlplane.store.market import records

    if args.limit_cny is not None:
        try:
            limit = money.fen_from_cny(args.limit_cny)
        except (ValueError, ArithmeticError):
            raise RequestError(f"--limit-cny must be an amount of CNY, got {args.limit_cny!r}") from None
    else:
        limit = args.limit_fen
    budget = budgets.Budget(tenant=args.tenant, limit_fen=limit, period=args.period)
    problem = budgets.budget_problem(budget)
    if problem is not None:
        raise RequestError(f"budget of {args.tenant}: {problem}")
    with _database(args.db) as db:
        _tenant(db, args.tenant)
        records.put_budget(db, budget, time.time())
    print(f"budget of {args.tenant}: {money.cny_text(limit)} CNY per {args.period}")
    return 0


def run_budget_show(args: argparse.Namespace) -> int:
    import time

    from controlplane.core.errors import NotFound
    from controlplane.market import budgets, views
    from controlplane.store.market import ledger as ledger_store
    from controlplane.store.market import records

    with _database(args.db) as db:
        _tenant(db, args.tenant)
        b = records.budget(db, args.tenant)
        if b is None:
            raise NotFound(f"tenant {args.tenant!r} has no budget")
        start, end = budgets.period_bounds(b.period, time.time())
        spent = ledger_store.spent_fen(db, args.tenant, start, end)
    _print(views.budget_standing_body(budgets.standing(b, spent), b.period))
    return 0


def run_tenant(args: argparse.Namespace) -> int:
    import time

    from controlplane.store.market import billing

    with _database(args.db) as db:
        _tenant(db, args.tenant)
        billing.put_tenant(db, billing.TenantSettings(tenant=args.tenant, public_facing=args.public_facing,
                                                      filing_number=args.filing_number.strip()), time.time())
    print(f"tenant {args.tenant}: {'public-facing' if args.public_facing else 'internal'}")
    return 0


def _bounds(args: argparse.Namespace) -> tuple[float, float]:
    import time

    from controlplane.market import budgets

    return budgets.period_bounds(args.period, args.at if args.at is not None else time.time())


def run_statement(args: argparse.Namespace) -> int:
    from controlplane.core.errors import RequestError
    from controlplane.market import ledger, views
    from controlplane.store.market import ledger as ledger_store

    if not ledger.ACCOUNT_RE.match(args.account):
        raise RequestError(f"account {args.account!r} is not tenant:ID, provider:ID or operator:NAME")
    start, end = _bounds(args)
    with _database(args.db) as db:
        st = ledger_store.statement(db, args.account, start, end)
    if args.csv:
        sys.stdout.write(ledger.statement_csv(st))
    else:
        _print(views.statement_body(st))
    return 0


def run_totals(args: argparse.Namespace) -> int:
    import msgspec

    from controlplane.market import postings
    from controlplane.store.market import ledger as ledger_store

    start, end = _bounds(args)
    with _database(args.db) as db:
        totals = postings.party_totals(ledger_store.load(db, before=end), start, end)
    _print({"start": start, "end": end, **msgspec.to_builtins(totals)})
    return 0


def run_reconcile(args: argparse.Namespace) -> int:
    import msgspec

    from controlplane.market import reconcile
    from controlplane.store.market import billing
    from controlplane.store.market import ledger as ledger_store

    with _database(args.db) as db:
        result = reconcile.reconcile(ledger_store.load(db), billing.expected(db))
    _print(msgspec.to_builtins(result))
    return 0 if result.ok else 1
