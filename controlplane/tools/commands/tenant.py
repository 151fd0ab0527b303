"""``cpn tenant create|list``: manage tenants directly in the hub's database (keys: ``cpn key``).

A running hub sees a key created here on its first use (keys it does not know are looked up in the
store before being refused).
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("tenant", help="create or list tenants (in the hub's SQLite database)")
    tsub = p.add_subparsers(dest="tenant_command", metavar="ACTION", required=True)
    c = tsub.add_parser("create", help="create a tenant and print its API key")
    c.add_argument("id")
    c.add_argument("--name", default="")
    c.add_argument("--default-origin")
    c.add_argument("--quota-cards", type=int)
    c.add_argument("--rate", type=float, help="requests per second")
    c.add_argument("--db", default=".cpn/hub.db")
    c.set_defaults(run=run_create)
    ls = tsub.add_parser("list", help="list tenants")
    ls.add_argument("--db", default=".cpn/hub.db")
    ls.set_defaults(run=run_list)


def run_create(args: argparse.Namespace) -> int:
    import time

    from controlplane.core import auth
    from controlplane.core.errors import RequestError
    from controlplane.store import db as store_db
    from controlplane.store import tenants
    from edge_agent import wire

    if not wire.is_valid_id(args.id):
        raise RequestError(f"tenant id {args.id!r} is not valid (want {wire.ID_PATTERN})")
    db = store_db.open_db(args.db)
    try:
        now = time.time()
        tenants.create_tenant(db, args.id, name=args.name, now=now, default_origin=args.default_origin,
                              quota_cards=args.quota_cards, rate_per_s=args.rate)
        key = auth.new_key(args.id[:12])
        tenants.add_key(db, key, role="tenant", tenant_id=args.id, now=now, label="cli")
    finally:
        db.conn.close()
    print(key)
    return 0


def run_list(args: argparse.Namespace) -> int:
    import json

    from pathlib import Path

    from controlplane.core.errors import RequestError
    from controlplane.store import db as store_db
    from controlplane.store import tenants

    if not Path(args.db).is_file():
        raise RequestError(f"no database at {args.db} (give the hub's with --db)")
    db = store_db.open_db(args.db)
    try:
        for row in tenants.list_tenants(db):
            print(json.dumps(row, sort_keys=True))
    finally:
        db.conn.close()
    return 0
