"""Running a long-lived asyncio program from a command: uvloop when available, clean stop on signals.

SIGINT and SIGTERM cancel the main task, so its ``finally`` blocks drain and close everything
(servers, agents, child processes) before the process exits with 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Coroutine
from typing import Any


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
