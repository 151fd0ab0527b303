"""Running a long-lived asyncio program from a command: uvloop when available, clean stop on signals.

SIGINT and SIGTERM cancel the main task, so its ``finally`` blocks drain and close everything
(servers, agents, child processes) before the process exits with 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Coroutine, Iterable
from typing import Any


class WallClock:
    """The live :class:`~controlplane.core.clock.Clock`: the system's wall clock and asyncio's sleep."""

    def __repr__(self) -> str:
        return "<WallClock>"

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]], *, patience_s: float = 10.0) -> None:
    """Cancel ``tasks`` and wait until they are done.

    A single ``cancel()`` is not always enough: nats-py awaits inside ``asyncio.wait_for``, which on
    Python 3.11 can swallow a cancellation that lands at the wrong moment, and a task that swallowed
    it would hold a plain ``await task`` forever. So cancel again until each is done, for at most
    ``patience_s``; errors and results are consumed (shutdown paths log elsewhere).
    """
    pending = {t for t in tasks if not t.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience_s
    while pending and loop.time() < deadline:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.25)
    for t in tasks:
        if t.done() and not t.cancelled():
            with contextlib.suppress(BaseException):
                t.result()


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return asyncio.new_event_loop()


def run_until_signalled(main: Coroutine[Any, Any, None]) -> int:
    """Run ``main`` until it returns or SIGINT/SIGTERM arrives; return the exit code."""
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    task = loop.create_task(main)
    stopping = {"signal": None}

    def stop(signame: str) -> None:
        if stopping["signal"] is None:
            stopping["signal"] = signame  # type: ignore[assignment]
            task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop, sig.name)
    try:
        loop.run_until_complete(task)
        code = 0
    except asyncio.CancelledError:
        code = 0 if stopping["signal"] else 1
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        asyncio.set_event_loop(None)
    return code
