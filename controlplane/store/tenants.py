"""Tenants and their API keys (hashed), and admin keys. Every write is one committed transaction."""

from __future__ import annotations

from typing import Any

import sqlite_utils

from controlplane import auth
from controlplane.errors import Conflict, NotFound
from controlplane.store.db import transaction


def _table(db: sqlite_utils.Database, name: str) -> sqlite_utils.db.Table:
    # sqlite-utils types ``db[name]`` as ``Table | View``; these names are tables (migrations).
    t = db[name]
    assert isinstance(t, sqlite_utils.db.Table), f"{name} is not a table"
    return t


def create_tenant(
    db: sqlite_utils.Database,
    tenant_id: str,
    *,
    name: str = "",
    now: float,
    default_origin: str | None = None,
    quota_cards: int | None = None,
    rate_per_s: float | None = None,
    burst: int | None = None,
) -> dict[str, Any]:
    """Insert a tenant. Raises Conflict if the id exists."""
    row = {
        "id": tenant_id,
        "name": name or tenant_id,
        "default_origin": default_origin,
        "quota_cards": quota_cards,
        "rate_per_s": rate_per_s,
        "burst": burst,
        "created_at": now,
    }
    with transaction(db):
        if db.execute("SELECT 1 FROM tenants WHERE id = ?", [tenant_id]).fetchone():
            raise Conflict(f"tenant {tenant_id!r} already exists", field="id")
        _table(db, "tenants").insert(row)
    return row


def get_tenant(db: sqlite_utils.Database, tenant_id: str) -> dict[str, Any]:
    try:
        return dict(_table(db, "tenants").get(tenant_id))
    except sqlite_utils.db.NotFoundError:
        raise NotFound(f"tenant {tenant_id!r} not found") from None


def list_tenants(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    return [dict(r) for r in db["tenants"].rows_where(order_by="id")]


def add_key(db: sqlite_utils.Database, key: str, *, role: str, tenant_id: str | None, now: float, label: str = "") -> auth.Principal:
    """Store the digest of ``key`` (never the key) for a tenant or an admin."""
    digest = auth.hash_key(key)
    with transaction(db):
        _table(db, "api_keys").insert(
            {"key_hash": digest, "tenant_id": tenant_id, "role": role, "label": label, "created_at": now, "revoked_at": None}
        )
    return auth.Principal(role=role, tenant_id=tenant_id, key_hash=digest)


def revoke_key(db: sqlite_utils.Database, key_hash: str, *, now: float) -> None:
    with transaction(db):
        db.execute("UPDATE api_keys SET revoked_at = ? WHERE key_hash = ?", [now, key_hash])


def load_keys(db: sqlite_utils.Database) -> list[auth.Principal]:
    rows = db.execute("SELECT key_hash, tenant_id, role FROM api_keys WHERE revoked_at IS NULL").fetchall()
    return [auth.Principal(role=r[2], tenant_id=r[1], key_hash=r[0]) for r in rows]


def count_admin_keys(db: sqlite_utils.Database) -> int:
    return int(db.execute("SELECT count(*) FROM api_keys WHERE role = 'admin' AND revoked_at IS NULL").fetchone()[0])


def find_key(db: sqlite_utils.Database, key_hash: str) -> auth.Principal | None:
    row = db.execute(
        "SELECT key_hash, tenant_id, role FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL", [key_hash]
    ).fetchone()
    return auth.Principal(role=row[2], tenant_id=row[1], key_hash=row[0]) if row else None
