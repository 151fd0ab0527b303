"""Usage counters in SQLite (table ``usage``, migration 0021): per tenant, model and serving site.

Promises:

- ``add_rows`` writes a whole drained ``usage.UsageBuffer`` batch as one transaction of upserts
  that *add* to the counters: either every row lands or none does (the caller then gives them
  back to the buffer), and one flush costs one fsync however many requests it carries.
- ``for_tenant`` is what ``GET /v1/usage`` returns; rows still in the buffer can be folded in
  (``pending=buffer.peek(tenant)``) so a tenant sees its last second of traffic too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sqlite_utils

from controlplane.store.db import transaction
from controlplane.core.usage import UsageRow

_COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "card_hours", "energy_cny")


def add_rows(db: sqlite_utils.Database, rows: Iterable[UsageRow]) -> int:
    """Add each row's counts to its (tenant, model, site) counters, all in one transaction.

    Returns the number of rows written.
    """
    values = [
        (r.tenant, r.model, r.site, r.requests, r.prompt_tokens, r.completion_tokens, r.card_hours, r.energy_cny)
        for r in rows
    ]
    if not values:
        return 0
    with transaction(db):
        db.conn.executemany(
            """INSERT INTO usage (tenant, model, site, requests, prompt_tokens, completion_tokens, card_hours, energy_cny)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (tenant, model, site) DO UPDATE SET
                 requests = requests + excluded.requests,
                 prompt_tokens = prompt_tokens + excluded.prompt_tokens,
                 completion_tokens = completion_tokens + excluded.completion_tokens,
                 card_hours = card_hours + excluded.card_hours,
                 energy_cny = energy_cny + excluded.energy_cny""",
            values,
        )
    return len(values)


def _zero() -> dict[str, Any]:
    return {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "card_hours": 0.0, "energy_cny": 0.0}


def _add(into: dict[str, Any], counts: tuple[Any, ...]) -> None:
    for name, value in zip(_COUNTERS, counts):
        into[name] += value
    into["total_tokens"] = into["prompt_tokens"] + into["completion_tokens"]


def for_tenant(db: sqlite_utils.Database, tenant: str, *, pending: Iterable[UsageRow] = ()) -> dict[str, Any]:
    """A tenant's usage::

        {"object": "usage", "tenant": ..., "totals": {requests, prompt_tokens, completion_tokens,
         total_tokens, card_hours, energy_cny},
         "models": {model: {<same counters>, "by_site": {site: {<same counters>}}}}}

    Args:
        pending: rows not yet flushed (``UsageBuffer.peek(tenant)``); rows of other tenants are ignored.
    """
    totals = _zero()
    models: dict[str, dict[str, Any]] = {}

    def fold(model: str, site: str, counts: tuple[Any, ...]) -> None:
        m = models.setdefault(model, {**_zero(), "by_site": {}})
        _add(totals, counts)
        _add(m, counts)
        _add(m["by_site"].setdefault(site, _zero()), counts)

    for row in db.execute(
        f"SELECT model, site, {', '.join(_COUNTERS)} FROM usage WHERE tenant = ? ORDER BY model, site", [tenant]
    ).fetchall():
        fold(row[0], row[1], tuple(row[2:]))
    for r in pending:
        if r.tenant == tenant:
            fold(r.model, r.site, (r.requests, r.prompt_tokens, r.completion_tokens, r.card_hours, r.energy_cny))
    return {"object": "usage", "tenant": tenant, "totals": totals, "models": models}
