"""``cpn site declare|show``: what the hub believes of a site, through a running hub's admin API.

``declare`` sends ``PUT /v1/sites/{site}/declaration`` (it applies at once and is kept in the hub's
record); ``show`` reads it back. The admin key comes from ``--admin-key`` or ``$CPN_ADMIN_KEY``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("site", help="declare what the hub believes of a site (admin API)")
    ssub = p.add_subparsers(dest="site_command", metavar="ACTION", required=True)
    d = ssub.add_parser("declare", help="declare a site's tier, city, cards and who may use its own models")
    d.add_argument("site")
    d.add_argument("--tier", choices=["hub", "regional", "edge"])
    d.add_argument("--city")
    d.add_argument("--provider")
    d.add_argument("--region")
    d.add_argument("--cards", help='the most the site may claim, e.g. "H20=8,910B=4"')
    d.add_argument("--lat", type=float)
    d.add_argument("--lon", type=float)
    d.add_argument("--local-model-tenants", help='tenants allowed the site\'s own models, e.g. "acme,beta" or "*"')
    _common(d)
    d.set_defaults(run=run_declare)
    s = ssub.add_parser("show", help="what the operator declared of a site")
    s.add_argument("site")
    _common(s)
    s.set_defaults(run=run_show)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hub", default="http://127.0.0.1:8080", help="the hub's gateway URL")
    p.add_argument("--admin-key", default=None, help="admin API key (default: $CPN_ADMIN_KEY)")


def _call(args: argparse.Namespace, method: str, body: dict[str, Any] | None) -> int:
    import urllib.error
    import urllib.request

    from controlplane.core.errors import RequestError

    key = args.admin_key or os.environ.get("CPN_ADMIN_KEY")
    if not key:
        raise RequestError("an admin key is needed: --admin-key or $CPN_ADMIN_KEY")
    url = f"{args.hub.rstrip('/')}/v1/sites/{args.site}/declaration"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 (the operator's own hub URL)
            print(json.dumps(json.loads(resp.read()), indent=2, sort_keys=True))
            return 0
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        print(f"cpn site: {exc.code} {message}", file=sys.stderr)
        return 2
    except urllib.error.URLError as exc:
        print(f"cpn site: cannot reach the hub at {args.hub}: {exc.reason}", file=sys.stderr)
        return 1


def run_declare(args: argparse.Namespace) -> int:
    from controlplane.core.errors import RequestError

    body: dict[str, Any] = {k: getattr(args, k) for k in ("tier", "city", "provider", "region", "lat", "lon")
                            if getattr(args, k) is not None}
    if args.cards is not None:
        body["accelerators"] = {}
        for part in filter(None, (p.strip() for p in args.cards.split(","))):
            name, sep, n = part.partition("=")
            if not sep or not n.strip().lstrip("-").isdigit():
                raise RequestError(f"--cards: {part!r} is not TYPE=COUNT")
            body["accelerators"][name.strip()] = int(n)
    if args.local_model_tenants is not None:
        body["local_model_tenants"] = [t.strip() for t in args.local_model_tenants.split(",") if t.strip()]
    return _call(args, "PUT", body)


def run_show(args: argparse.Namespace) -> int:
    return _call(args, "GET", None)
