"""Sites the hub has heard of: static facts kept across hub restarts (live state is soft, in memory)."""

from __future__ import annotations

import json
from typing import Any

import sqlite_utils

from controlplane.store.db import transaction


def upsert_site(
    db: sqlite_utils.Database, *, site: str, tier: str, city: str, provider: str, accelerators: dict[str, int], now: float
) -> None:
    with transaction(db):
        db.execute(
            """INSERT INTO sites (id, tier, city, provider, accelerators, first_seen, last_registered)
               VALUES (?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT(id) DO UPDATE SET tier = excluded.tier, city = excluded.city,
                 provider = excluded.provider, accelerators = excluded.accelerators,
                 last_registered = excluded.last_registered""",
            [site, tier, city, provider, json.dumps(accelerators, sort_keys=True), now, now],
        )


def set_draining(db: sqlite_utils.Database, site: str, draining: bool) -> None:
    with transaction(db):
        db.execute("UPDATE sites SET draining = ? WHERE id = ?", [1 if draining else 0, site])


def list_sites(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    out = []
    for r in db["sites"].rows_where(order_by="id"):
        row = dict(r)
        row["accelerators"] = json.loads(row["accelerators"] or "{}")
        row["draining"] = bool(row["draining"])
        out.append(row)
    return out
