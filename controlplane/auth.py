"""API keys: generation, hashing, and the in-memory lookup the gateway uses on every request.

Keys are 32 random bytes (``cpn_<tenant-or-admin>_<urlsafe>``); only their SHA-256 is stored. A
random 256-bit key needs no slow hash: nothing can be guessed offline from its digest. The lookup
hashes the presented key and finds the digest in a dict (time independent of how much of the key
matched); the final equality uses ``hmac.compare_digest``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: an admin (operator) or a tenant."""

    role: str  # "admin" | "tenant"
    tenant_id: str | None
    key_hash: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def new_key(prefix: str) -> str:
    """A new API key; ``prefix`` tells humans what it is (never parsed for authorization)."""
    return f"cpn_{prefix}_{secrets.token_urlsafe(32)}"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """Key digest -> principal, loaded from the store and updated as keys are issued or revoked."""

    def __init__(self) -> None:
        self._by_hash: dict[str, Principal] = {}

    def __repr__(self) -> str:
        admins = sum(1 for p in self._by_hash.values() if p.is_admin)
        return f"<KeyRing keys={len(self._by_hash)} admins={admins}>"

    def add(self, principal: Principal) -> None:
        self._by_hash[principal.key_hash] = principal

    def remove(self, key_hash: str) -> None:
        self._by_hash.pop(key_hash, None)

    def lookup(self, key: str) -> Principal | None:
        digest = hash_key(key)
        found = self._by_hash.get(digest)
        if found is None or not hmac.compare_digest(found.key_hash, digest):
            return None
        return found
