"""Time as a port: what the hub's services may ask of a clock, and nothing else.

The core takes ``now`` as an argument; the services read it from the :class:`Clock` they are
handed: the wall clock live (``runtime.WallClock``), a simulated clock in ``cpn sim`` and in tests.
No service reads ``time.time()`` itself.
"""

from __future__ import annotations

from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Epoch seconds (what the core's ``now`` arguments are)."""
        ...

    def monotonic(self) -> float:
        """Seconds that never go backwards (durations, rate buckets)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""
        ...
