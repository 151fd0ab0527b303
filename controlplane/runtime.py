"""Running a long-lived asyncio program from a command: uvloop when available, clean stop on signals.

SIGINT and SIGTERM cancel the main task, so its ``finally`` blocks drain and close everything
(servers, agents, child processes) before the process exits with 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Coroutine, Iterable
from typing import Any

# The live clock is the agent's (the same shape as core/clock.py's Clock): one class serves both.
from edge_agent.clock import WallClock as WallClock

log = logging.getLogger("cpn.runtime")


class BackgroundTasks:
    """The background tasks of one owner (the hub, a service), kept in one place.

    Promises: a finished task is dropped at once (nothing accumulates) and its failure is logged and
    counted, never lost; :meth:`close` cancels every task still running and waits for them.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.failures = 0
        self._tasks: set[asyncio.Future[Any]] = set()

    def __repr__(self) -> str:
        return f"<BackgroundTasks {self.owner} running={len(self._tasks)} failures={self.failures}>"

    def __len__(self) -> int:
        return len(self._tasks)

    def names(self) -> list[str]:
        """The names of the tasks running now (``<owner>:<scope>:<name>``), sorted."""
        return sorted(t.get_name() if isinstance(t, asyncio.Task) else self.owner for t in self._tasks)

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Future[Any]:
        """Run ``coro`` in the background until it ends or :meth:`close` is called."""
        task = asyncio.ensure_future(coro)
        if isinstance(task, asyncio.Task):
            task.set_name(f"{self.owner}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.failures += 1
            name = task.get_name() if isinstance(task, asyncio.Task) else self.owner
            log.error("event=task_failed task=%s error=%r", name, task.exception())

    async def close(self) -> None:
        """Cancel the tasks still running and wait until they are done."""
        tasks = list(self._tasks)
        self._tasks.clear()
        await cancel_and_wait(tasks)

    def scope(self, name: str) -> TaskScope:
        """A part's view of these tasks: what it spawns is owned (and counted, and cancelled at
        :meth:`close`) here; the part can still cancel its own at its stop."""
        return TaskScope(self, name)


class TaskScope:
    """The tasks one part (a service, the bus, an outbox) runs in its process's :class:`BackgroundTasks`.

    The process's owner holds every task (one place to see and cancel them); the scope remembers
    which are this part's, so the part can stop its own work before the parts it uses go away.
    Finished tasks are dropped from both at once.
    """

    def __init__(self, owner: BackgroundTasks, name: str) -> None:
        self.owner = owner
        self.name = name
        self._mine: set[asyncio.Future[Any]] = set()

    def __repr__(self) -> str:
        return f"<TaskScope {self.owner.owner}:{self.name} running={len(self._mine)}>"

    def __len__(self) -> int:
        return len(self._mine)

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Future[Any]:
        """Run ``coro`` in the owner's tasks, named ``<owner>:<scope>:<name>``."""
        task = self.owner.spawn(coro, f"{self.name}:{name}")
        self._mine.add(task)
        task.add_done_callback(self._mine.discard)
        return task

    async def close(self) -> None:
        """Cancel this part's tasks still running and wait until they are done."""
        tasks = list(self._mine)
        self._mine.clear()
        await cancel_and_wait(tasks)


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


async def end_child(proc: asyncio.subprocess.Process, *, patience_s: float = 10.0) -> None:
    """End a child that stops when its stdin closes: close it, wait ``patience_s``, then kill it."""
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        await asyncio.wait_for(proc.wait(), patience_s)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()


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
