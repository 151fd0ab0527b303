"""Tenants and their API keys (hashed), and admin keys. Every write is one committed transaction."""

from __future__ import annotations

from typing import Any

import sqlite_utils

from controlplane.core import auth
from controlplane.core.errors import Conflict, NotFound
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


KEY_FIELDS = ("id", "prefix", "role", "tenant_id", "label", "created_at", "expires_at", "revoked_at")
KEY_COLUMNS = ", ".join(KEY_FIELDS)


def add_key(db: sqlite_utils.Database, key: str, *, role: str, tenant_id: str | None, now: float, label: str = "",
            expires_at: float | None = None) -> auth.Principal:
    """Store the digest of ``key`` (never the key) for a tenant or an admin, under a new key id."""
    with transaction(db):
        return _insert_key(db, key, role=role, tenant_id=tenant_id, now=now, label=label, expires_at=expires_at)


def _insert_key(db: sqlite_utils.Database, key: str, *, role: str, tenant_id: str | None, now: float, label: str,
                expires_at: float | None) -> auth.Principal:
    digest = auth.hash_key(key)
    key_id = auth.new_key_id()
    _table(db, "api_keys").insert({
        "key_hash": digest, "id": key_id, "prefix": auth.shown_prefix(key), "tenant_id": tenant_id, "role": role,
        "label": label, "created_at": now, "expires_at": expires_at, "revoked_at": None,
    })
    return auth.principal_of(role, tenant_id, digest, key_id, expires_at)


def key_state(row: dict[str, Any], now: float) -> str:
    """``active``, ``expired`` or ``revoked`` (revocation wins over expiry)."""
    if row["revoked_at"] is not None:
        return "revoked"
    if row["expires_at"] is not None and now >= row["expires_at"]:
        return "expired"
    return "active"


def _key_view(row: tuple[Any, ...], now: float) -> dict[str, Any]:
    view = dict(zip(KEY_FIELDS, row))
    view["state"] = key_state(view, now)
    return _shown(view)


def _shown(view: dict[str, Any]) -> dict[str, Any]:
    """A key's view as answered: a provider key's owner is ``provider_id`` (its tenant_id column)."""
    if view.get("role") == "provider":
        view["provider_id"], view["tenant_id"] = view["tenant_id"], None
    return view


def list_keys(db: sqlite_utils.Database, *, role: str, tenant_id: str | None, now: float) -> list[dict[str, Any]]:
    """A tenant's keys (``role="tenant"``), a provider's (``role="provider"``, its id as ``tenant_id``)
    or the admin keys: ids, prefixes and times, never digests."""
    if role == "admin":
        rows = db.execute(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE role = 'admin' ORDER BY created_at, id").fetchall()
    else:
        rows = db.execute(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE role = ? AND tenant_id = ? "
                          "ORDER BY created_at, id", [role, tenant_id]).fetchall()
    return [_key_view(r, now) for r in rows]


def _scoped_key(db: sqlite_utils.Database, key_id: str, *, role: str, tenant_id: str | None) -> tuple[str, dict[str, Any]]:
    """(digest, row) of ``key_id`` if it belongs to that scope; else NotFound (another tenant's key
    is as unknown as a made-up id)."""
    row = db.execute(f"SELECT key_hash, {KEY_COLUMNS} FROM api_keys WHERE id = ?", [key_id]).fetchone()
    if row is None or row[3] != role or (role != "admin" and row[4] != tenant_id):
        raise NotFound(f"key {key_id!r} not found", field="key_id")
    return row[0], dict(zip(KEY_FIELDS, row[1:]))


def _working_admin_keys(db: sqlite_utils.Database, now: float) -> int:
    return int(db.execute("SELECT count(*) FROM api_keys WHERE role = 'admin' AND revoked_at IS NULL "
                          "AND (expires_at IS NULL OR expires_at > ?)", [now]).fetchone()[0])


def revoke_key_id(db: sqlite_utils.Database, key_id: str, *, role: str, tenant_id: str | None,
                  now: float) -> tuple[str, dict[str, Any]]:
    """Revoke a key by its id, within its scope; returns (digest, key view). Revoking a revoked key
    changes nothing. The last working admin key cannot be revoked (Conflict): nobody could then
    issue or revoke keys through the API."""
    with transaction(db):
        digest, row = _scoped_key(db, key_id, role=role, tenant_id=tenant_id)
        if row["revoked_at"] is None:
            if role == "admin" and key_state(row, now) == "active" and _working_admin_keys(db, now) <= 1:
                raise Conflict(f"key {key_id!r} is the last working admin key; create another admin key "
                               "before revoking it", field="key_id", code="last_admin_key")
            db.execute("UPDATE api_keys SET revoked_at = ? WHERE key_hash = ?", [now, digest])
            row["revoked_at"] = now
    view = dict(row)
    view["state"] = key_state(view, now)
    return digest, _shown(view)


def rotate_key_id(db: sqlite_utils.Database, key_id: str, new_key: str, *, role: str, tenant_id: str | None, now: float,
                  grace_s: float, label: str = "", expires_at: float | None = None) -> tuple[str, auth.Principal, dict[str, Any]]:
    """Issue ``new_key`` in place of ``key_id``, in one transaction: the old key keeps working for
    ``grace_s`` more seconds (never longer than it already would), or is revoked now if
    ``grace_s`` is 0. A revoked or expired key cannot be rotated (Conflict: it already stopped).
    Returns (old digest, new principal, old key view)."""
    with transaction(db):
        digest, row = _scoped_key(db, key_id, role=role, tenant_id=tenant_id)
        state = key_state(row, now)
        if state != "active":
            raise Conflict(f"key {key_id!r} is {state}; create a new key instead", field="key_id", code=f"key_{state}")
        principal = _insert_key(db, new_key, role=role, tenant_id=tenant_id, now=now, label=label or row["label"] or "",
                                expires_at=expires_at)
        if grace_s <= 0:
            db.execute("UPDATE api_keys SET revoked_at = ? WHERE key_hash = ?", [now, digest])
            row["revoked_at"] = now
        else:
            until = now + grace_s if row["expires_at"] is None else min(row["expires_at"], now + grace_s)
            db.execute("UPDATE api_keys SET expires_at = ? WHERE key_hash = ?", [until, digest])
            row["expires_at"] = until
    view = dict(row)
    view["state"] = key_state(view, now)
    return digest, principal, _shown(view)


def load_keys(db: sqlite_utils.Database, *, now: float | None = None) -> list[auth.Principal]:
    """The working keys (not revoked; not expired at ``now`` when given)."""
    rows = db.execute("SELECT key_hash, tenant_id, role, id, expires_at FROM api_keys WHERE revoked_at IS NULL").fetchall()
    return [auth.principal_of(r[2], r[1], r[0], r[3] or "", r[4])
            for r in rows if now is None or r[4] is None or r[4] > now]


def find_key(db: sqlite_utils.Database, key_hash: str) -> tuple[auth.Principal, float | None] | None:
    """The key with this digest, revoked or not: (principal, revoked_at)."""
    row = db.execute(
        "SELECT key_hash, tenant_id, role, id, expires_at, revoked_at FROM api_keys WHERE key_hash = ?", [key_hash]
    ).fetchone()
    if row is None:
        return None
    return auth.principal_of(row[2], row[1], row[0], row[3] or "", row[4]), row[5]
