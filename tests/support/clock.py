"""A clock the test moves by hand: what the hub's services read instead of the wall clock.

It implements ``controlplane.core.clock.Clock``. Time stands still until :meth:`ManualClock.advance`;
``await clock.sleep(s)`` returns once the clock has been advanced ``s`` seconds past the call, so a
loop that sleeps on it (the hub's sweep) runs one round per advance that covers its period. Tests
that would otherwise wait out loss detection, a lease or a grace period in real seconds advance the
clock past it instead, and can also show that nothing happens just before it::

    clock = ManualClock()
    async with running_hub(config, clock=clock) as hub:
        clock.advance(grace_s - 0.1)   # not yet ...
        clock.advance(0.2)             # ... now
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time


class ManualClock:
    """Epoch and monotonic seconds that move only when told; ``start`` defaults to the wall clock
    now, so what the hub stores on this clock reads as plausible dates."""

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def __repr__(self) -> str:
        return f"<ManualClock now={self._now:.3f} sleepers={len(self._sleepers)}>"

    def time(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        wake = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._order), wake))
        await wake

    def advance(self, seconds: float) -> None:
        """Move the clock forward and wake every sleeper whose time has come (they run at the event
        loop's next turn: await something, e.g. ``until(...)``, to let them)."""
        if seconds < 0:
            raise ValueError("a clock does not go backwards")
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, wake = heapq.heappop(self._sleepers)
            if not wake.done():
                wake.set_result(None)
