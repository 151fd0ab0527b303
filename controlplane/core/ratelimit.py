"""Per-key token buckets (per-tenant request rate limits), pure: ``now`` is an argument.

Promises:

- Rule 1: a key may spend at most ``burst`` tokens at once and ``rate_per_s`` tokens per second
  on average; a refused call spends nothing and says how long until it would be allowed.
- Rule 2: memory is bounded. A bucket idle long enough to be full again is the same as no
  bucket, so such buckets at the old end of the queue are dropped whenever a new one is made;
  beyond ``max_keys`` the least recently used bucket is dropped anyway (that key then starts full,
  a small leniency).
- Rule 3: a clock that steps backwards refunds nothing and takes nothing (elapsed time >= 0).

The gateway answers a refusal with 429 and ``Retry-After: retry_after_header(retry_after_s)``.
"""

from __future__ import annotations

import math
from collections import OrderedDict


class _Bucket:
    __slots__ = ("tokens", "at", "rate_per_s", "burst")

    def __init__(self, tokens: float, at: float, rate_per_s: float, burst: float) -> None:
        self.tokens = tokens
        self.at = at
        self.rate_per_s = rate_per_s
        self.burst = burst

    def refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.at)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate_per_s)
        self.at = max(self.at, now)

    def full_at(self) -> float:
        return self.at + (self.burst - self.tokens) / self.rate_per_s


class TokenBuckets:
    """Token buckets by key (tenant id), all with the same default rate and burst.

    Args:
        rate_per_s: tokens added per second.
        burst: bucket size (the most a key can spend at once).
        max_keys: hard bound on buckets kept.

    Raises:
        ValueError: a non-positive rate, burst or max_keys.
    """

    def __init__(self, rate_per_s: float, burst: float, *, max_keys: int = 100_000) -> None:
        _check_limits(rate_per_s, burst)
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.rate_per_s = float(rate_per_s)
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self.allowed = 0
        self.refused = 0

    def __repr__(self) -> str:
        return (f"<TokenBuckets rate_per_s={self.rate_per_s:g} burst={self.burst:g} keys={len(self._buckets)} "
                f"allowed={self.allowed} refused={self.refused}>")

    def __len__(self) -> int:
        return len(self._buckets)

    def take(
        self,
        key: str,
        now: float,
        cost: float = 1.0,
        *,
        rate_per_s: float | None = None,
        burst: float | None = None,
    ) -> tuple[bool, float]:
        """Spend ``cost`` tokens of ``key``'s bucket if it holds them.

        Args:
            key: whose bucket (a tenant id).
            now: epoch seconds.
            cost: tokens this call needs (> 0, <= burst).
            rate_per_s, burst: this key's own limits (a tenant's plan), else the defaults.

        Returns:
            ``(True, 0.0)`` if allowed, else ``(False, seconds until it would be allowed)``.

        Raises:
            ValueError: cost <= 0 or greater than the burst (it could never be allowed).
        """
        rate = self.rate_per_s if rate_per_s is None else rate_per_s
        size = self.burst if burst is None else burst
        bucket = self._buckets.get(key)
        if bucket is None or bucket.rate_per_s != rate or bucket.burst != size:  # new, or the plan changed
            rate, size = float(rate), float(size)
            _check_limits(rate, size)
        if not cost > 0:
            raise ValueError(f"cost must be > 0, got {cost}")
        if cost > size:
            raise ValueError(f"cost {cost:g} exceeds the burst {size:g}: it could never be allowed")
        if bucket is None:
            bucket = _Bucket(size, now, rate, size)
            self._buckets[key] = bucket
            self._evict(now, keep=key)  # only a new bucket grows the table
        else:
            bucket.rate_per_s, bucket.burst = rate, size
            # _Bucket.refill, inlined (every request of every tenant comes here).
            tokens, at = bucket.tokens, bucket.at
            if now > at:
                tokens += (now - at) * rate
                bucket.at = now
            bucket.tokens = tokens if tokens < size else size
            self._buckets.move_to_end(key)
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            self.allowed += 1
            return True, 0.0
        self.refused += 1
        return False, (cost - bucket.tokens) / bucket.rate_per_s

    def _evict(self, now: float, keep: str) -> None:
        # Oldest first: drop buckets that are full again (as good as absent), then any beyond the cap.
        while self._buckets:
            key, bucket = next(iter(self._buckets.items()))
            if key == keep:
                return
            if bucket.full_at() <= now or len(self._buckets) > self.max_keys:
                del self._buckets[key]
            else:
                return

    def peek(self, key: str, now: float) -> float:
        """Tokens ``key`` could spend at ``now`` (without spending them)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return self.burst
        return min(bucket.burst, bucket.tokens + max(0.0, now - bucket.at) * bucket.rate_per_s)


def _check_limits(rate_per_s: float, burst: float) -> None:
    if not (rate_per_s > 0 and math.isfinite(rate_per_s)):
        raise ValueError(f"rate_per_s must be a positive number, got {rate_per_s}")
    if not (burst >= 1 and math.isfinite(burst)):
        raise ValueError(f"burst must be >= 1, got {burst}")


def retry_after_header(retry_after_s: float) -> str:
    """``Retry-After`` value: whole seconds, rounded up, at least 1 (RFC 9110 delay-seconds)."""
    return str(max(1, math.ceil(retry_after_s - 1e-9)))
