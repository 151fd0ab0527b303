"""A local read model of the record, kept current by watching it.

What it promises:

- Rule 1: ``start()`` returns once the projection holds the record as it was when the watch
  began (rebuilt from the record, never from a local file), and keeps applying every later write
  in revision order.
- Rule 2: ``revision`` is the last revision applied; ``await wait_for(r)`` returns once every write
  up to ``r`` is applied, so a process that wrote at revision ``r`` then reads its own write.
- Rule 3: reads (``get``, ``items``) never touch the network: with NATS down they answer from the
  last state seen (say how stale with ``revision``).
- Rule 4: the record's own fence checks (``sys.fenced.*``, one per fenced commit, expiring) are
  not held: they only advance ``revision``.
- Rule 5: ``on_change`` is called for every applied change, initial state included (the next
  session's SQLite projection plugs in here); an exception in it is counted, never stops the watch.

It holds values as bytes; decoding into entity types is the caller's (``msgspec`` decoders).
- Rule 6: a watch can stop delivering without a word (nats-py's ordered consumer does not always
  come back when the node holding it dies): while the whole record is projected (``keys=">"``),
  the projection compares its revision with the record's every ``check_s`` and, if the record
  stays ahead for ``stall_s``, starts a new watch; its snapshot (every key's last value, deletes
  as markers) brings the projection up to date.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator

from controlplane.replicated.errors import NoQuorum
from controlplane.replicated.kv import FENCE_CHECK_PREFIX, Change, Entry, Record, Watch

_log = logging.getLogger("cpn.replicated")


class Projection:
    """An in-memory projection of ``record`` (keys under ``keys``, ``>`` for all).

    Args:
        record: the record to watch.
        on_change: called with each :class:`Change` once applied.
        keys: a KV key pattern (``job.>``) to project only part of the record.
        check_s: how often to compare the record's last revision with ours (0: never).
        stall_s: how long the record may stay ahead of us before the watch is restarted.
    """

    def __init__(self, record: Record, *, on_change: Callable[[Change], None] | None = None,
                 keys: str = ">", check_s: float = 1.0, stall_s: float = 2.0) -> None:
        self._record = record
        self._on_change = on_change
        self._keys = keys
        self._values: dict[str, Entry] = {}
        self.revision = 0
        self.callback_errors = 0
        self.ready = asyncio.Event()
        self._advanced = asyncio.Condition()
        self._watch: Watch | None = None
        self._task: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self.check_s = check_s
        self.stall_s = stall_s
        self.restarts = 0
        self._floor = 0
        self._advanced_at = 0.0

    def __repr__(self) -> str:
        return f"<Projection keys={len(self._values)} revision={self.revision} ready={self.ready.is_set()}>"

    async def start(self, timeout_s: float = 10.0) -> None:
        """Load the current state and follow later writes.

        Raises:
            NoQuorum: the watch could not be set up, or the initial state did not arrive in time.
        """
        self._watch = await self._record.watch(self._keys)
        self._task = asyncio.create_task(self._run(self._watch), name="projection")
        try:
            async with asyncio.timeout(timeout_s):
                await self.ready.wait()
        except TimeoutError:
            await self.stop()
            raise NoQuorum(f"projection: initial state not loaded within {timeout_s:g} s") from None
        self._advanced_at = asyncio.get_running_loop().time()
        if self._keys == ">" and self.check_s > 0:
            self._supervisor = asyncio.create_task(self._supervise(), name="projection-supervisor")

    async def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            try:
                await self._supervisor
            except (asyncio.CancelledError, Exception):
                pass
            self._supervisor = None
        await self._stop_watch()

    async def _stop_watch(self) -> None:
        if self._watch is not None:
            await self._watch.stop()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self._watch = None
        self._task = None

    async def _supervise(self) -> None:
        """Restart a watch that stopped delivering (Rule 6)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.check_s)
            try:
                last = await self._record.last_revision()
            except NoQuorum:
                continue  # no stream leader now: nothing new can have been written either
            if last <= max(self.revision, self._floor) or loop.time() - self._advanced_at < self.stall_s:
                continue
            self.restarts += 1
            _log.warning("projection_watch_restart revision=%d record_revision=%d", self.revision, last)
            await self._stop_watch()
            try:
                self._watch = await self._record.watch(self._keys)
            except NoQuorum:
                continue
            self._floor = last  # the new watch's snapshot covers every write up to here
            self._advanced_at = loop.time()
            self._task = asyncio.create_task(self._run(self._watch), name="projection")

    async def _run(self, watch: Watch) -> None:
        async for change in watch:
            if change is None:
                self.ready.set()
                continue
            self.apply(change)
            self._advanced_at = asyncio.get_running_loop().time()
            async with self._advanced:
                self._advanced.notify_all()

    def apply(self, change: Change) -> None:
        """Apply one change (revision order; an older revision than the last applied is ignored)."""
        if change.revision <= self.revision:
            return
        if change.key.startswith(FENCE_CHECK_PREFIX):  # a fenced commit's check: not state
            self.revision = change.revision
            return
        if change.value is None:
            self._values.pop(change.key, None)
        else:
            self._values[change.key] = Entry(change.key, change.value, change.revision)
        self.revision = change.revision
        if self._on_change is not None:
            try:
                self._on_change(change)
            except Exception:
                self.callback_errors += 1
                _log.exception("projection_callback_failed key=%s revision=%d", change.key, change.revision)

    async def wait_for(self, revision: int, timeout_s: float = 5.0) -> None:
        """Return once the projection has applied ``revision``.

        Raises:
            TimeoutError: not within ``timeout_s``.
        """
        if self.revision >= revision:
            return
        async with asyncio.timeout(timeout_s):
            async with self._advanced:
                await self._advanced.wait_for(lambda: self.revision >= revision)

    def get(self, key: str) -> Entry | None:
        return self._values.get(key)

    def items(self, prefix: str = "") -> Iterator[Entry]:
        """Entries whose key starts with ``prefix``, in no particular order."""
        return (e for k, e in list(self._values.items()) if k.startswith(prefix))

    def __len__(self) -> int:
        return len(self._values)
