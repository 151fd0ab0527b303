"""``cpn tenant create|list``: manage tenants directly in the hub's database (keys: ``cpn key``).

A running hub sees a key created here on its first use (keys it does not know are looked up in the
store before being refused).
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("tenant", help="create or list tenants (in the hub's SQLite database)")
    tsub = p.add_subparsers(dest="tenant_command", metavar="ACTION", required=True)
    c = tsub.add_parser("create", help="create a tenant and print its API key")
    c.add_argument("id", help="tenant id (lower-case letters, digits, - and _; up to 63)")
    c.add_argument("--name", default="")
    c.add_argument("--default-origin", metavar="CITY", help="origin city of its requests when they name none (a layout origin)")
    c.add_argument("--layout", metavar="FILE", help="the hub's layout, to check --default-origin (default: the shipped one)")
    c.add_argument("--quota-cards", type=int)
    c.add_argument("--rate", type=float, help="requests per second")
    c.add_argument("--db", default=".cpn/hub.db", help="the hub's database (default .cpn/hub.db; created, and said so, if missing)")
    c.set_defaults(run=run_create)
    ls = tsub.add_parser("list", help="list tenants")
    ls.add_argument("--db", default=".cpn/hub.db", help="the hub's database (must exist; default .cpn/hub.db)")
    ls.add_argument("--json", action="store_true", help="one JSON object per tenant instead of the table")
    ls.set_defaults(run=run_list)


def _existing_db(path: str) -> None:
    from pathlib import Path

    from controlplane.core.errors import RequestError

    if not Path(path).is_file():
        raise RequestError(f"no hub database at {path} (give the hub's with --db)")


def run_create(args: argparse.Namespace) -> int:
    import time

    from controlplane.core import auth
    from controlplane.core.errors import RequestError
    from controlplane.store import db as store_db
    from controlplane.store import tenants
    from edge_agent import wire

    if not wire.is_valid_id(args.id):
        raise RequestError(f"tenant id {args.id!r} is not valid (want {wire.ID_PATTERN})")
    if args.quota_cards is not None and args.quota_cards < 0:
        raise RequestError(f"--quota-cards must be >= 0, got {args.quota_cards}")
    if args.rate is not None and not args.rate > 0:
        raise RequestError(f"--rate must be > 0 requests per second, got {args.rate:g}")
    if args.default_origin is not None:
        from topology import loader

        lay = loader.load(args.layout) if args.layout else loader.load_default()
        origins = {o.id for o in lay.origins}
        if args.default_origin not in origins:
            near = sorted(o for o in origins if o.startswith(args.default_origin[:2]))[:5]
            raise RequestError(f"--default-origin {args.default_origin!r} is not an origin of layout {lay.name!r}"
                               + (f" (did you mean {', '.join(near)}?)" if near else "; see `cpn topology show`"))
    from pathlib import Path

    if not Path(args.db).is_file():
        # Creating the first tenant before the hub's first start is a real workflow: the database
        # is created then, and said so (never silently, and never by `list`).
        print(f"cpn tenant create: creating a new hub database at {args.db}", file=sys.stderr)
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

    from controlplane.store import db as store_db
    from controlplane.store import tenants

    _existing_db(args.db)
    db = store_db.open_db(args.db)
    try:
        rows = tenants.list_tenants(db)
    finally:
        db.conn.close()
    if args.json:
        for row in rows:
            print(json.dumps(row, sort_keys=True))
        return 0
    cols = ("id", "name", "default_origin", "quota_cards", "rate_per_s")
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(cols)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths)).rstrip())
    for line in cells:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip())
    return 0
