"""A clock that moves only when a test says so: for parts built with an injected ``Clock``
(``controlplane.core.clock`` and ``edge_agent.clock`` have the same shape, so it serves both)."""

from __future__ import annotations

import asyncio
import heapq
import itertools


class ManualClock:
    """``time()``/``monotonic()`` stand still until :meth:`advance`; ``sleep(s)`` returns once the
    clock has been advanced ``s`` past the moment it was called."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start
        self.mono = 0.0
        self._order = itertools.count()
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []

    def __repr__(self) -> str:
        return f"<ManualClock now={self.now:.3f} sleepers={self.sleepers}>"

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.mono + seconds, next(self._order), fut))
        await fut

    @property
    def sleepers(self) -> int:
        """How many sleeps are waiting on this clock now."""
        return sum(1 for _, _, f in self._sleepers if not f.done())

    def advance(self, seconds: float) -> None:
        """Move the clock on and wake every sleep that is due."""
        self.now += seconds
        self.mono += seconds
        while self._sleepers and self._sleepers[0][0] <= self.mono:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)
