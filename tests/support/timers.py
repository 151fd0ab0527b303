"""Counting the timers an event loop arms: what the one-timer-per-wait tests assert on."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def timers_armed(*, module: str = "", owners: tuple[str, ...] = ()) -> Iterator[list[str]]:
    """The qualified names of the timers armed on the running loop meanwhile whose callback is
    defined in ``module`` or is a method of one of ``owners`` (``"Class."`` prefixes). asyncio's
    ``call_later`` goes through ``call_at``, so both are seen."""
    loop = asyncio.get_running_loop()
    armed: list[str] = []
    original = loop.call_at

    def counting(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        name = getattr(callback, "__qualname__", "?")
        if (module and getattr(callback, "__module__", "") == module) or (owners and name.startswith(owners)):
            armed.append(name)
        return original(when, callback, *args, **kwargs)

    loop.call_at = counting  # type: ignore[method-assign]
    try:
        yield armed
    finally:
        del loop.call_at
