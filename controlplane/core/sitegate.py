"""Admission of a site's inbound NATS messages before the hub decodes them, pure (``now`` is an argument).

Promises:

- Rule 1: a message larger than its kind's byte limit is refused (``oversize``) without being
  decoded; the size is all that is looked at.
- Rule 2: each (kind, site) has its own token bucket; a message beyond it is refused
  (``rate``). One site's flood spends only its own tokens, never another site's.
- Rule 3: memory is bounded by :class:`~controlplane.core.ratelimit.TokenBuckets` (idle buckets go).

The hub's bus counts every refusal by kind and reason (``cpn_nats_dropped_messages_total``).
"""

from __future__ import annotations

from typing import Literal

import msgspec

from controlplane.core.ratelimit import TokenBuckets

Kind = Literal["heartbeat", "register", "event"]


class SiteLimits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What one site may send the hub, enforced by the hub's bus before decoding (per site id).

    NATS has no per-user message-rate limit, so the hub keeps a token bucket per site and kind;
    refused and oversized messages are dropped and counted (``cpn_nats_dropped_messages_total``).
    """

    heartbeat_rate_per_s: float = 5.0
    heartbeat_burst: int = 20
    max_heartbeat_bytes: int = 256 * 1024
    register_rate_per_s: float = 1.0
    register_burst: int = 10
    max_register_bytes: int = 256 * 1024
    event_rate_per_s: float = 50.0
    event_burst: int = 1000
    max_event_bytes: int = 64 * 1024
    """Also the ``CPN_EVENTS`` stream's ``max_msg_size``."""
    stream_max_bytes: int = 1 << 30
    """``CPN_EVENTS``'s ``max_bytes`` (new events are refused beyond it, none are pushed out)."""
    stream_max_msgs_per_site: int = 100_000
    """Unconsumed events one site may have in ``CPN_EVENTS``; more are refused (to that site only)."""


class SiteGate:
    """Per-site size and rate limits for heartbeats, registrations and events."""

    def __init__(self, limits: SiteLimits, *, max_sites: int = 100_000) -> None:
        self.limits = limits
        self._buckets: dict[str, TokenBuckets] = {
            "heartbeat": TokenBuckets(limits.heartbeat_rate_per_s, limits.heartbeat_burst, max_keys=max_sites),
            "register": TokenBuckets(limits.register_rate_per_s, limits.register_burst, max_keys=max_sites),
            "event": TokenBuckets(limits.event_rate_per_s, limits.event_burst, max_keys=max_sites),
        }
        self._max_bytes: dict[str, int] = {
            "heartbeat": limits.max_heartbeat_bytes,
            "register": limits.max_register_bytes,
            "event": limits.max_event_bytes,
        }

    def __repr__(self) -> str:
        return f"<SiteGate {', '.join(f'{k}={b!r}' for k, b in self._buckets.items())}>"

    def admit(self, kind: Kind, site: str, size: int, now: float) -> str | None:
        """None if ``site`` may send this ``size``-byte message of ``kind`` now, else the reason."""
        if size > self._max_bytes[kind]:
            return "oversize"
        allowed, _ = self._buckets[kind].take(site, now)
        return None if allowed else "rate"
