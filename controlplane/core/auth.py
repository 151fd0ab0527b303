"""API keys: generation, hashing, and the in-memory lookup the gateway uses on every request.

Keys are 32 random bytes (``cpn_<tenant-or-admin>_<urlsafe>``); only their SHA-256 is stored. A
random 256-bit key needs no slow hash: nothing can be guessed offline from its digest. The lookup
hashes the presented key and finds the digest in a dict (time independent of how much of the key
matched); the final equality uses ``hmac.compare_digest``.

Keys have a lifecycle (revoked, expiring; see ``controlplane/services/keys.py``). The ring is a cache of
the store, never the authority: an entry is trusted for at most ``recheck_s`` (1 s) after it was
read from the store, and never past its ``expires_at``; after that :meth:`KeyRing.lookup` answers
None and the caller reads the store again. So a key revoked by anyone who can write the record
(this hub's admin API, ``cpn key revoke`` on the database file) is refused by this hub within a
second, and revocation through this hub's own API is immediate (it drops the entry).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass

RECHECK_S = 1.0
"""How long a key read from the store is believed without reading it again (revocation latency)."""

SECRET_CHARS = 43
"""Length of the random part of a key (``secrets.token_urlsafe(32)``)."""

SHOWN_SECRET_CHARS = 4
"""How many characters of the random part a key's listed prefix shows (24 of 256 bits)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: an admin (operator), a tenant or a third-party provider, and with which key.
    A provider's key has no tenant (``tenant_id`` None): it manages its own pools' offers and reads
    its own statement, nothing else (docs/market.md)."""

    role: str  # "admin" | "tenant" | "provider"
    tenant_id: str | None
    key_hash: str
    key_id: str = ""
    expires_at: float | None = None
    provider_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def is_provider(self) -> bool:
        return self.role == "provider"


def principal_of(role: str, owner: str | None, key_hash: str, key_id: str = "",
                 expires_at: float | None = None) -> Principal:
    """The principal of a stored key whose owner column holds ``owner`` (a tenant's id, a
    provider's id for a provider key, None for an admin key)."""
    if role == "provider":
        return Principal(role=role, tenant_id=None, key_hash=key_hash, key_id=key_id, expires_at=expires_at,
                         provider_id=owner)
    return Principal(role=role, tenant_id=owner, key_hash=key_hash, key_id=key_id, expires_at=expires_at)


def new_key(prefix: str) -> str:
    """A new API key; ``prefix`` tells humans what it is (never parsed for authorization)."""
    return f"cpn_{prefix}_{secrets.token_urlsafe(32)}"


def new_key_id() -> str:
    """The public name of a key (listed, revoked by); unrelated to the key's secret or digest."""
    return f"key_{secrets.token_hex(8)}"


def shown_prefix(key: str) -> str:
    """What a listing shows of a key: ``cpn_<who>_`` and the first few random characters."""
    cut = len(key) - SECRET_CHARS + SHOWN_SECRET_CHARS
    return key[:cut] if cut > 0 else ""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """Key digest -> principal, a short-lived cache of the store's working keys.

    Args:
        recheck_s: an entry older than this is not answered (the caller re-reads the store).
        clock: epoch seconds (expiry times are epoch seconds), handed in (the core reads no clock).
    """

    def __init__(self, *, recheck_s: float = RECHECK_S, clock: Callable[[], float]) -> None:
        self._by_hash: dict[str, tuple[Principal, float]] = {}
        self.recheck_s = recheck_s
        self.clock = clock

    def __repr__(self) -> str:
        admins = sum(1 for p, _ in self._by_hash.values() if p.is_admin)
        return f"<KeyRing keys={len(self._by_hash)} admins={admins} recheck_s={self.recheck_s}>"

    def add(self, principal: Principal) -> None:
        """Remember ``principal`` as read from the store just now."""
        self._by_hash[principal.key_hash] = (principal, self.clock())

    def remove(self, key_hash: str) -> None:
        self._by_hash.pop(key_hash, None)

    def lookup(self, key: str) -> Principal | None:
        """The principal of ``key`` if it is known, fresh and unexpired; else None (ask the store)."""
        digest = hash_key(key)
        entry = self._by_hash.get(digest)
        if entry is None:
            return None
        found, checked_at = entry
        now = self.clock()
        if now - checked_at > self.recheck_s or (found.expires_at is not None and now >= found.expires_at):
            return None
        if not hmac.compare_digest(found.key_hash, digest):
            return None
        return found
