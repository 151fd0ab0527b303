"""runtime.BackgroundTasks: the one owner of a process part's background work."""

from __future__ import annotations

import asyncio
import logging

import pytest

from controlplane.runtime import BackgroundTasks
from tests.support.waiting import until


async def test_finished_tasks_are_dropped_and_failures_counted(caplog: pytest.LogCaptureFixture) -> None:
    tasks = BackgroundTasks("hub")

    async def fail() -> None:
        raise RuntimeError("boom")

    for i in range(50):
        tasks.spawn(asyncio.sleep(0), name=f"quick-{i}")
    tasks.spawn(fail(), name="failing")
    with caplog.at_level(logging.ERROR, logger="cpn.runtime"):
        await until(lambda: len(tasks) == 0, 2, "every task done and dropped")
    assert tasks.failures == 1
    assert "task=hub:failing" in caplog.text and "boom" in caplog.text
    assert repr(tasks) == "<BackgroundTasks hub running=0 failures=1>"


async def test_close_cancels_what_still_runs() -> None:
    tasks = BackgroundTasks("training")
    forever = tasks.spawn(asyncio.Event().wait(), name="loop")
    assert len(tasks) == 1
    await tasks.close()
    assert forever.cancelled() and len(tasks) == 0 and tasks.failures == 0
