"""The tests' one way to wait: poll a condition until it holds, or fail naming what was awaited.

Use it instead of fixed sleeps and hand-written loops::

    took_s = await until(lambda: hub.registry.get("hz-edge") is not None, 5, "hz-edge registered")

The condition may be a coroutine function too (an HTTP call, a JetStream read): each poll awaits it::

    await until(lambda: job_state(tenant, jid, "running"), 10, "job running")

Programs that block (no event loop: a ``cpn up`` subprocess driven with ``subprocess``) use
:func:`until_blocking`, the same loop with ``time.sleep``.

Where the thing awaited is time passing on the hub (loss detection, a grace period), do not wait
it out: run the hub on ``tests.support.manualclock.ManualClock`` and advance it.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable


async def until(cond: Callable[[], object | Awaitable[object]], timeout_s: float = 5.0, what: str = "condition", *,
                interval_s: float = 0.02, last: Callable[[], object] | None = None) -> float:
    """Poll ``cond`` every ``interval_s`` until it returns (or, for a coroutine, resolves to)
    something truthy. An exception from ``cond`` is the test's failure, not a retry. ``last``, if
    given, is called on a timeout and what it returns goes into the message (the last state seen,
    a log tail).

    Returns:
        the seconds it took (event-loop time), for tests that bound how fast something happens.

    Raises:
        AssertionError: naming ``what``, when ``cond`` did not hold within ``timeout_s``.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        held = cond()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return loop.time() - start
        if loop.time() - start > timeout_s:
            raise AssertionError(_timed_out(timeout_s, what, last))
        await asyncio.sleep(interval_s)


def until_blocking(cond: Callable[[], object], timeout_s: float = 5.0, what: str = "condition", *,
                   interval_s: float = 0.02, last: Callable[[], object] | None = None) -> float:
    """:func:`until` for code without an event loop: blocks the thread between polls."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(_timed_out(timeout_s, what, last))
        time.sleep(interval_s)
    return time.monotonic() - start


def _timed_out(timeout_s: float, what: str, last: Callable[[], object] | None) -> str:
    return f"timed out after {timeout_s:g} s waiting for {what}" + (f"; last: {last()}" if last is not None else "")
