"""Tenants and their API keys, as the gateway and the tools use them: who a key is, what a tenant may
do (its rate), creating tenants and issuing, listing, revoking and rotating keys.

Rate limits across gateways: the buckets are per process, so with N gateways on one record each
enforces 1/N of a tenant's rate and burst (N: the gateways heard from in the record's presence keys,
``Leadership.gateways``). A tenant spread over the gateways (a load balancer in front) gets its
plan; one that sends everything to one gateway gets 1/N of it there.

Built by the composition root with exactly what it uses: the record (:class:`~controlplane.store.handle.Store`),
the in-memory :class:`~controlplane.core.auth.KeyRing`, the rate buckets, the clock and the metrics.
The key lifecycle rules themselves are in :mod:`controlplane.services.keys`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from controlplane.core import auth
from controlplane.core.clock import Clock
from controlplane.core.errors import RateLimited, RecordUnavailable, Unauthorized
from controlplane.core.ratelimit import TokenBuckets
from controlplane.metrics import HubMetrics
from controlplane.services import keys as key_lifecycle
from controlplane.store import tenants as store_tenants
from controlplane.store.db import barrier, write
from controlplane.store.handle import Store

log = logging.getLogger("cpn.tenancy")
T = TypeVar("T")


class TenancyService:
    """Tenants, keys and rate limits (see the module docstring)."""

    name = "tenancy"

    def __init__(self, *, store: Store, keys: auth.KeyRing, rate_limiter: TokenBuckets, clock: Clock,
                 metrics: HubMetrics) -> None:
        self.store = store
        self.keys = keys
        self.rate_limiter = rate_limiter
        self.clock = clock
        self.metrics = metrics
        self._tenants: dict[str, dict[str, Any]] = {}
        self._key_misses: dict[str, tuple[float, str]] = {}
        self._caught_up_for: dict[str, float] = {}
        """Unknown keys' digests -> until when :meth:`authenticate_caught_up` does not ask again."""
        self.gateways: Callable[[], int] = lambda: 1
        """How many gateways serve tenants now (this one included): each enforces its share of a
        tenant's rate and burst (set by the composition from ``Leadership.gateways``)."""

    def __repr__(self) -> str:
        return f"<TenancyService tenants={len(self._tenants)} keys={self.keys!r}>"

    async def start(self) -> None:
        """Load the keys and tenants of the record (opened by the process before services start)."""
        db = self.store.db
        for principal in store_tenants.load_keys(db, now=self.clock.time()):
            self.keys.add(principal)
        for row in store_tenants.list_tenants(db):
            self._tenants[row["id"]] = row

    async def stop(self) -> None:
        return None

    # ------------------------------------------------------------------ who is calling

    def authenticate(self, key: str) -> auth.Principal | None:
        """The principal of ``key``: from the ring, else re-read from the record; None if no such key.

        Raises:
            Unauthorized: the key exists but was revoked or has expired.
        """
        return self.keys.lookup(key) or self.lookup_key_in_store(key)

    async def authenticate_caught_up(self, key: str) -> auth.Principal | None:
        """:meth:`authenticate` for a key it did not know, after this process's projection has
        caught up with the record (``store.db.barrier``; nothing on SQLite alone): a key issued at
        another gateway a moment ago (its 201 given once a quorum had it) is known here too, not a
        401 for as long as the projection lags (seen: 2 of 15 keys used at once at another gateway,
        on a loaded machine). Every caller waits for a catch-up that started after it came (the
        record's bridge shares one among all who came while the last ran: a flood of distinct bad
        keys costs the record one catch-up per round trip, not one per request); a key still
        unknown after a catch-up that answered is remembered as unknown for
        :data:`~controlplane.services.keys.MISS_MEMORY_S`. Requests with the same new key that
        arrive together all wait for the catch-up (seen: the second of two was a 401 while the
        first's catch-up ran, when the miss was remembered before the catch-up)."""
        if not self.store.is_open:
            return None
        digest = auth.hash_key(key)
        if self._caught_up_for.get(digest, 0.0) > self.clock.monotonic():
            return None
        answered = await barrier(self.store.db)
        found = self.authenticate(key)
        if found is not None:
            return found
        if not answered:
            # Not "no such key": this process could not see the record's latest writes (no quorum,
            # or no answer in time on a loaded host), and the key may be one issued a moment ago at
            # another gateway. Say so (503, retry) and ask again on the next try.
            raise RecordUnavailable("this gateway does not know the API key and could not catch up "
                                    "with the record to check it; retry")
        if len(self._caught_up_for) > 10_000:
            self._caught_up_for.clear()
        self._caught_up_for[digest] = self.clock.monotonic() + key_lifecycle.MISS_MEMORY_S
        return None

    def lookup_key_in_store(self, key: str) -> auth.Principal | None:
        """A key the in-memory ring does not answer for: issued elsewhere (``cpn key create``), not
        re-read within the last second, or expired. None if no such key; raises Unauthorized
        ("API key revoked" / "API key expired") for a key that stopped working (see keys.py)."""
        if not self.store.is_open:
            return None
        try:
            return key_lifecycle.lookup_in_store(self.store.db, self.keys, key, self._key_misses,
                                                 now=self.clock.time(), monotonic=self.clock.monotonic())
        except Unauthorized as exc:
            self.metrics.key_refused(exc.code.removeprefix("api_key_"))
            raise

    def rate_limit(self, principal: auth.Principal) -> None:
        """Per-tenant token bucket (the tenant's own plan, else the process's defaults).

        Raises:
            RateLimited: with the seconds until the next request would be allowed.
        """
        tenant = principal.tenant_id
        if tenant is None:  # operators are not rate limited
            return
        row = self.tenant(tenant) or {}
        rate = row.get("rate_per_s") or self.rate_limiter.rate_per_s
        burst = row.get("burst") or self.rate_limiter.burst
        share = self.gateways()
        if share > 1:  # N gateways: each 1/N of the plan, so the tenant gets its rate, not N times it
            rate, burst = rate / share, max(1.0, burst / share)
        ok, retry_after_s = self.rate_limiter.take(tenant, self.clock.monotonic(), rate_per_s=rate, burst=burst)
        if not ok:
            raise RateLimited(f"tenant {tenant!r} is over its request rate; retry in {retry_after_s:.2f} s",
                              retry_after_s=retry_after_s)

    # ------------------------------------------------------------------ tenants

    def list_tenants(self) -> list[dict[str, Any]]:
        """Every tenant as recorded."""
        return store_tenants.list_tenants(self.store.db)

    def record_changed(self, table: str, row: dict[str, Any]) -> None:
        """A row written by another hub process reached this one's record: drop what is cached of it."""
        if table == "api_keys" and "key_hash" in row:
            self.keys.remove(row["key_hash"])
            self._key_misses.pop(row["key_hash"], None)
        elif table == "tenants" and "id" in row:
            self._tenants.pop(row["id"], None)

    def tenant(self, tenant_id: str) -> dict[str, Any] | None:
        row = self._tenants.get(tenant_id)
        if row is None and self.store.is_open:
            try:
                row = store_tenants.get_tenant(self.store.db, tenant_id)
            except Exception:
                return None
            self._tenants[tenant_id] = row
        return row

    def tenant_default_origin(self, tenant_id: str) -> str | None:
        row = self.tenant(tenant_id)
        return row.get("default_origin") if row else None

    def create_tenant(self, tenant_id: str, *, name: str = "", default_origin: str | None = None,
                      quota_cards: int | None = None, rate_per_s: float | None = None,
                      burst: int | None = None) -> str:
        """Create a tenant with one API key; returns the key (shown once, stored hashed)."""
        now = self.clock.time()
        db = self.store.db
        row = store_tenants.create_tenant(
            db, tenant_id, name=name, now=now, default_origin=default_origin, quota_cards=quota_cards,
            rate_per_s=rate_per_s, burst=burst,
        )
        key = auth.new_key(tenant_id[:12])
        self.keys.add(store_tenants.add_key(db, key, role="tenant", tenant_id=tenant_id, now=now, label="first"))
        self._tenants[tenant_id] = row
        return key

    async def create_tenant_async(self, tenant_id: str, *, name: str = "", default_origin: str | None = None,
                                  quota_cards: int | None = None, rate_per_s: float | None = None,
                                  burst: int | None = None) -> str:
        """:meth:`create_tenant` as one write (the tenant with its first key: both or neither),
        awaited (``store.db.write``): on the replicated record the loop goes on while a quorum
        acknowledges (409 ``record_conflict``, 503 ``record_unavailable`` as for a submission)."""
        now = self.clock.time()
        key = auth.new_key(tenant_id[:12])

        def commit(db: Any) -> tuple[dict[str, Any], auth.Principal]:
            row = store_tenants.create_tenant(
                db, tenant_id, name=name, now=now, default_origin=default_origin, quota_cards=quota_cards,
                rate_per_s=rate_per_s, burst=burst)
            return row, store_tenants.add_key(db, key, role="tenant", tenant_id=tenant_id, now=now, label="first")

        row, principal = await write(self.store.db, commit, fenced=False)
        self.keys.add(principal)
        self._tenants[tenant_id] = row
        return key

    def add_tenant_key(self, tenant_id: str, label: str = "") -> str:
        """Issue one more key for an existing tenant."""
        key = auth.new_key(tenant_id[:12])
        self.keys.add(store_tenants.add_key(self.store.db, key, role="tenant", tenant_id=tenant_id,
                                            now=self.clock.time(), label=label))
        return key

    def create_admin_key(self, label: str = "") -> str:
        key = auth.new_key("admin")
        self.keys.add(store_tenants.add_key(self.store.db, key, role="admin", tenant_id=None, now=self.clock.time(),
                                            label=label))
        return key

    # ------------------------------------------------------------------ key lifecycle (admin API)
    # Each write is awaited (``store.db.write``, unfenced: an operator's write, which any gateway
    # makes); the key ring learns of it only once it is on the record (``RingChanges``).

    async def _key_write(self, fn: Callable[[Any, key_lifecycle.RingChanges], T]) -> T:
        def run(db: Any) -> tuple[T, key_lifecycle.RingChanges]:
            changes = key_lifecycle.RingChanges()
            return fn(db, changes), changes

        result, changes = await write(self.store.db, run, fenced=False)
        changes.apply(self.keys)
        return result

    def list_keys(self, *, role: str, tenant_id: str | None) -> list[dict[str, Any]]:
        """A tenant's keys, or the admin keys: ids, shown prefixes, times and state; never a key."""
        return key_lifecycle.listing(self.store.db, role=role, tenant_id=tenant_id, now=self.clock.time())

    async def issue_key(self, *, role: str, tenant_id: str | None, label: str = "", expires_at: float | None = None,
                        ttl_s: float | None = None) -> dict[str, Any]:
        """Issue a key (optional expiry: ``expires_at`` or ``ttl_s``); the answer holds the key, shown once."""
        now = self.clock.time()
        expiry = key_lifecycle.expiry(now, expires_at=expires_at, ttl_s=ttl_s)
        return await self._key_write(lambda db, ring: key_lifecycle.create(
            db, ring, role=role, tenant_id=tenant_id, now=now, label=label, expires_at=expiry))

    async def revoke_key(self, key_id: str, *, role: str, tenant_id: str | None) -> dict[str, Any]:
        """Revoke ``key_id`` now (404 outside its scope, 409 for the last working admin key)."""
        now = self.clock.time()
        return await self._key_write(lambda db, ring: key_lifecycle.revoke(
            db, ring, key_id, role=role, tenant_id=tenant_id, now=now))

    async def rotate_key(self, key_id: str, *, role: str, tenant_id: str | None, grace_s: float, label: str = "",
                         expires_at: float | None = None, ttl_s: float | None = None) -> dict[str, Any]:
        """A new key in place of ``key_id``; the old one works ``grace_s`` longer."""
        now = self.clock.time()
        expiry = key_lifecycle.expiry(now, expires_at=expires_at, ttl_s=ttl_s)
        return await self._key_write(lambda db, ring: key_lifecycle.rotate(
            db, ring, key_id, role=role, tenant_id=tenant_id, now=now, grace_s=grace_s, label=label,
            expires_at=expiry))
