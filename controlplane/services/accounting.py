"""Usage accounting of inference: served requests counted in memory, written to the record in batches.

Built with the record, the metrics, the clock and the process's task owner; its flush loop runs
every ``flush_s`` (and once more at stop), never per request.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from controlplane.core.clock import Clock
from controlplane.core.usage import UsageBuffer, UsageFlush, UsageRow
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

    def __init__(self, *, store: Store, metrics: HubMetrics, clock: Clock, tasks: TaskScope, flush_s: float,
                 process: str = "hub") -> None:
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.tasks = tasks
        self.flush_s = max(flush_s, MIN_FLUSH_S)
        self.process = process
        self.buffer = UsageBuffer()
        self.in_doubt: list[UsageFlush] = []
        """Flushes whose write failed, kept as they were (same id, same time) and written first
        next time: a write the record may have taken after all then bills nothing twice."""
        self._flushes = 0
        self.usage_listeners: list[Callable[[UsageFlush], None]] = []
        """Called with each flush *inside* its transaction (the market prices it): one that raises
        rolls the flush back, and the flush is written again, as it was, next time."""

    def __repr__(self) -> str:
        return f"<UsageAccounts pending={self.pending_rows}>"

    @property
    def pending_rows(self) -> int:
        """Rows not yet in the record: buffered, or in a flush to write again."""
        return len(self.buffer) + sum(len(f.rows) for f in self.in_doubt)

    def pending(self, tenant: str) -> list[UsageRow]:
        """``tenant``'s rows not yet in the record (a flush in doubt may have landed: until it is
        written again, its rows count here, not in the record's counters)."""
        return [r for f in self.in_doubt for r in f.rows if r.tenant == tenant] + self.buffer.peek(tenant)

    def _take(self) -> list[UsageFlush]:
        """The flushes to write now: those in doubt first, then the buffer drained into chunks."""
        flushes, self.in_doubt = self.in_doubt, []
        rows = self.buffer.drain()
        now = self.clock.time()
        for start in range(0, len(rows), FLUSH_CHUNK_ROWS):
            self._flushes += 1
            flushes.append(UsageFlush(id=f"{self.process}.{int(now * 1e6)}.{self._flushes}", at=now,
                                      rows=rows[start:start + FLUSH_CHUNK_ROWS]))
        return flushes

    def _commit(self, db: Any, flush: UsageFlush) -> None:
        store_usage.add_rows(db, flush.rows)
        for listener in self.usage_listeners:
            listener(flush)

    def _failed(self, left: list[UsageFlush]) -> None:
        self.in_doubt = left
        log.exception("event=usage_flush_failed flushes=%d rows=%d", len(left), sum(len(f.rows) for f in left))

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
            if self.pending_rows and await self.store.record_answers():
                await self.flush_async()

    async def flush_async(self) -> None:
        """:meth:`flush`, each chunk committed awaited (``store.db.write``, unfenced: any gateway
        counts usage): on the replicated record the loop goes on while the record answers, through
        a stream election too (a blocking flush held every gateway's loop for the election)."""
        if not self.pending_rows or not self.store.is_open:
            return
        flushes = self._take()
        for i, flush in enumerate(flushes):
            try:
                await write(self.store.db, functools.partial(self._commit, flush=flush), fenced=False)
            except Exception:
                self._failed(flushes[i:])
                return

    def account(self, req: wire.InferRequest, result: wire.InferResult, site: str) -> None:
        """Count a served request (flushed to the record in batches, never per request)."""
        self.buffer.add(req.tenant, req.model, site, result.prompt_tokens, result.completion_tokens)
        self.metrics.served(req.tenant, req.model, site, result.prompt_tokens, result.completion_tokens,
                            result.service_ms)

    def flush(self) -> None:
        """Write buffered usage, one transaction per chunk; a chunk that fails is kept, as it was,
        for the next flush (Rule 2 of ``core/usage.py``: nothing lost, nothing counted twice)."""
        if not self.pending_rows or not self.store.is_open:
            return
        flushes = self._take()
        for i, flush in enumerate(flushes):
            try:
                with transaction(self.store.db) as db:
                    self._commit(db, flush)
            except Exception:
                self._failed(flushes[i:])
                return

    def for_tenant(self, tenant: str) -> dict[str, Any]:
        """A tenant's usage: flushed rows plus what is still buffered."""
        return store_usage.for_tenant(self.store.db, tenant, pending=self.pending(tenant))
