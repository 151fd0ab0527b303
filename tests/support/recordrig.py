"""Hubs on the replicated record (a real 3-node cluster of :mod:`tests.support.natscluster`) and
the record's quorum taken away, for the tests of what a hub does while its writes wait.

- :func:`record_hub` starts a hub process with ``record = "nats"``; :func:`replica` is its record
  replica (the counters the tests read: ``in_flight``, ``write_fallbacks``, ``no_quorum``...).
- :func:`stream_leader` names the node leading the record's stream (the bucket is made if no hub
  has made it yet), the node whose pause starts an election.
- :func:`pausing` pauses (SIGSTOP) the nodes it is given (the stream's leader: an election; it and
  another: no quorum), and resumes every one still paused on the way out, whatever the test did.
- :func:`holds_for` checks a condition again and again for a span of time: what a test says does
  *not* happen while a write waits (nothing in SQLite, nothing sent).
- :class:`LoopWatch` (the longest gap between two 10 ms ticks of this loop) and :class:`Probes`
  (``GET /healthz`` every 50 ms, timed; judged by :func:`assert_answered`) show a held event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Self

import aiohttp
import nats.js.errors

from controlplane.compose import build_hub
from controlplane.hub import Hub
from controlplane.replicated import kv
from controlplane.store import db as store_db
from controlplane.store.replica import Replica
from tests.support.hubrig import hub_config
from tests.support.natscluster import NatsCluster
from tests.support.waiting import until


async def record_hub(tmp: Path, urls: str, name: str, **kw: Any) -> Hub:
    """A started hub ``name`` (its files in ``tmp/name``) whose record is the cluster at ``urls``
    (comma-separated); ``kw``: more hub settings. The caller stops it."""
    (tmp / name).mkdir(exist_ok=True)
    hub = build_hub(hub_config(tmp / name, urls, hub_id=name, record="nats", **kw))
    await hub.start()
    return hub


def replica(hub: Hub) -> Replica:
    hook = hub.db.write_hook
    assert isinstance(hook, Replica)
    return hook


async def stream_leader(cluster: NatsCluster) -> str:
    """The name of the node leading the record's stream (made if no hub has made it yet)."""
    record = await kv.Record.open(cluster.urls)
    try:
        leader: list[str] = []

        async def known() -> bool:  # a fresh stream is seen by every node (and has a leader) a moment later
            try:
                info = await record._js.stream_info(f"KV_{kv.BUCKET}")
            except nats.js.errors.APIError:
                return False
            if info.cluster is None or not info.cluster.leader:
                return False
            leader.append(str(info.cluster.leader))
            return True

        await until(known, 10, "the record's stream and its leader", interval_s=0.1)
        return leader[-1]
    finally:
        await record.close()


class Paused:
    """Nodes of a cluster paused by :func:`pausing`; :meth:`back` resumes every one still paused."""

    def __init__(self, cluster: NatsCluster, names: tuple[str, ...]) -> None:
        self.cluster = cluster
        self.names = names

    async def back(self) -> None:
        for name in self.names:
            if self.cluster.node(name).paused:
                await self.cluster.resume(name)


@contextlib.asynccontextmanager
async def pausing(cluster: NatsCluster, *names: str, db: Any = None) -> AsyncIterator[Paused]:
    """The nodes ``names`` paused for the block, each resumed on the way out if still paused (the
    block may resume some itself, or all with ``back()``: a quorum again). ``db``: a hub's database
    whose first read barrier without the quorum is taken first (it times out, awaited), so that
    what the block measures starts from a projection that knows it is behind."""
    paused = Paused(cluster, names)
    for name in names:
        await cluster.pause(name)
    try:
        if db is not None:
            await store_db.barrier(db)
        yield paused
    finally:
        await paused.back()


async def holds_for(seconds: float, check: Callable[[], object]) -> None:
    """Run ``check`` (it asserts) every 50 ms for ``seconds``: what must stay true while a write waits."""
    since = time.monotonic()
    while time.monotonic() - since < seconds:
        check()
        await asyncio.sleep(0.05)


class _Watching:
    """``with`` it: its ``_run`` goes on in a task of this loop for the block."""

    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


class LoopWatch(_Watching):
    """The longest gap between two 10 ms ticks of this event loop (a blocked loop shows here)."""

    def __init__(self) -> None:
        self.worst_s = 0.0

    async def _run(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.worst_s = max(self.worst_s, now - last)
            last = now


class Probes(_Watching):
    """``GET /healthz`` every 50 ms through real HTTP, timed: a held event loop answers late."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/healthz"
        self.times_s: list[float] = []

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                started = time.monotonic()
                async with session.get(self.url) as resp:
                    assert resp.status == 200
                    await resp.read()
                self.times_s.append(time.monotonic() - started)
                await asyncio.sleep(0.05)



def assert_answered(waited: list[float], what: str, *, median_s: float | None = 0.1) -> None:
    """Probes taken while a write waited (``list(probes.times_s)``): at least 10, none over 0.5 s (a
    held loop answers each after the whole wait, 2 s and more), their median under ``median_s``;
    the figures printed."""
    median = sorted(waited)[len(waited) // 2] if waited else 0.0
    print(f"/healthz while {what}: {len(waited)} probes, median {median * 1000:.1f} ms, "
          f"max {max(waited, default=0.0) * 1000:.1f} ms")
    assert len(waited) >= 10, waited
    assert max(waited) < 0.5, f"/healthz took {max(waited):.2f} s while {what}"
    if median_s is not None:
        assert median < median_s, waited
