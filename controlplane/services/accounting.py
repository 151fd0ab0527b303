"""Usage accounting of inference: served requests counted in memory, written to the record in batches.

Built with the record, the metrics, the clock and the process's task owner; its flush loop runs
every ``flush_s`` (and once more at stop), never per request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from controlplane.core.clock import Clock
from controlplane.core.usage import UsageBuffer, UsageRow
from controlplane.metrics import HubMetrics
from controlplane.runtime import TaskScope
from controlplane.store import usage as store_usage
from controlplane.store.db import transaction, write
from controlplane.store.handle import Store
from edge_agent import wire

log = logging.getLogger("cpn.accounting")

MIN_FLUSH_S = 0.1
"""Shortest pause between flushes (``usage_flush_s = 0`` means "as often as is sensible", not a spin)."""
FLUSH_CHUNK_ROWS = 250
"""Rows per flush transaction: each priced row is two rows of the replicated record (the market's
billed line and its ledger transaction) and the record takes at most 1000 per transaction."""


class UsageAccounts:
    """Counts served requests and flushes them to the record (see the module docstring)."""

    name = "accounting"

    def __init__(self, *, store: Store, metrics: HubMetrics, clock: Clock, tasks: TaskScope, flush_s: float) -> None:
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.tasks = tasks
        self.flush_s = max(flush_s, MIN_FLUSH_S)
        self.buffer = UsageBuffer()
        self.usage_listeners: list[Callable[[list[UsageRow], float], None]] = []
        """Called with each flush *inside* its transaction (the market prices it): one that raises
        rolls the flush back, and the rows wait for the next one."""

    def __repr__(self) -> str:
        return f"<UsageAccounts pending={len(self.buffer)}>"

    async def start(self) -> None:
        self.tasks.spawn(self._loop(), "usage-flush")

    async def stop(self) -> None:
        await self.tasks.close()
        self.flush()

    async def _loop(self) -> None:
        while True:
            await self.clock.sleep(self.flush_s)
            # a flush whose record does not answer would wait out its quorum and, failing, be tried
            # again a second later, for ever: the rows wait in the buffer until the record answers
            # again (then the next write finds the quorum)
            if len(self.buffer) and await self.store.record_answers():
                await self.flush_async()

    async def flush_async(self) -> None:
        """:meth:`flush`, each chunk committed awaited (``store.db.write``, unfenced: any gateway
        counts usage): on the replicated record the loop goes on while the record answers, through
        a stream election too (a blocking flush held every gateway's loop for the election)."""
        if not len(self.buffer) or not self.store.is_open:
            return
        rows = self.buffer.drain()
        for start in range(0, len(rows), FLUSH_CHUNK_ROWS):
            chunk = rows[start:start + FLUSH_CHUNK_ROWS]

            def commit(db: Any, chunk: list[UsageRow] = chunk) -> None:
                store_usage.add_rows(db, chunk)
                now = self.clock.time()
                for listener in self.usage_listeners:
                    listener(chunk, now)

            try:
                await write(self.store.db, commit, fenced=False)
            except Exception:
                self.buffer.restore(rows[start:])
                log.exception("event=usage_flush_failed rows=%d", len(rows) - start)
                return

    def account(self, req: wire.InferRequest, result: wire.InferResult, site: str) -> None:
        """Count a served request (flushed to the record in batches, never per request)."""
        self.buffer.add(req.tenant, req.model, site, result.prompt_tokens, result.completion_tokens)
        self.metrics.served(req.tenant, req.model, site, result.prompt_tokens, result.completion_tokens,
                            result.service_ms)

    def flush(self) -> None:
        """Write buffered usage in one transaction; on failure keep it for the next flush."""
        if not len(self.buffer) or not self.store.is_open:
            return
        rows = self.buffer.drain()
        for start in range(0, len(rows), FLUSH_CHUNK_ROWS):
            chunk = rows[start:start + FLUSH_CHUNK_ROWS]
            try:
                with transaction(self.store.db) as db:
                    store_usage.add_rows(db, chunk)
                    now = self.clock.time()
                    for listener in self.usage_listeners:
                        listener(chunk, now)
            except Exception:
                self.buffer.restore(rows[start:])
                log.exception("event=usage_flush_failed rows=%d", len(rows) - start)
                return

    def for_tenant(self, tenant: str) -> dict[str, Any]:
        """A tenant's usage: flushed rows plus what is still buffered."""
        return store_usage.for_tenant(self.store.db, tenant, pending=self.buffer.peek(tenant))
