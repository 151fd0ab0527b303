"""Sites the hub has heard of: static facts kept across hub restarts (live state is soft, in memory)."""

from __future__ import annotations

import json
from typing import Any

import sqlite_utils

from controlplane.store.db import transaction


def upsert_site(
    db: sqlite_utils.Database, *, site: str, tier: str, city: str, provider: str, accelerators: dict[str, int], now: float
) -> None:
    with transaction(db, local=True):
        db.execute(
            """INSERT INTO sites (id, tier, city, provider, accelerators, first_seen, last_registered)
               VALUES (?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT(id) DO UPDATE SET tier = excluded.tier, city = excluded.city,
                 provider = excluded.provider, accelerators = excluded.accelerators,
                 last_registered = excluded.last_registered""",
            [site, tier, city, provider, json.dumps(accelerators, sort_keys=True), now, now],
        )


def declare_site(db: sqlite_utils.Database, site: str, declared: dict[str, Any], now: float) -> None:
    """Keep the operator's declaration of ``site`` (its facts win over the agent's claims)."""
    with transaction(db, local=True):
        db.execute(
            """INSERT INTO sites (id, tier, city, provider, accelerators, first_seen, last_registered, declared)
               VALUES (?, ?, ?, ?, ?, ?, 0, ?)
               ON CONFLICT(id) DO UPDATE SET declared = excluded.declared""",
            [site, declared.get("tier", "edge"), declared.get("city", ""), declared.get("provider", ""),
             json.dumps(declared.get("accelerators", {}), sort_keys=True), now, json.dumps(declared, sort_keys=True)],
        )


def declarations(db: sqlite_utils.Database) -> dict[str, dict[str, Any]]:
    """Every operator declaration kept, by site."""
    return {r[0]: json.loads(r[1]) for r in db.execute("SELECT id, declared FROM sites WHERE declared IS NOT NULL")}


def set_draining(db: sqlite_utils.Database, site: str, draining: bool) -> None:
    with transaction(db, local=True):
        db.execute("UPDATE sites SET draining = ? WHERE id = ?", [1 if draining else 0, site])


def list_sites(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    out = []
    for r in db["sites"].rows_where(order_by="id"):
        row = dict(r)
        row["accelerators"] = json.loads(row["accelerators"] or "{}")
        row["draining"] = bool(row["draining"])
        row["declared"] = json.loads(row["declared"]) if row.get("declared") else None
        out.append(row)
    return out
