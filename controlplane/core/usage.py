"""Usage accounting in memory, between database flushes. Pure.

What it holds: :class:`UsageBuffer`, counters keyed by (tenant, model, site) that the gateway adds to
on every answered request, and :class:`UsageRow`, the unit the store writes
(``controlplane.store.usage.add_rows``).

Promises:

- Rule 1: ``add`` is O(1) and touches no database: the hot path never waits on SQLite.  The hub
  drains the buffer about once a second and writes all rows in one transaction.
- Rule 2: ``drain`` hands over every count exactly once and leaves the buffer empty; if the write
  fails the caller gives the rows back with ``restore`` so nothing is lost or counted twice.
- Rule 3: counts are non-negative; a negative or non-integer token count is a bug in the caller
  and raises ``ValueError`` at once rather than corrupting a tenant's bill.

Usage::

    buf = UsageBuffer()
    buf.add("acme", "qwen2-7b", "hz-edge-1", prompt_tokens=12, completion_tokens=30)
    rows = buf.drain()               # -> [UsageRow(...)]
    try:
        store_usage.add_rows(db, rows)
    except Exception:
        buf.restore(rows)
        raise
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec


class UsageRow(msgspec.Struct, kw_only=True, frozen=True):
    """Counts to add for one (tenant, model, site)."""

    tenant: str
    model: str
    site: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    card_hours: float = 0.0
    energy_cny: float = 0.0


class UsageFlush(msgspec.Struct, kw_only=True, frozen=True):
    """One batch of drained rows as written: its ``id`` (unique per process) and time ``at`` are
    fixed when it is first drained, so a flush whose outcome was not known (the record took it, or
    did not, before its quorum answered) is written again *as it was*: what it bills is keyed by
    ``id`` and built from ``at``, and lands once either way."""

    id: str
    at: float
    rows: list[UsageRow]


_Key = tuple[str, str, str]


class UsageBuffer:
    """Counters per (tenant, model, site) waiting to be flushed; see the module docstring."""

    __slots__ = ("_counts", "added", "flushed_rows")

    def __init__(self) -> None:
        # [requests, prompt_tokens, completion_tokens, card_hours, energy_cny]
        self._counts: dict[_Key, list[float]] = {}
        self.added = 0
        """Calls to :meth:`add` since start (for metrics)."""
        self.flushed_rows = 0
        """Rows handed out by :meth:`drain` and not given back."""

    def __repr__(self) -> str:
        reqs = sum(int(c[0]) for c in self._counts.values())
        toks = sum(int(c[1] + c[2]) for c in self._counts.values())
        return f"<UsageBuffer keys={len(self._counts)} requests={reqs} tokens={toks} added={self.added}>"

    def __len__(self) -> int:
        return len(self._counts)

    def add(
        self,
        tenant: str,
        model: str,
        site: str,
        prompt_tokens: int,
        completion_tokens: int,
        requests: int = 1,
        *,
        card_hours: float = 0.0,
        energy_cny: float = 0.0,
    ) -> None:
        """Count ``requests`` answered for ``tenant`` by ``model`` at ``site``.

        Raises:
            ValueError: a count is negative or a token/request count is not an int.
        """
        if not (type(prompt_tokens) is int and prompt_tokens >= 0 and type(completion_tokens) is int  # noqa: E721
                and completion_tokens >= 0 and type(requests) is int and requests >= 0):  # noqa: E721
            for name, value in (("prompt_tokens", prompt_tokens), ("completion_tokens", completion_tokens), ("requests", requests)):
                if type(value) is not int or value < 0:  # noqa: E721
                    raise ValueError(f"usage {name} must be a non-negative int, got {value!r}")
        if card_hours < 0 or energy_cny < 0:
            raise ValueError(f"usage card_hours/energy_cny must be >= 0, got {card_hours!r}/{energy_cny!r}")
        c = self._counts.get((tenant, model, site))
        if c is None:
            self._counts[(tenant, model, site)] = [requests, prompt_tokens, completion_tokens, card_hours, energy_cny]
        else:
            c[0] += requests
            c[1] += prompt_tokens
            c[2] += completion_tokens
            c[3] += card_hours
            c[4] += energy_cny
        self.added += 1

    def drain(self) -> list[UsageRow]:
        """Every pending count as rows (sorted by key), leaving the buffer empty."""
        counts, self._counts = self._counts, {}
        rows = [_row(key, c) for key, c in sorted(counts.items())]
        self.flushed_rows += len(rows)
        return rows

    def restore(self, rows: Iterable[UsageRow]) -> None:
        """Give back rows whose write failed; they merge with anything added since."""
        for r in rows:
            self.add(
                r.tenant, r.model, r.site, r.prompt_tokens, r.completion_tokens, r.requests,
                card_hours=r.card_hours, energy_cny=r.energy_cny,
            )
            self.added -= 1  # not a new request
            self.flushed_rows -= 1

    def peek(self, tenant: str) -> list[UsageRow]:
        """Pending (not yet flushed) rows of one tenant, so ``GET /v1/usage`` can include them."""
        return [_row(key, c) for key, c in sorted(self._counts.items()) if key[0] == tenant]


def _row(key: _Key, c: list[float]) -> UsageRow:
    return UsageRow(
        tenant=key[0], model=key[1], site=key[2], requests=int(c[0]), prompt_tokens=int(c[1]),
        completion_tokens=int(c[2]), card_hours=c[3], energy_cny=c[4],
    )
