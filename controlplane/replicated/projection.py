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
With ``hold=False`` it holds none (``get`` and ``items`` find nothing, ``len`` is 0): it follows
the revision and calls ``on_change``, for a caller that keeps its own copy (``RecordBridge``,
whose caller's copy is SQLite).
- Rule 6: a watch can stop delivering without a word (its consumer lives on one NATS node, held
  in memory: when that node dies or hangs, nothing comes, and a consumer made again while the
  cluster has not yet noticed the loss may be placed on the dead node). While the whole record is
  projected (``keys=">"``), a supervisor compares the projection's revision with the record's every
  ``check_s``: once the projection misses a write the record held a check ago (or any, while
  the watch has delivered nothing for ``stall_s``), it reads what it misses from the record
  itself (asked of the stream's leader, one message at a time: no consumer) and, if the watch
  delivered nothing for ``stall_s`` meanwhile, starts a new watch after its revision
  (in the background: a new watch that cannot be set up is tried again at the next check). After
  a check the record did not answer, the first check it answers reads what is missing at once. A
  check whose question has no answer within ``ASK_S`` pings the connection's server and, if that
  is silent too (a paused node keeps its sockets open), moves the connection to another server
  and asks again at once.
  So a projection is current within about ``2 * check_s`` of the record answering again. The
  supervisor never stops on an error: it logs it, counts it (``supervisor_errors``), checks again.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Iterator

from controlplane.replicated.errors import NoQuorum
from controlplane.replicated.kv import FENCE_CHECK_PREFIX, Change, Entry, Record, Watch
from controlplane.runtime import cancel_and_wait

_log = logging.getLogger("cpn.replicated")

CHECK_S = 0.5
"""How often the supervisor compares the projection's revision with the record's (Rule 6)."""
STALL_S = 1.0
"""How long a watch may deliver nothing while the projection misses writes before a new one starts."""
ASK_S = 0.25
"""A check whose question to the record has no answer after this pings the connection's server."""
PING_S = 0.25
"""A server that does not answer a ping within this is left for another of the pool."""


class Projection:
    """An in-memory projection of ``record`` (keys under ``keys``, ``>`` for all).

    Args:
        record: the record to watch.
        on_change: called with each :class:`Change` once applied.
        keys: a KV key pattern (``job.>``) to project only part of the record.
        check_s: how often to compare the record's last revision with ours (0: never); a write
            the record held a check ago and we miss is read from the record.
        stall_s: how long the watch may deliver nothing while we miss writes before it is restarted.
        hold: keep every key's value in memory for ``get`` and ``items`` (False: the caller keeps
            its own copy through ``on_change``; about 1.1 KB per key of the record saved).
    """

    def __init__(self, record: Record, *, on_change: Callable[[Change], None] | None = None,
                 keys: str = ">", check_s: float = CHECK_S, stall_s: float = STALL_S, hold: bool = True) -> None:
        self._record = record
        self._on_change = on_change
        self._keys = keys
        self._values: dict[str, Entry] = {}
        self._hold = hold
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
        """Watches started again after going silent (Rule 6)."""
        self.fills = 0
        """Checks that found the projection missing a write the record held a check earlier."""
        self.filled = 0
        """Changes read from the record by those checks rather than delivered by the watch."""
        self.supervisor_errors = 0
        self.reconnects = 0
        """Checks that found the connection's server silent and moved to another."""
        self._held = 0
        self._again = False
        self._watch_heard_at = 0.0
        self._restart: asyncio.Task[None] | None = None
        self._stopping = False

    def __repr__(self) -> str:
        return f"<Projection keys={len(self._values)} revision={self.revision} ready={self.ready.is_set()}>"

    async def start(self, timeout_s: float = 10.0) -> None:
        """Load the current state and follow later writes.

        Raises:
            NoQuorum: the watch could not be set up, or the initial state did not arrive in time.
        """
        self._stopping = False
        self._watch = await self._record.watch(self._keys)
        self._task = asyncio.create_task(self._run(self._watch), name="projection")
        try:
            async with asyncio.timeout(timeout_s):
                await self.ready.wait()
        except TimeoutError:
            await self.stop()
            raise NoQuorum(f"projection: initial state not loaded within {timeout_s:g} s") from None
        self._watch_heard_at = asyncio.get_running_loop().time()
        if self._keys == ">" and self.check_s > 0:
            self._supervisor = asyncio.create_task(self._supervise(), name="projection-supervisor")

    async def stop(self) -> None:
        """Stop checking and watching. A check whose cancellation a library swallowed (nats-py
        waits inside ``asyncio.wait_for``, which on Python 3.11 can) still ends: it is cancelled
        again, and starts no new watch once stopping."""
        self._stopping = True
        await cancel_and_wait([t for t in (self._supervisor, self._restart) if t is not None])
        self._supervisor = self._restart = None
        await self._stop_watch()

    async def _stop_watch(self) -> None:
        if self._watch is not None:
            await self._watch.stop()
        if self._task is not None:
            # not ``await task`` in a try: that would swallow a cancellation of our own caller too
            await cancel_and_wait([self._task])
        self._watch = None
        self._task = None

    async def _supervise(self) -> None:
        """Fill what a silent watch misses, and start a new watch (Rule 6); never stops on an error."""
        while not self._stopping:
            if not self._again:
                await asyncio.sleep(self.check_s)
            self._again = False
            try:
                await self._check()
            except Exception:
                self.supervisor_errors += 1
                _log.exception("projection_supervisor_error revision=%d", self.revision)

    async def _check(self) -> None:
        loop = asyncio.get_running_loop()
        asked = asyncio.ensure_future(self._record.last_revision())
        try:
            done, _ = await asyncio.wait({asked}, timeout=ASK_S)
            if not done and not await self._record.server_answers(PING_S):
                # our server hangs (a paused node keeps its sockets open; the connection's own pings
                # notice after seconds): go through another, as the lease does
                self.reconnects += 1
                _log.warning("projection_server_silent revision=%d: through another server", self.revision)
                await self._record.reconnect()
                self._again = True  # ask through the new server at once
                raise NoQuorum("our server does not answer")
            last = await asked
        except NoQuorum:
            self._held = sys.maxsize  # once the record answers again, fill whatever is missing at once
            return  # no stream leader now (or no server): nothing new can be read either
        finally:
            asked.cancel()
        held, self._held = self._held, last
        silent = loop.time() - self._watch_heard_at >= self.stall_s
        # missing a write the record held a check ago, or any while the watch says nothing
        behind = self.revision < min(held, last) or (silent and self.revision < last)
        if behind:
            await self._fill(last)
        if self._stopping:
            return
        if (self._watch is None or (behind and silent)) and (self._restart is None or self._restart.done()):
            self._restart = asyncio.create_task(self._restart_watch(last), name="projection-restart")

    async def _fill(self, last: int) -> None:
        """Apply the writes after our revision up to ``last``, read from the record (Rule 6)."""
        self.fills += 1
        try:
            changes = await self._record.changes_after(self.revision, last, self._keys)
        except NoQuorum as exc:
            _log.warning("projection_fill_failed revision=%d record_revision=%d error=%s", self.revision, last, exc)
            return
        for change in changes:
            self.apply(change)
        if changes:
            self.filled += len(changes)
            async with self._advanced:
                self._advanced.notify_all()
            _log.info("projection_filled changes=%d revision=%d record_revision=%d", len(changes), self.revision, last)

    async def _restart_watch(self, last: int) -> None:
        loop = asyncio.get_running_loop()
        self.restarts += 1
        _log.warning("projection_watch_restart revision=%d record_revision=%d", self.revision, last)
        await self._stop_watch()
        try:
            watch = await self._record.watch(self._keys, after=self.revision)
        except NoQuorum as exc:
            _log.warning("projection_watch_restart_failed revision=%d error=%s", self.revision, exc)
            return  # the next check fills again and tries again
        if self._stopping:  # stop() came while the watch was being set up
            await watch.stop()
            return
        self._watch = watch
        self._watch_heard_at = loop.time()
        self._task = asyncio.create_task(self._run(watch), name="projection")

    async def _run(self, watch: Watch) -> None:
        async for change in watch:
            self._watch_heard_at = asyncio.get_running_loop().time()
            if change is None:
                self.ready.set()
                continue
            self.apply(change)
            async with self._advanced:
                self._advanced.notify_all()

    def apply(self, change: Change) -> None:
        """Apply one change (revision order; an older revision than the last applied is ignored)."""
        if change.revision <= self.revision:
            return
        if change.key.startswith(FENCE_CHECK_PREFIX):  # a fenced commit's check: not state
            self.revision = change.revision
            return
        if self._hold:
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
