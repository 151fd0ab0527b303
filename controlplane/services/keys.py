"""Key lifecycle: issue, list, revoke, rotate and expire tenant and admin API keys.

Used by the admin API (``controlplane/gateway/admin.py``), the hub's key lookup and ``cpn key``.
The store holds the truth (``api_keys``: digest, public id, shown prefix, created / expires /
revoked times); the hub's :class:`~controlplane.core.auth.KeyRing` is a cache of it believed for at
most a second (see ``auth.py``). Revoking or rotating through this module also drops the ring's
entry, so the hub that did it refuses the old key on the very next request.

With several hubs (gateways) over one record, the record's change feed is what carries a
revocation to the others; until then each hub re-reads a key from its store at least once a
second.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Union

from controlplane.core import auth
from controlplane.core.errors import RequestError, Unauthorized
from controlplane.store import tenants as store_tenants

log = logging.getLogger("cpn.keys")

DEFAULT_GRACE_S = 86_400.0
"""How long a rotated key keeps working unless the caller says otherwise (24 h)."""

PROVIDER_ID = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
"""A provider's id, as the layout's ``provider`` of a site names it."""
OPERATOR_PROVIDER = "cpn-operator"
"""The operator's own provider id (``market.postings.Fees.operator_provider``)."""

class RingChanges:
    """What a key write would do to the hub's :class:`~controlplane.core.auth.KeyRing`, kept until
    the write is on the record (an awaited write may run more than once, and may fail), then
    applied: revoked or replaced digests dropped, new principals added."""

    def __init__(self) -> None:
        self.added: list[auth.Principal] = []
        self.removed: list[str] = []

    def add(self, principal: auth.Principal) -> None:
        self.added.append(principal)

    def remove(self, digest: str) -> None:
        self.removed.append(digest)

    def apply(self, ring: auth.KeyRing) -> None:
        for digest in self.removed:
            ring.remove(digest)
        for principal in self.added:
            ring.add(principal)


Ring = Union[auth.KeyRing, RingChanges, None]
"""Where a key write puts what it changed: the hub's ring, a :class:`RingChanges`, or nowhere (the CLI)."""

MISS_MEMORY_S = 5.0
"""How long an unknown, revoked or expired key is answered from memory (no store read)."""


def expiry(now: float, *, expires_at: float | None, ttl_s: float | None, field_prefix: str = "") -> float | None:
    """The absolute expiry from either ``expires_at`` (epoch seconds) or ``ttl_s``; 400 naming the
    field if both are given or the time is not in the future."""
    if expires_at is not None and ttl_s is not None:
        raise RequestError("give expires_at or ttl_s, not both", field=f"{field_prefix}ttl_s")
    if ttl_s is not None:
        if ttl_s <= 0:
            raise RequestError("ttl_s must be positive", field=f"{field_prefix}ttl_s")
        return now + ttl_s
    if expires_at is not None and expires_at <= now:
        raise RequestError(f"expires_at {expires_at} is not in the future (now {now:.0f})", field=f"{field_prefix}expires_at")
    return expires_at


def _who(role: str, tenant_id: str | None) -> str:
    if role == "provider":
        return "prov-" + (tenant_id or "")[:10]
    return "admin" if role == "admin" else (tenant_id or "")[:12]


def _new_view(principal: auth.Principal, key: str, *, label: str, now: float) -> dict[str, Any]:
    return {
        "id": principal.key_id, "prefix": auth.shown_prefix(key), "role": principal.role,
        "tenant_id": principal.tenant_id, **({"provider_id": principal.provider_id} if principal.is_provider else {}),
        "label": label, "created_at": now, "expires_at": principal.expires_at,
        "revoked_at": None, "state": "active", "api_key": key,
    }


def create(db: Any, ring: Ring, *, role: str, tenant_id: str | None, now: float, label: str = "",
           expires_at: float | None = None) -> dict[str, Any]:
    """Issue a key; the answer holds the key itself (``api_key``), shown this once."""
    if role == "tenant":
        assert tenant_id is not None
        store_tenants.get_tenant(db, tenant_id)  # 404 for an unknown tenant
    elif role == "provider":
        provider_problem(tenant_id)
    key = auth.new_key(_who(role, tenant_id))
    principal = store_tenants.add_key(db, key, role=role, tenant_id=tenant_id, now=now, label=label, expires_at=expires_at)
    if ring is not None:
        ring.add(principal)
    return _new_view(principal, key, label=label, now=now)


def provider_problem(provider: str | None) -> None:
    """400 naming ``provider`` unless it is a provider's id (a third party's: the operator's own
    pools are managed with admin keys)."""
    if not provider or not PROVIDER_ID.fullmatch(provider):
        raise RequestError(f"provider must be 1..64 of a-z 0-9 _ . - starting with a letter or digit, got {provider!r}",
                           field="provider")
    if provider == OPERATOR_PROVIDER:
        raise RequestError(f"{provider} is the operator: its pools are managed with admin keys", field="provider")


def listing(db: Any, *, role: str, tenant_id: str | None, now: float) -> list[dict[str, Any]]:
    if role == "tenant":
        assert tenant_id is not None
        store_tenants.get_tenant(db, tenant_id)
    return store_tenants.list_keys(db, role=role, tenant_id=tenant_id, now=now)


def revoke(db: Any, ring: Ring, key_id: str, *, role: str, tenant_id: str | None, now: float) -> dict[str, Any]:
    """Revoke ``key_id`` now (404 outside its scope, 409 for the last working admin key)."""
    digest, view = store_tenants.revoke_key_id(db, key_id, role=role, tenant_id=tenant_id, now=now)
    if ring is not None:
        ring.remove(digest)
    return view


def rotate(db: Any, ring: Ring, key_id: str, *, role: str, tenant_id: str | None, now: float,
           grace_s: float = DEFAULT_GRACE_S, label: str = "", expires_at: float | None = None) -> dict[str, Any]:
    """A new key in place of ``key_id``; the old one works ``grace_s`` longer (0: revoked now).

    Returns ``{"new": <view with api_key>, "old": <view of the old key>}``.
    """
    if grace_s < 0:
        raise RequestError("grace_s must be >= 0", field="grace_s")
    key = auth.new_key(_who(role, tenant_id))
    old_digest, principal, old = store_tenants.rotate_key_id(
        db, key_id, key, role=role, tenant_id=tenant_id, now=now, grace_s=grace_s, label=label, expires_at=expires_at)
    if ring is not None:
        ring.remove(old_digest)  # re-read from the store on its next use: with its new expiry, or revoked
        ring.add(principal)
    return {"new": _new_view(principal, key, label=label or old["label"] or "", now=now), "old": old}


def lookup_in_store(db: Any, ring: auth.KeyRing, key: str, misses: dict[str, tuple[float, str]], *,
                    now: float, monotonic: float) -> auth.Principal | None:
    """The principal of ``key`` read from the store (and put back in the ring), or None if no such
    key exists. A key that exists but was revoked or has expired raises :class:`Unauthorized`
    saying so: only the key's holder can present it, so saying why leaks nothing to anyone else.

    Unknown, revoked and expired keys are remembered for :data:`MISS_MEMORY_S` so a flood of bad
    keys costs one indexed read each per few seconds at most.
    """
    if db is None or len(key) > 200:
        return None
    digest = auth.hash_key(key)
    remembered = misses.get(digest)
    if remembered is not None and remembered[0] > monotonic:
        if remembered[1]:
            raise Unauthorized(remembered[1], code=_code(remembered[1]))
        return None
    found = store_tenants.find_key(db, digest)
    reason = ""
    if found is not None:
        principal, revoked_at = found
        if revoked_at is not None:
            reason = "API key revoked"
            ring.remove(digest)
        elif principal.expires_at is not None and now >= principal.expires_at:
            reason = "API key expired"
            ring.remove(digest)
        else:
            ring.add(principal)
            misses.pop(digest, None)
            return principal
    if len(misses) > 10_000:
        misses.clear()
    misses[digest] = (monotonic + MISS_MEMORY_S, reason)
    if reason:
        assert found is not None
        log.info("event=key_refused reason=%s key_id=%s role=%s tenant=%s", _code(reason).removeprefix("api_key_"),
                 found[0].key_id, found[0].role, found[0].tenant_id)
        raise Unauthorized(reason, code=_code(reason))
    return None


def _code(reason: str) -> str:
    return "api_key_revoked" if "revoked" in reason else "api_key_expired"

