"""Time as a port for the agent: what its parts may ask of a clock, and the live one.

The agent never imports ``controlplane``, so it has its own protocol here; it is the same shape as
the hub's (``time``, ``monotonic``, ``sleep``), so one clock object serves both in a process that
runs a hub and its agents (``cpn up``, the tests). This module is the only one of the agent that
reads the system's clock.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Epoch seconds (what event timestamps carry)."""
        ...

    def monotonic(self) -> float:
        """Seconds that never go backwards (durations, deadlines)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""
        ...


class WallClock:
    """The live clock: the system's wall clock and asyncio's sleep.

    ``time`` and ``monotonic`` are the system's own functions, not methods calling them: a request
    reads the clock about ten times on the hub, and a Python call each was measurable."""

    def __repr__(self) -> str:
        return "<WallClock>"

    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


WALL = WallClock()
"""The live clock, for defaults (a part built without a clock runs on this one)."""


async def wait_or_sleep(clock: Clock, event: asyncio.Event, delay_s: float) -> bool:
    """Wait until ``event`` is set or ``delay_s`` of ``clock``'s time passed; True if the event won.

    Both waits are cancelled and awaited before this returns (also when the caller is cancelled),
    so nothing is left pending.
    """
    if event.is_set():
        return True
    sleeper = asyncio.ensure_future(clock.sleep(delay_s))
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait((sleeper, waiter), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (sleeper, waiter):
            t.cancel()
        await asyncio.gather(sleeper, waiter, return_exceptions=True)
    return event.is_set()
