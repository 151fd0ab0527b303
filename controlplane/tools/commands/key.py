"""``cpn key list|create|revoke|rotate``: tenant, provider and admin API keys, directly in the hub's database.

The database must exist (this never creates one). A running hub on the same database refuses a
key revoked here within a second (it re-reads a key from the store at least once a second), and
accepts a key created here on its first use. Errors: exit code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("key", help="list, create, revoke or rotate API keys (in the hub's SQLite database)")
    ksub = p.add_subparsers(dest="key_command", metavar="ACTION", required=True)

    def scope(a: argparse.ArgumentParser) -> None:
        who = a.add_mutually_exclusive_group(required=True)
        who.add_argument("--tenant", help="the tenant whose keys these are")
        who.add_argument("--admin", action="store_true", help="the admin (operator) keys")
        who.add_argument("--provider", help="a third-party provider's keys (its pools' offers, its statement)")
        a.add_argument("--db", default=".cpn/hub.db", help="the hub's database (must exist)")

    def expiry(a: argparse.ArgumentParser) -> None:
        when = a.add_mutually_exclusive_group()
        when.add_argument("--ttl-s", type=float, help="the key expires this many seconds from now")
        when.add_argument("--expires-at", type=float, help="the key expires at this time (epoch seconds)")
        a.add_argument("--label", default="")

    ls = ksub.add_parser("list", help="list keys: id, shown prefix, state, created/expires/revoked (never the key)")
    scope(ls)
    ls.set_defaults(run=run_list)
    c = ksub.add_parser("create", help="issue a key and print it (shown this once)")
    scope(c)
    expiry(c)
    c.set_defaults(run=run_create)
    r = ksub.add_parser("revoke", help="revoke a key by its id, now")
    r.add_argument("key_id")
    scope(r)
    r.set_defaults(run=run_revoke)
    rot = ksub.add_parser("rotate", help="issue a new key (printed); the old one works --grace-s longer")
    rot.add_argument("key_id")
    scope(rot)
    expiry(rot)
    rot.add_argument("--grace-s", type=float, default=None, help="seconds the old key keeps working (default 86400; 0 revokes it now)")
    rot.set_defaults(run=run_rotate)


def _open(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from pathlib import Path

    from controlplane.core.errors import RequestError
    from controlplane.store import db as store_db

    if not Path(args.db).is_file():
        raise RequestError(f"no database at {args.db} (give the hub's with --db; `cpn key` never creates one)")
    return store_db.open_db(args.db)


def _scope(args: argparse.Namespace) -> tuple[str, str | None]:
    if args.provider is not None:
        return "provider", args.provider
    return ("admin", None) if args.admin else ("tenant", args.tenant)


def _expiry(args: argparse.Namespace, now: float) -> float | None:
    from controlplane.services import keys

    return keys.expiry(now, expires_at=args.expires_at, ttl_s=args.ttl_s, field_prefix="--")


def _print(row: dict[str, object]) -> None:
    import json

    print(json.dumps(row, sort_keys=True))


def run_list(args: argparse.Namespace) -> int:
    import time

    from controlplane.services import keys

    role, tenant = _scope(args)
    db = _open(args)
    try:
        for row in keys.listing(db, role=role, tenant_id=tenant, now=time.time()):
            _print(row)
    finally:
        db.conn.close()
    return 0


def run_create(args: argparse.Namespace) -> int:
    import sys
    import time

    from controlplane.services import keys

    role, tenant = _scope(args)
    now = time.time()
    expires_at = _expiry(args, now)
    db = _open(args)
    try:
        view = keys.create(db, None, role=role, tenant_id=tenant, now=now, label=args.label or "cli", expires_at=expires_at)
    finally:
        db.conn.close()
    print(f"key {view['id']} created" + (f", expires at {expires_at:.0f}" if expires_at else ""), file=sys.stderr)
    print(view["api_key"])
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    import time

    from controlplane.services import keys

    role, tenant = _scope(args)
    db = _open(args)
    try:
        view = keys.revoke(db, None, args.key_id, role=role, tenant_id=tenant, now=time.time())
    finally:
        db.conn.close()
    _print(view)
    return 0


def run_rotate(args: argparse.Namespace) -> int:
    import sys
    import time

    from controlplane.services import keys

    role, tenant = _scope(args)
    now = time.time()
    expires_at = _expiry(args, now)
    grace_s = keys.DEFAULT_GRACE_S if args.grace_s is None else args.grace_s
    db = _open(args)
    try:
        answer = keys.rotate(db, None, args.key_id, role=role, tenant_id=tenant, now=now, grace_s=grace_s,
                             label=args.label, expires_at=expires_at)
    finally:
        db.conn.close()
    old = answer["old"]
    until = "revoked now" if old["revoked_at"] is not None else f"works until {old['expires_at']:.0f}"
    print(f"key {answer['new']['id']} replaces {old['id']} ({until})", file=sys.stderr)
    print(answer["new"]["api_key"])
    return 0
