"""The tests' one way to wait: poll a condition until it holds, or fail naming what was awaited.

Use it instead of fixed sleeps and hand-written loops::

    took_s = await until(lambda: hub.registry.get("hz-edge") is not None, 5, "hz-edge registered")
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(cond: Callable[[], object], timeout_s: float = 5.0, what: str = "condition", *,
                interval_s: float = 0.02) -> float:
    """Poll ``cond`` every ``interval_s`` until it returns something truthy.

    Returns:
        the seconds it took (event-loop time), for tests that bound how fast something happens.

    Raises:
        AssertionError: naming ``what``, when ``cond`` did not hold within ``timeout_s``.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not cond():
        if loop.time() - start > timeout_s:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(interval_s)
    return loop.time() - start
