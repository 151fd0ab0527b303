"""The record seen from synchronous code: a thread of its own running the record and its projection.

The store's write transactions are synchronous (SQLite), and a transaction must not commit locally
before the record has its writes on a quorum. :class:`RecordBridge` gives such code blocking calls
into a :class:`~.kv.Record` and a :class:`~.projection.Projection` that live on their own event loop
in their own thread, with their own NATS connection:

- Rule 1: :meth:`commit` blocks the calling thread until the record answers (acknowledged by a
  quorum, or :class:`~.errors.Conflict` / :class:`~.errors.NoQuorum`). The caller's event loop
  stands still meanwhile, as it already does for SQLite's fsync: about 1-6 ms on loopback, up to
  ``write_deadline_s`` while the record's stream elects a new leader.
- Rule 2: every change the projection applies (other processes' writes and our own echoes, the
  initial state included) is queued for the caller; :meth:`take_changes` hands them over in
  revision order and ``wakeup`` (called from the bridge's thread) tells the caller's loop to come
  and take them.
- Rule 3: :meth:`catch_up` blocks until every write the record held when it was called has been
  queued (a read barrier: a write transaction that starts after it reads at least that state).
- Rule 4: :meth:`close` stops the watch, closes the connection and joins the thread.
- Rule 5 (no quorum: refuse at once, probe now and then): once a write ended in
  :class:`~.errors.NoQuorum`, later writes are refused at once (NoQuorum) except one probe every
  ``probe_every_s``, which waits at most ``probe_deadline_s``, doubled after every probe that
  failed, up to the write deadline (a path that works but is slower than the first probe's deadline,
  such as a super-cluster link just healed on a loaded host, is found again instead of refused for
  ever); :meth:`catch_up` does not wait
  meanwhile, except before a probe (so a retry after the quorum's return finds its own earlier
  write, which may have landed: NoQuorum means "unknown"). The first write that a quorum acknowledges (or that loses a compare-and-set, which
  also takes a quorum) ends this. So a process without quorum stalls its loop for at most
  ``probe_deadline_s`` per ``probe_every_s``, not a whole write deadline per write.
- Rule 7: once a read barrier got no answer in time (the stream's leader gone, an election under
  way), blocking :meth:`catch_up` calls return False at once (the caller reads what it has; a stale
  read is caught by the compare-and-set of what it writes) until a barrier probed in the bridge's
  own thread is answered: the local-only transactions of a process (its outbox, sites, job
  events) then stall its loop at most once per election, not ``catch_up_timeout_s`` each.
- Rule 6: :meth:`commit_async` and :meth:`catch_up_async` are the same calls for code on an event
  loop (``store/replica.py``'s :meth:`~controlplane.store.replica.Replica.write`): they await the
  answer instead of blocking, so the caller's loop goes on (reads, heartbeats, inference) while a
  write waits for its quorum, through a stream election too, and several writes are in flight.
- Rule 8: while a bridge runs, the process's GIL switch interval is at most ``switch_interval_s``
  (0.5 ms; Python's default is 5 ms). Every acknowledgement and every change of the record arrives
  in the bridge's thread, which must take the GIL from a busy event loop's thread to hand it over:
  with 5 ms each such hand-over of a loaded process can wait 5 ms, several per write (measured with
  `cpn bench submissions` at 16 clients: more submissions per second for the same CPU).
- Rule 9 (unfenced writes go from the caller's loop): :meth:`commit_async` without a leader fence
  (a submission, a tenant's or an operator's write, a gateway's usage) is published through a
  second connection that lives on the caller's own event loop (opened at its first such write),
  not through the bridge's thread: its acknowledgement is read where it is awaited, with no hop to
  the bridge's thread and none back (measured at 16 clients: those two hops took 2 ms and 4-6 ms
  of a submission's median, up to 10 and 20-33 ms at p90, waiting for the other thread's loop and
  the GIL). Same conditions, same deadline, same Rule 5. Fenced commits stay in the bridge's
  thread: one process's fenced commits go one at a time through one connection (kv's fence lock).
  A paused server of that connection is left as the bridge's own writes leave theirs: the write
  is sent again after each unanswered try, and the client's pings move the connection to another
  server within seconds, well within the write deadline (tested).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

from controlplane.replicated.errors import Conflict, NoQuorum
from controlplane.replicated.kv import BUCKET, WRITE_DEADLINE_S, Change, Fence, Record, Write
from controlplane.replicated.projection import Projection

T = TypeVar("T")
WRITER_OPEN_S = 2.0
"""How long the first unfenced write waits for the loop's own connection (Rule 9) before it goes
through the bridge's thread instead."""
WRITER_RETRY_S = 5.0
"""After the loop's connection could not be opened, writes go through the bridge's thread this long."""


class RecordBridge:
    """Blocking access to the record for synchronous code (see the module's rules).

    Args:
        servers: NATS URLs of the cluster holding the record.
        write_deadline_s: how long a write keeps trying before :class:`~.errors.NoQuorum`.
        catch_up_timeout_s: how long :meth:`catch_up` waits for the record's answer.
    """

    def __init__(self, servers: Sequence[str], *, bucket: str = BUCKET, write_deadline_s: float = WRITE_DEADLINE_S,
                 catch_up_timeout_s: float = 0.5, probe_every_s: float = 1.0, probe_deadline_s: float = 0.5,
                 name: str = "cpn-record", connect: Mapping[str, Any] | None = None,
                 switch_interval_s: float = 0.0005) -> None:
        self.servers = list(servers)
        self.switch_interval_s = switch_interval_s
        """The process's GIL switch interval at most, once the bridge's thread runs (Rule 8)."""
        self.connect = dict(connect or {})
        """More ``nats.connect`` options (the process's NATS identity and TLS context)."""
        self.bucket = bucket
        self.write_deadline_s = write_deadline_s
        self.catch_up_timeout_s = catch_up_timeout_s
        self.name = name
        self.wakeup: Callable[[], None] | None = None
        self.record: Record | None = None
        self.projection: Projection | None = None
        self._changes: collections.deque[Change] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.catch_up_failures = 0
        self.probe_every_s = probe_every_s
        self.probe_deadline_s = probe_deadline_s
        self._probe_s = probe_deadline_s
        """The next probe's deadline: ``probe_deadline_s``, doubled per failed probe up to the write deadline."""
        self.degraded_since: float | None = None
        """Monotonic time of the NoQuorum that started refusing writes (None: writes go through)."""
        self._next_probe_at = 0.0
        self.refused = 0
        self._next_barrier: asyncio.Future[bool] | None = None
        self._barriers_running = False
        self.barriers = 0
        self._barrier_failing = False
        self._probe: concurrent.futures.Future[None] | None = None
        self.catch_ups_skipped = 0
        """Blocking read barriers skipped while a failed one's probe waits for an answer (Rule 7)."""
        """Read barriers :meth:`catch_up_async` asked the record for (shared by the callers of one)."""
        self._writer: Record | None = None
        self._writer_opening: asyncio.Future[Record | None] | None = None
        self._writer_loop: asyncio.AbstractEventLoop | None = None
        self._writer_retry_at = 0.0
        self.loop_writes = 0
        """Commits sent through the caller's loop's own connection (Rule 9)."""

    fence: Fence | None = None
    """While this process leads, its leader fence (``services/leadership.py``): every commit then
    also checks that no newer leader has taken over, so a deposed leader's writes cannot land."""

    def __repr__(self) -> str:
        return f"<RecordBridge {self.bucket} {self.record!r} {self.projection!r} queued={len(self._changes)}>"

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the thread, open the record and load its current state into the queue.

        Raises:
            NoQuorum: the record could not be opened or its state not loaded in time.
        """
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name=f"{self.name}-bridge", daemon=True)
        sys.setswitchinterval(min(sys.getswitchinterval(), self.switch_interval_s))  # Rule 8
        self._thread.start()
        ready.wait()
        try:
            self._call(self._open(timeout_s), timeout_s + 5.0)
        except BaseException:
            self.close()
            raise

    async def _open(self, timeout_s: float) -> None:
        self.record = await Record.open(self.servers, bucket=self.bucket, write_deadline_s=self.write_deadline_s,
                                        name=self.name, connect=self.connect)
        self.projection = Projection(self.record, on_change=self._queue, hold=False)  # SQLite holds the values
        await self.projection.start(timeout_s=timeout_s)

    def close(self) -> None:
        """Stop watching, close the connections, end the thread (idempotent)."""
        self._close_writer()
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            try:
                self._call(self._close(), 10.0)
            except (NoQuorum, concurrent.futures.TimeoutError, RuntimeError):
                pass
            loop.call_soon_threadsafe(loop.stop)
        thread.join(10.0)
        self._loop = None
        self._thread = None

    async def _close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        if self.projection is not None:
            await self.projection.stop()
        if self.record is not None:
            await self.record.close()

    # ------------------------------------------------------------------ blocking calls

    def commit(self, writes: Sequence[Write]) -> list[int]:
        """Commit ``writes`` atomically (each with its own condition); their revisions, in order.

        Raises:
            Conflict: a condition did not hold; nothing was written.
            NoQuorum: no quorum acknowledged within the write deadline (outcome unknown).
        """
        record = self._need_record()
        now, deadline_s = self._admit()
        try:
            revisions = self._call(record.commit(writes, self.fence, deadline_s=deadline_s), deadline_s + 5.0)
        except (NoQuorum, Conflict) as exc:
            self._settled(exc, now)
            raise
        self._settled(None, now)
        return revisions

    async def commit_async(self, writes: Sequence[Write], *, fenced: bool = True) -> list[int]:
        """:meth:`commit` for a caller on an event loop (Rule 6): it awaits the record's answer, so
        its loop goes on meanwhile, and several such commits of one process are in flight at once.
        ``fenced=False``: no leader fence (a write a gateway makes for a tenant, not a decision).

        Raises:
            Conflict, NoQuorum: as :meth:`commit`.
        """
        record = self._need_record()
        now, deadline_s = self._admit()
        fence = self.fence if fenced else None
        writer = await self._loop_writer() if fence is None else None
        try:
            if writer is not None:  # Rule 9: no thread hop either way
                self.loop_writes += 1
                try:
                    async with asyncio.timeout(deadline_s + 5.0):
                        revisions = await writer.commit(writes, None, deadline_s=deadline_s)
                except TimeoutError:
                    raise NoQuorum(f"the record did not answer within {deadline_s + 5.0:g} s") from None
            else:
                revisions = await self._await(record.commit(writes, fence, deadline_s=deadline_s), deadline_s + 5.0)
        except (NoQuorum, Conflict) as exc:
            self._settled(exc, now)
            raise
        self._settled(None, now)
        return revisions

    async def _loop_writer(self) -> Record | None:
        """Rule 9: the connection of the caller's loop, opened at its first write; None (use the
        bridge's thread) while it cannot be opened, or for a caller on another loop."""
        loop = asyncio.get_running_loop()
        if self._writer is not None:
            return self._writer if self._writer_loop is loop else None
        if self._writer_loop is not None and self._writer_loop is not loop:
            return None
        if self._writer_opening is None:
            if time.monotonic() < self._writer_retry_at:
                return None
            self._writer_loop = loop
            self._writer_opening = loop.create_future()
            opening = self._writer_opening
            try:
                async with asyncio.timeout(WRITER_OPEN_S):
                    writer = await Record.open(
                        self.servers, bucket=self.bucket, write_deadline_s=self.write_deadline_s,
                        name=f"{self.name}-writes", create=False, connect=self.connect)
            except Exception:  # noqa: BLE001 (no server now: the bridge's connection writes meanwhile)
                writer = None
                self._writer_loop = None
                self._writer_retry_at = time.monotonic() + WRITER_RETRY_S
            self._writer, self._writer_opening = writer, None
            opening.set_result(writer)
            return writer
        return await asyncio.shield(self._writer_opening)

    def _close_writer(self) -> None:
        writer, loop = self._writer, self._writer_loop
        self._writer = self._writer_loop = None
        if writer is None or loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            loop.create_task(writer.close(), name="record-writer-close")  # close() is called from sync code
        elif loop.is_running():  # another thread's loop
            asyncio.run_coroutine_threadsafe(writer.close(), loop)
        else:
            loop.run_until_complete(writer.close())

    def _admit(self) -> tuple[float, float]:
        """Rule 5: (now, this write's deadline); raises NoQuorum at once while writes are refused."""
        now = time.monotonic()
        if self.degraded_since is None:
            return now, self.write_deadline_s
        if now < self._next_probe_at:
            self.refused += 1
            raise NoQuorum(f"no quorum for {now - self.degraded_since:.1f} s (the last write was not acknowledged); "
                           f"next try in {self._next_probe_at - now:.2f} s")
        return now, self._probe_s

    def _settled(self, error: BaseException | None, started: float) -> None:
        if isinstance(error, NoQuorum):
            if self.degraded_since is None:
                self.degraded_since = started
            else:  # a probe failed: the next one waits longer
                self._probe_s = min(self._probe_s * 2.0, max(self.write_deadline_s, self.probe_deadline_s))
            self._next_probe_at = time.monotonic() + self.probe_every_s
            return
        self.degraded_since = None  # acknowledged, or a compare-and-set was decided: a quorum answers
        self._probe_s = self.probe_deadline_s

    def catch_up(self) -> bool:
        """Block until every write the record holds now is queued; False if the record did not
        answer within ``catch_up_timeout_s``, or writes are being refused (the caller then reads
        what it has)."""
        if self.degraded_since is not None and time.monotonic() < self._next_probe_at:
            return False
        if self._barrier_failing:
            self.catch_ups_skipped += 1  # Rule 7: the probe in the background says when to wait again
            return False
        try:
            self._call(self._catch_up(), self.catch_up_timeout_s + 1.0)
        except (NoQuorum, TimeoutError, concurrent.futures.TimeoutError):
            self.catch_up_failures += 1
            self._barrier_failed()
            return False
        return True

    def _barrier_failed(self) -> None:
        """Rule 7: blocking barriers are skipped from now on until one, probed in the bridge's own
        thread, gets its answer."""
        if self._barrier_failing:
            return
        self._barrier_failing = True
        loop = self._loop
        if loop is None or not loop.is_running():
            self._barrier_failing = False
            return
        self._probe = asyncio.run_coroutine_threadsafe(self._probe_barrier(), loop)

    async def _probe_barrier(self) -> None:
        try:
            while True:
                try:
                    await self._catch_up()
                    return
                except Exception:  # still no answer: again in a while
                    await asyncio.sleep(self.probe_every_s / 4)
        finally:
            self._barrier_failing = False

    async def catch_up_async(self) -> bool:
        """:meth:`catch_up` for a caller on an event loop: its loop goes on while it waits. Callers
        that come while a barrier is under way share the next one (it starts after they came, so it
        covers every write the record held when they called): one request per round trip, not one
        per caller."""
        if self.degraded_since is not None and time.monotonic() < self._next_probe_at:
            return False
        if self._next_barrier is None:
            self._next_barrier = asyncio.get_running_loop().create_future()
            if not self._barriers_running:
                self._barriers_running = True
                asyncio.get_running_loop().create_task(self._run_barriers())
        return await asyncio.shield(self._next_barrier)

    async def _run_barriers(self) -> None:
        try:
            while self._next_barrier is not None:
                waiting, self._next_barrier = self._next_barrier, None
                try:
                    await self._await(self._catch_up(), self.catch_up_timeout_s + 1.0)
                    ok = True
                except Exception:  # no quorum, no answer in time: the callers read what they have
                    self.catch_up_failures += 1
                    self._barrier_failed()
                    ok = False
                self.barriers += 1
                waiting.set_result(ok)
        finally:
            self._barriers_running = False

    async def _catch_up(self) -> None:
        record, projection = self._need_record(), self.projection
        assert projection is not None
        async with asyncio.timeout(self.catch_up_timeout_s):
            last = await record.last_revision()
            await projection.wait_for(last, timeout_s=self.catch_up_timeout_s)

    def take_changes(self) -> list[Change]:
        """The queued changes, oldest first (and the queue emptied)."""
        out = []
        while self._changes:
            out.append(self._changes.popleft())
        return out

    def requeue(self, changes: list[Change]) -> None:
        """Put ``changes`` (taken, not applied) back at the head of the queue, in order."""
        self._changes.extendleft(reversed(changes))

    @property
    def writes(self) -> int:
        """Commits a quorum acknowledged, through the bridge's connection or the loop's (Rule 9)."""
        return sum(r.writes for r in (self.record, self._writer) if r is not None)

    @property
    def revision(self) -> int:
        """The last revision the projection applied (queued for the caller)."""
        return self.projection.revision if self.projection is not None else 0

    # ------------------------------------------------------------------ inside the bridge's thread

    def _queue(self, change: Change) -> None:
        self._changes.append(change)
        if self.wakeup is not None:
            self.wakeup()

    def _need_record(self) -> Record:
        if self.record is None:
            raise NoQuorum("the record is not open")
        return self.record

    async def _await(self, coro: Coroutine[Any, Any, T], timeout_s: float) -> T:
        loop = self._loop
        if loop is None or not loop.is_running():
            coro.close()
            raise NoQuorum("the record's thread is not running")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.wrap_future(future)
        except TimeoutError:
            future.cancel()
            raise NoQuorum(f"the record did not answer within {timeout_s:g} s") from None

    def _call(self, coro: Coroutine[Any, Any, T], timeout_s: float) -> T:
        loop = self._loop
        if loop is None or not loop.is_running():
            coro.close()
            raise NoQuorum("the record's thread is not running")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise NoQuorum(f"the record did not answer within {timeout_s:g} s") from None
