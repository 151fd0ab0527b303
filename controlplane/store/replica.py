"""SQLite as the local projection of the replicated record (``HubConfig.record = "nats"``).

The services keep their store code: every write still runs in :func:`controlplane.store.db.transaction`.
With a replica attached to the database, that transaction gains the record's guarantees:

- Rule 1 (capture): TEMP triggers on the replicated tables (:data:`TABLES`) hand every row a
  transaction inserts, updates or deletes to the replica. A write to one of them outside a
  ``transaction()`` is refused (it could not be published before it commits).
- Rule 2 (publish before commit): when the transaction's body is done, its rows go to the record as
  one atomic batch, each row's key conditioned on the revision this process last saw of it (0: must
  not exist). Only once a quorum has acknowledged does SQLite commit. A lost condition rolls back and
  raises :class:`~controlplane.core.errors.RecordConflict` (409); no quorum rolls back and raises
  :class:`~controlplane.core.errors.RecordUnavailable` (503, the outcome unknown: retry with the
  same idempotency key).
- Rule 3 (read barrier): before a write transaction begins, the replica waits (briefly) until every
  write the record held at that moment is applied locally, so read-modify-write transactions read
  the record's current state and a retry at another process finds the first answer.
- Rule 4 (projection): other processes' writes are applied to SQLite as they arrive (on the
  caller's event loop, never inside one of its transactions), keeping each key's revision;
  listeners hear of each applied row (the hub drops cached keys and tenants); at most
  ``APPLY_SLICE`` changes per transaction, the rest in the loop's next turns. These commits are
  not fsynced (``synchronous=NORMAL``: consistent, not durable): the record holds them and the
  next start rebuilds them from it.
- Rule 5 (usage adds up): usage counters are never read-modify-written on one shared key. Each
  process publishes its own cumulative counters under ``usage.<process>.<tenant>.<model>.<site>``;
  the local ``usage`` row is the sum over every process's counters. They are published just after
  the local commit, as absolute values: a send left unanswered (no quorum) is sent again with the
  next write, and counts nothing twice if the first one landed after all. They are also kept in
  the local table ``record_usage_own``, committed (fsynced) with the usage they count: a process
  that dies before the record acknowledged them publishes them on its next start (Rule 6). (The
  usage still in the accounting's one-second buffer is lost with the process, as on SQLite.)
- Rule 6 (start): a process with an empty record seeds it from its SQLite file (an existing hub
  moving to the replicated record); otherwise the replicated tables are emptied and rebuilt from
  the record (SQLite is a projection, never the source).
- Rule 7 (pipelined writes, :meth:`Replica.write` through ``store.db.write``): a write whose rows
  are all replicated runs, is captured and is rolled back at once; its batch is then *awaited*
  (the loop goes on, other writes of this process are in flight with it) and applied to SQLite
  once acknowledged. A write touching a key already in flight waits for that batch and runs
  again; a lost condition fails that write alone. Nothing unacknowledged is ever in SQLite.
  Concurrent callers share one read barrier (``RecordBridge.catch_up_async``).
- Rule 8 (optimistic writes, ``store.db.write(..., optimistic=True)``): a write whose ``fn`` reads
  only rows it also writes (a job submission: its idempotency key, its new job) skips the read
  barrier: any stale read of those rows makes its compare-and-set fail, and then it takes the
  barrier and runs again (once); a retry at a process that has not yet seen the first answer
  therefore still replays it. It saves a JetStream request and two thread hops per submission.
  Lost again after a barrier that did not answer (no quorum, a projection still behind after a
  node's loss), it is ``RecordUnavailable`` (503, retry with the same key), not a 409: what holds
  the key is unknown here, most likely this very submission's first try at another process.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

import msgspec
import sqlite_utils

from controlplane.core.errors import RecordConflict, RecordFenced, RecordNoQuorum, RecordUnavailable
from controlplane.replicated.errors import Conflict, Fenced, NoQuorum, RecordError
from controlplane.replicated.kv import MAX_BATCH, Change, Write
from controlplane.store.db import open_db
from controlplane.store.jobs import HUB_EVENT_SITE

_log = logging.getLogger("cpn.store.replica")
T = TypeVar("T")

TABLES: dict[str, tuple[str, tuple[str, ...]]] = {
    # table: (record kind, primary key columns)
    "tenants": ("tenant", ("id",)),
    "api_keys": ("key", ("key_hash",)),
    "idempotency": ("idem", ("tenant", "key")),
    "jobs": ("job", ("id",)),
    "attempts": ("attempt", ("job_id", "attempt")),
    "deployments": ("deployment", ("id",)),
    "replicas": ("replica", ("deployment", "site")),
    "deployment_idempotency": ("deployidem", ("tenant", "key")),
    "usage": ("usage", ("tenant", "model", "site")),
    # the market (docs/market.md): its durable state, written by admin calls, quotes, the usage
    # flush (once a second per process, one batch) and attempt billing, never once per request
    "market_models": ("mmodel", ("id", "revision")),
    "market_offers": ("moffer", ("id",)),
    "market_budgets": ("mbudget", ("tenant",)),
    "market_tenants": ("mtenant", ("tenant",)),
    "market_quotes": ("mquote", ("id",)),
    "market_quote_specs": ("mquotespec", ("quote_id",)),
    "market_transactions": ("mtxn", ("key",)),  # its entries (market_entries) follow from its body
    "market_usage_lines": ("musage", ("flush", "tenant", "model", "site")),
    "market_attempt_lines": ("mattempt", ("job", "attempt")),
}
"""The tables held in the record. The others (sites, outbox, job events, the market's entries,
derived from their transactions) stay local."""

LOCAL_INSERTS: dict[str, tuple[str, ...]] = {
    # table: the columns a replayed insert leaves to SQLite (a fresh autoincrement id)
    "outbox": ("id",),
    "job_events": (),
}
"""Local-only tables whose *inserts* a pipelined write (Rule 7) carries: captured with the batch,
applied locally after its quorum ack, in the transaction that applies the batch. An update or
delete of a local row still commits the blocking way."""
APPLY_SLICE = 50
"""At most this many of the watch's changes are applied in one local transaction between the
loop's other work; the rest in the next turns of the loop. A leader's batch of waits (up to 200
jobs' reasons) applied at once held every process's loop for 5-15 ms (~50-70 µs a row) just as
its requests waited; a write transaction still applies everything queued first (Rule 3)."""
DERIVED = ("market_entries",)
"""Local tables whose rows triggers derive from a replicated row (``market_transactions``): the
batch's apply derives them again, so a pipelined write needs to carry nothing for them."""
LOCAL_KEY = "\x00local"
"""Rule 7's in-flight mark for writes carrying local rows: they go one at a time (as fenced
commits do anyway), so each one's local rows are in SQLite before the next one reads them."""

USAGE_COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "card_hours", "energy_cny")
PROBE_PREFIX = "sys.probe."
"""A process's probe of a record without quorum (:meth:`Replica.answers`): its value means nothing."""
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Bridge(Protocol):
    """What the replica needs of :class:`controlplane.replicated.bridge.RecordBridge`."""

    wakeup: Callable[[], None] | None

    def commit(self, writes: Sequence[Write]) -> list[int]: ...

    async def commit_async(self, writes: Sequence[Write], *, fenced: bool = ...) -> list[int]: ...

    async def catch_up_async(self) -> bool: ...

    def start(self, timeout_s: float = ...) -> None: ...

    def catch_up(self) -> bool: ...

    def take_changes(self) -> list[Change]: ...

    def requeue(self, changes: list[Change]) -> None: ...

    def close(self) -> None: ...


RowListener = Callable[[str, dict[str, Any]], None]
"""Called with (table, row) for each row applied from the record (a deleted row: its key columns)."""


def key_token(value: object) -> str:
    """One KV key token for a key column's value: itself when it is a plain token, else a digest."""
    text = str(value)
    if _TOKEN.fullmatch(text):
        return text
    return "=" + hashlib.sha256(text.encode()).hexdigest()[:40]


def record_key(table: str, pk: Sequence[object], process: str | None = None) -> str:
    kind = TABLES[table][0]
    parts = ([key_token(process)] if process is not None else []) + [key_token(v) for v in pk]
    return ".".join([kind, *parts])


class Value(msgspec.Struct, frozen=True, omit_defaults=True):
    """A record value: one row of ``t`` (``row``), or its tombstone (``deleted``, ``row`` = key columns).
    Usage values carry the writing process (``proc``) and hold its own cumulative counters."""

    t: str
    row: dict[str, Any]
    deleted: bool = False
    proc: str = ""


_ENCODE = msgspec.json.Encoder().encode
_DECODE = msgspec.json.Decoder(Value).decode


class _ForeignKeyOrder(Exception):
    """An apply with foreign keys on met a child before its parent (or a parent deleted before its children)."""


class ReplicatedDatabase(sqlite_utils.Database):
    """A database whose write transactions go through its ``write_hook`` (see :func:`attach`)."""

    write_hook: Replica | None = None


class Replica:
    """The write hook and projection applier of one database (make it with :func:`attach`)."""

    def __init__(self, db: ReplicatedDatabase, bridge: Bridge, process: str, *,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.db = db
        self.bridge = bridge
        self.process = process
        self.listeners: list[RowListener] = []
        self.revisions: dict[str, int] = {}
        self.usage: dict[tuple[str, str, str, str], list[float]] = {}
        """(process, tenant, model, site) -> that process's cumulative counters."""
        self._columns: dict[str, list[str]] = {}
        self._local_columns: dict[str, list[str]] = {}
        self._upserts: dict[tuple[str, tuple[str, ...]], tuple[str, tuple[str, ...]]] = {}
        """(table, the row's columns) -> the apply's upsert statement and its columns, made once."""
        self._local: list[tuple[str, dict[str, Any]]] | None = None
        """While :meth:`write` runs its ``fn``: the local-only rows it inserted (Rule 7)."""
        self._pending: dict[str, tuple[str, dict[str, Any], bool]] = {}
        self._usage_delta: dict[tuple[str, str, str], list[float]] = {}
        self._committed: list[tuple[str, int]] = []
        self._committed_usage: dict[tuple[str, str, str], list[float]] = {}
        self.usage_unpublished: set[tuple[str, str, str]] = set()
        """This process's counters committed locally but not yet acknowledged by the record."""
        self.usage_publish_failures = 0
        self._usage_task: asyncio.Task[None] | None = None
        self._applying = False
        self._loop = loop
        self._wake_scheduled = False
        self.published = 0
        self.applied = 0
        self.apply_errors = 0
        self.apply_slices = 0
        """Applies of the watch's changes cut short at :data:`APPLY_SLICE`, the rest left for later."""
        self.conflicts = 0
        self.no_quorum = 0
        self.publish_ms: list[float] = []
        self._captures = 0
        self._fresh = False
        self._has_own_usage = False
        self.pipelined = True
        """False: :meth:`write` is not used (``store.db.write`` commits the blocking way)."""
        self._inflight: dict[str, asyncio.Future[None]] = {}
        """Rule 7: the keys of this process's writes awaiting the record, with their batch's end."""
        self.in_flight = 0
        self.in_flight_peak = 0
        """The most :meth:`write` batches that were awaiting the record at once."""
        self.write_waits = 0
        """:meth:`write` runs that found a key they write already in flight and ran again after it."""
        self.write_fallbacks = 0
        """:meth:`write` runs that changed local-only rows other than inserts (or usage), committed as a
        ``transaction()``."""
        self.local_replayed = 0
        """Local-only rows (outbox entries, job events) applied after their batch's quorum ack."""
        self.unchecked_applies = 0
        """Applies that broke a foreign key (a snapshot's order) and ran again with them off."""
        self.barriers_skipped = 0
        """:meth:`write` runs with ``optimistic`` that asked the record for no read barrier (Rule 8)."""
        self.optimistic_retries = 0
        """Optimistic :meth:`write` runs whose compare-and-set was lost and that ran again after a barrier."""
        self.unread_conflicts = 0
        """Optimistic :meth:`write` runs lost again after a read barrier that did not answer: 503, not 409."""

    def __repr__(self) -> str:
        return (f"<Replica {self.process} keys={len(self.revisions)} published={self.published} applied={self.applied} "
                f"conflicts={self.conflicts} no_quorum={self.no_quorum} bridge={self.bridge!r}>")

    # ------------------------------------------------------------------ setup

    def install(self) -> None:
        """Register the capture function and the TEMP triggers (this connection only)."""
        conn = self.db.conn
        self._has_own_usage = bool(conn.execute("PRAGMA main.table_info(record_usage_own)").fetchall())
        conn.create_function("cpn_row", -1, self._captured)
        for table, (_, pk) in TABLES.items():
            cols = [r[1] for r in conn.execute(f"PRAGMA main.table_info({table})")]
            if not cols:
                continue  # an older schema without this table
            self._columns[table] = cols
            new = ", ".join(f"NEW.{c}" for c in cols)
            old_pk = ", ".join(f"OLD.{c}" for c in pk)
            update_args = new
            if table == "usage":
                update_args += ", " + ", ".join(f"OLD.{c}" for c in USAGE_COUNTERS)
            for name, event, args in (("ins", "INSERT", f"'I', {new}"), ("upd", "UPDATE", f"'U', {update_args}"),
                                      ("del", "DELETE", f"'D', {old_pk}")):
                conn.execute(f"DROP TRIGGER IF EXISTS temp.cpn_rep_{table}_{name}")
                conn.execute(f"CREATE TEMP TRIGGER cpn_rep_{table}_{name} AFTER {event} ON main.{table} "
                             f"BEGIN SELECT cpn_row('{table}', {args}); END")
        conn.create_function("cpn_local", -1, self._captured_local)
        conn.create_function("cpn_derived", 0, self._captured_derived)
        for table in DERIVED:
            if conn.execute(f"PRAGMA main.table_info({table})").fetchall():
                conn.execute(f"DROP TRIGGER IF EXISTS temp.cpn_derived_{table}_ins")
                conn.execute(f"CREATE TEMP TRIGGER cpn_derived_{table}_ins AFTER INSERT ON main.{table} "
                             f"BEGIN SELECT cpn_derived(); END")
        for table in LOCAL_INSERTS:
            cols = [r[1] for r in conn.execute(f"PRAGMA main.table_info({table})")]
            if not cols:
                continue
            self._local_columns[table] = cols
            conn.execute(f"DROP TRIGGER IF EXISTS temp.cpn_local_{table}_ins")
            conn.execute(f"CREATE TEMP TRIGGER cpn_local_{table}_ins AFTER INSERT ON main.{table} "
                         f"BEGIN SELECT cpn_local('{table}', {', '.join(f'NEW.{c}' for c in cols)}); END")

    @contextmanager
    def uncaptured(self) -> Iterator[None]:
        """``db.derived``: what the body writes stays in this process's SQLite (nothing captured,
        nothing published): derived state, such as why a job waits."""
        self._applying = True
        try:
            yield
        finally:
            self._applying = False

    def _captured_derived(self) -> None:
        """Rule 7: a row a trigger derives from a replicated one (inserted again when the batch is applied)."""
        if not self._applying and self._local is not None:
            self._captures += 1
        return None

    def _captured_local(self, table: str, *values: Any) -> None:
        """Rule 7: an insert into a local-only table, kept for replay if this is a pipelined write."""
        if self._applying or self._local is None:
            return None
        self._captures += 1
        self._local.append((table, dict(zip(self._local_columns[table], values))))
        return None

    def _captured(self, table: str, op: str, *values: Any) -> None:
        if self._applying:
            return None
        self._captures += 1
        if not self.db.conn.in_transaction:
            raise RuntimeError(f"write to replicated table {table} outside store.db.transaction()")
        pk_cols = TABLES[table][1]
        cols = self._columns[table]
        if op == "D":
            pk = dict(zip(pk_cols, values))
            if table == "usage":
                _log.warning("event=usage_row_deleted_locally tenant=%s (not replicated)", pk.get("tenant"))
                return None
            self._pending[record_key(table, list(pk.values()))] = (table, pk, True)
            return None
        row = dict(zip(cols, values[:len(cols)]))
        if table == "usage":
            old = values[len(cols):] if op == "U" else (0,) * len(USAGE_COUNTERS)
            ident = (row["tenant"], row["model"], row["site"])
            delta = self._usage_delta.setdefault(ident, [0] * len(USAGE_COUNTERS))
            for i, c in enumerate(USAGE_COUNTERS):
                delta[i] += (row[c] or 0) - (old[i] or 0)
            return None
        self._pending[record_key(table, [row[c] for c in pk_cols])] = (table, row, False)
        return None

    # ------------------------------------------------------------------ the write path (store.db.transaction)

    def before_begin(self) -> None:
        """Rule 3: apply what the record holds now before a write transaction reads anything
        (unless :meth:`barrier` just did, in this same turn of the loop)."""
        if not self._fresh:
            self.bridge.catch_up()
        self.apply_changes()

    async def barrier(self) -> bool:
        """Rule 3, awaited: the read barrier for the synchronous transactions that follow in this
        turn of the loop (a scheduler tick), so they skip their blocking one; the loop goes on while
        the record answers (or does not, during an election: then they read what is here, and the
        answer is False)."""
        ok = await self.bridge.catch_up_async()
        await self._no_transaction()
        self.apply_changes()
        self._fresh = True
        asyncio.get_running_loop().call_soon(self._unfresh)
        return ok

    async def answers(self) -> bool:
        """The read barrier of :meth:`barrier`, and whether the record answered it: False when it did
        not (no quorum, no route to the stream) or while writes are refused (the bridge's Rule 5).
        A periodic writer asks this first and skips its turn on False: its synchronous transaction
        would otherwise hold the loop for a whole write deadline on a record that cannot answer.

        While the bridge refuses writes (it saw no quorum), a read is not enough (the survivor of
        a lost quorum may still answer reads): the probe is then an awaited write of this process's
        ``sys.probe.<process>`` key (the bridge admits one per ``probe_every_s``), so the loop goes
        on while it waits, and the writer's own transaction runs only once a quorum acknowledged."""
        if getattr(self.bridge, "degraded_since", None) is not None:
            try:
                await self.bridge.commit_async([Write(PROBE_PREFIX + key_token(self.process), b"", None)],
                                               fenced=False)
            except RecordError:
                return False
        ok = await self.bridge.catch_up_async()
        await self._no_transaction()
        self.apply_changes()
        if ok:
            self._fresh = True
            asyncio.get_running_loop().call_soon(self._unfresh)
        return ok

    def _unfresh(self) -> None:
        self._fresh = False

    def before_commit(self) -> None:
        """Rule 2: publish the transaction's rows as one atomic batch; raise to roll back.
        (Usage counters go after the local commit: Rule 5.)"""
        pending, deltas = self._pending, self._usage_delta
        self._pending, self._usage_delta = {}, {}
        usage_after: dict[tuple[str, str, str], list[float]] = {}
        for ident, delta in deltas.items():
            if any(delta):
                mine = self.usage.get((self.process, *ident), [0] * len(USAGE_COUNTERS))
                usage_after[ident] = [a + b for a, b in zip(mine, delta)]
        self._committed_usage = usage_after
        self._keep_own_usage(usage_after)
        if not pending:
            return
        writes = [Write(key, _ENCODE(Value(t=table, row=row, deleted=deleted)), self.revisions.get(key, 0))
                  for key, (table, row, deleted) in pending.items()]
        if len(writes) > MAX_BATCH:
            raise RecordUnavailable(f"one transaction writes {len(writes)} rows; the record takes at most {MAX_BATCH}",
                                    code="record_batch_too_large")
        started = time.perf_counter()
        try:
            revisions = self.bridge.commit(writes)
        except RecordError as exc:
            raise self._refused(exc, len(writes)) from None
        self._published(writes, started)
        self._committed = [(w.key, r) for w, r in zip(writes, revisions)]

    def _keep_own_usage(self, counters: dict[tuple[str, str, str], list[float]]) -> None:
        """Rule 5: this process's counters go to its local ``record_usage_own`` in the transaction
        that counts them (durable with its local commit), for :meth:`_restore_own_usage`."""
        if not counters or not self._has_own_usage:
            return
        cols = ", ".join(USAGE_COUNTERS)
        self.db.conn.executemany(
            f"INSERT INTO record_usage_own (process, tenant, model, site, {cols}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            f"ON CONFLICT (process, tenant, model, site) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in USAGE_COUNTERS),
            [(self.process, *ident, *after) for ident, after in counters.items()])

    def _restore_own_usage(self) -> None:
        """Rule 5 at start: counters this process committed locally but the record does not hold
        (it died before they were acknowledged) are taken up again and published."""
        if not self._has_own_usage:
            return
        cols = ", ".join(USAGE_COUNTERS)
        restored: list[tuple[str, str, str]] = []
        for tenant, model, site, *kept in self.db.conn.execute(
                f"SELECT tenant, model, site, {cols} FROM record_usage_own WHERE process = ?", (self.process,)):
            ident = (tenant, model, site)
            recorded = self.usage.get((self.process, *ident), [0] * len(USAGE_COUNTERS))
            if any(k > r for k, r in zip(kept, recorded)):
                self.usage[(self.process, *ident)] = [max(k, r) for k, r in zip(kept, recorded)]
                self.usage_unpublished.add(ident)
                restored.append(ident)
        if not restored:
            return
        self._applying = True
        try:
            self.db.conn.execute("BEGIN IMMEDIATE")
            for ident in restored:
                self._write_usage_sum(ident)
            self.db.conn.execute("COMMIT")
        finally:
            self._applying = False
        _log.warning("event=record_usage_restored idents=%d (counted here, not yet in the record)", len(restored))
        self.publish_usage(blocking=True)  # at start: in the record before this process serves

    def _refused(self, exc: RecordError, rows: int) -> Exception:
        """The store's error for a write the record did not take (counted)."""
        if isinstance(exc, Fenced):
            self.conflicts += 1
            _log.warning("event=record_fenced rows=%d", rows)
            return RecordFenced("this process no longer leads (a newer controller's epoch took over); nothing "
                                  "was written")
        if isinstance(exc, Conflict):
            self.conflicts += 1
            _log.info("event=record_conflict rows=%d first_key=%s", rows, exc.key)
            return RecordConflict("the record changed under this write (another hub process wrote one of its rows "
                                  "first); nothing was written, retry")
        if isinstance(exc, NoQuorum):
            self.no_quorum += 1
            return RecordNoQuorum(f"the replicated record has no quorum: {exc}")
        return RecordUnavailable(f"the replicated record refused the write: {exc}")

    def _published(self, writes: Sequence[Write], started: float) -> None:
        self.publish_ms.append((time.perf_counter() - started) * 1000)
        if len(self.publish_ms) > 10_000:
            del self.publish_ms[:5_000]
        self.published += len(writes)

    async def write(self, fn: Callable[[ReplicatedDatabase], T], *, fenced: bool = True,
                    optimistic: bool = False) -> T:
        """Rule 7: run ``fn`` as one write transaction without holding the loop while the record
        answers; ``fn``'s result once its rows are on a quorum and in the projection.

        ``fn`` runs in ``BEGIN IMMEDIATE`` (after an awaited read barrier); its rows are captured
        and the SQLite transaction is rolled back at once, so nothing unacknowledged is ever seen
        locally. The rows then go to the record as one atomic batch, awaited: other transactions of
        this process run meanwhile and their batches are in flight together. A run whose rows
        include a key already in flight waits for that batch and runs ``fn`` again (it must read
        what that batch wrote); keys apart never wait on each other. Once acknowledged, the rows
        are applied to SQLite as the record holds them (as another process's would be). A ``fn``
        that also writes local-only tables or usage counters is committed like a ``transaction()``.
        ``fn`` may run more than once: it must have no effect outside the database.

        ``optimistic`` (Rule 8): ``fn`` reads only rows it also writes (a submission: its
        idempotency key and its new job), so a stale read of them shows as a lost compare-and-set.
        The read barrier (a JetStream request, two thread hops) is skipped; on a lost condition the
        barrier is taken and ``fn`` runs once more (a retry whose first answer landed at another
        process replays that answer), and only a second loss is the caller's RecordConflict.

        Raises:
            RecordConflict: a key's revision moved (another process wrote it first); nothing written.
            RecordUnavailable: no quorum (outcome unknown: retry with the same idempotency key).
        """
        conn = self.db.conn
        loop = asyncio.get_running_loop()
        barrier = not optimistic
        caught_up = True
        while True:
            if barrier:
                caught_up = await self.bridge.catch_up_async()
            else:
                self.barriers_skipped += 1
            await self._no_transaction()
            self.apply_changes()
            before, self._captures = conn.total_changes, 0
            conn.execute("BEGIN IMMEDIATE")
            self._local = []
            try:
                result = fn(self.db)
            except BaseException:
                self._local = None
                conn.execute("ROLLBACK")
                self.after_rollback()
                raise
            local, self._local = self._local, None
            usage = {ident: list(d) for ident, d in self._usage_delta.items() if any(d)}
            if conn.total_changes - before != self._captures and not barrier:
                conn.execute("ROLLBACK")  # the blocking way below reads after a barrier, as it always did
                self.after_rollback()
                barrier = True
                continue
            if conn.total_changes - before != self._captures:
                self.write_fallbacks += 1  # rows that only a local commit keeps: the blocking way
                try:
                    self.before_commit()
                except BaseException:
                    conn.execute("ROLLBACK")
                    self.after_rollback()
                    raise
                conn.execute("COMMIT")
                self.after_commit()
                return result
            pending = self._pending
            conn.execute("ROLLBACK")
            self.after_rollback()
            if not pending and not local and not usage:
                return result
            keys = list(pending) + ([LOCAL_KEY] if local or usage else [])
            busy = {id(f): f for k in keys if (f := self._inflight.get(k)) is not None}
            if busy:
                self.write_waits += 1
                await asyncio.wait(list(busy.values()))
                continue
            if not pending:  # local rows alone: nothing to ask the record
                self.apply_changes(self.bridge.take_changes(), local=local, usage=usage)
                self._usage_counted(usage)
                return result
            writes = [Write(key, _ENCODE(Value(t=table, row=row, deleted=deleted)), self.revisions.get(key, 0))
                      for key, (table, row, deleted) in pending.items()]
            if len(writes) > MAX_BATCH:
                raise RecordUnavailable(f"one transaction writes {len(writes)} rows; the record takes at most "
                                        f"{MAX_BATCH}", code="record_batch_too_large")
            done: asyncio.Future[None] = loop.create_future()
            for k in keys:
                self._inflight[k] = done
            self.in_flight += 1
            self.in_flight_peak = max(self.in_flight_peak, self.in_flight)
            started = time.perf_counter()
            try:
                try:
                    revisions: list[int] | None = await self.bridge.commit_async(writes, fenced=fenced)
                except RecordError as exc:
                    if optimistic and barrier and not caught_up and isinstance(exc, Conflict) \
                            and not isinstance(exc, Fenced):
                        # Rule 8: lost again after a barrier that did not answer (no quorum, a
                        # projection behind after a node's loss): the key's holder is unknown here,
                        # not a rival's; a 409 would tell the client its retry lost (seen in a
                        # leader kill). Unknown outcome: 503, retry with the same key.
                        self.conflicts += 1
                        self.unread_conflicts += 1
                        _log.warning("event=record_conflict_unread rows=%d first_key=%s", len(writes), exc.key)
                        raise RecordUnavailable(
                            "this process could not read what the record holds for this write's rows (its "
                            "read barrier did not answer); nothing was written, retry with the same "
                            "Idempotency-Key") from None
                    if barrier or not isinstance(exc, Conflict) or isinstance(exc, Fenced):
                        raise self._refused(exc, len(writes)) from None
                    # Rule 8: a stale read, or another process's write of a key of ours: read what
                    # the record holds (the barrier), then run fn again
                    barrier, revisions = True, None
                    self.conflicts += 1
                    self.optimistic_retries += 1
                    _log.info("event=record_conflict_retried rows=%d first_key=%s", len(writes), exc.key)
                if revisions is not None:
                    self._published(writes, started)
                    await self._no_transaction()
                    # what the record holds now, ours included, in one local transaction (not fsynced
                    # unless it holds local rows: the record has the rest on a quorum's disks and a
                    # restart rebuilds it from there), with this write's local rows (outbox entries:
                    # decided, acknowledged, and only now visible to the sender)
                    self.apply_changes(self.bridge.take_changes()
                                       + [Change(w.key, w.value, r) for w, r in zip(writes, revisions)],
                                       local=local, usage=usage)
            finally:
                self.in_flight -= 1
                for k in keys:
                    if self._inflight.get(k) is done:
                        del self._inflight[k]
                done.set_result(None)
            if revisions is None:
                continue
            self._usage_counted(usage)
            return result

    def _usage_counted(self, usage: dict[tuple[str, str, str], list[float]]) -> None:
        """Rule 5 after a pipelined write's local apply: its usage goes to the record (a task)."""
        if usage:
            self.usage_unpublished.update(usage)
            self.publish_usage()

    async def _no_transaction(self) -> None:
        while self.db.conn.in_transaction:  # a transaction spanning an await elsewhere: after it
            await asyncio.sleep(0.002)

    def after_commit(self) -> None:
        for key, revision in self._committed:
            self.revisions[key] = max(revision, self.revisions.get(key, 0))
        for ident, after in self._committed_usage.items():
            self.usage[(self.process, *ident)] = after
            self.usage_unpublished.add(ident)
        self._committed, self._committed_usage = [], {}
        if self.usage_unpublished:
            self.publish_usage()

    def after_rollback(self) -> None:
        self._pending, self._usage_delta = {}, {}
        self._committed, self._committed_usage = [], {}

    def publish_usage(self, *, blocking: bool = False) -> bool:
        """Rule 5: publish this process's cumulative counters not yet in the record (absolute values,
        so sending one again after an unanswered send counts nothing twice). Never raises: what
        is not acknowledged stays unpublished and goes with the next write. True when all went.

        On the database's event loop the send is awaited in a task of its own (one at a time), so
        the loop goes on while the record answers (a stream election takes seconds); the call then
        returns False at once. Elsewhere (start, a thread) it blocks until the record answers."""
        if not self.usage_unpublished:
            return True
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None and running is self._loop and not blocking:
            if self._usage_task is None or self._usage_task.done():
                self._usage_task = running.create_task(self._publish_usage_async(), name="record-usage")
            return False
        idents, writes = self._usage_writes()
        try:
            revisions = self.bridge.commit(writes)
        except (RecordError, RuntimeError) as exc:
            self._usage_unpublished(exc)
            return False
        self._usage_published(idents, writes, revisions)
        return not self.usage_unpublished

    async def _publish_usage_async(self) -> None:
        idents, writes = self._usage_writes()
        try:
            revisions = await self.bridge.commit_async(writes, fenced=False)
        except (RecordError, RuntimeError) as exc:
            self._usage_unpublished(exc)
            return
        self._usage_published(idents, writes, revisions)

    def _usage_writes(self) -> tuple[list[tuple[str, str, str]], list[Write]]:
        idents = sorted(self.usage_unpublished)[:MAX_BATCH]
        writes = []
        for ident in idents:
            key = record_key("usage", ident, self.process)
            after = self.usage[(self.process, *ident)]
            row = {"tenant": ident[0], "model": ident[1], "site": ident[2], **dict(zip(USAGE_COUNTERS, after))}
            writes.append(Write(key, _ENCODE(Value(t="usage", row=row, proc=self.process)), self.revisions.get(key, 0)))
        return idents, writes

    def _usage_unpublished(self, exc: BaseException) -> None:
        # Conflict: an earlier unanswered send of ours landed (its echo brings the revision),
        # or another process runs with this process's hub id.
        self.usage_publish_failures += 1
        _log.log(logging.WARNING if isinstance(exc, Conflict) else logging.DEBUG,
                 "event=record_usage_unpublished idents=%d error=%s", len(self.usage_unpublished), exc)

    def _usage_published(self, idents: list[tuple[str, str, str]], writes: list[Write], revisions: list[int]) -> None:
        for w, r in zip(writes, revisions):
            self.revisions[w.key] = max(r, self.revisions.get(w.key, 0))
        # what was sent is in the record; counters that grew meanwhile go with the next send
        for ident, w in zip(idents, writes):
            row = _DECODE(w.value).row
            if [row[c] for c in USAGE_COUNTERS] == list(self.usage[(self.process, *ident)]):
                self.usage_unpublished.discard(ident)
        self.published += len(writes)

    # ------------------------------------------------------------------ the projection

    def wake(self) -> None:
        """Called from the bridge's thread: apply queued changes soon on the database's loop."""
        loop = self._loop
        if loop is None or self._wake_scheduled:
            return
        self._wake_scheduled = True
        try:
            loop.call_soon_threadsafe(self._woken)
        except RuntimeError:
            self._wake_scheduled = False  # loop closed

    def _woken(self) -> None:
        self._wake_scheduled = False
        if self._loop is None:
            return
        if self.db.conn.in_transaction:  # a transaction spanning an await: come back later
            assert self._loop is not None
            self._loop.call_later(0.005, self._woken)
            return
        known = self.revisions
        changes = [c for c in self.bridge.take_changes()
                   if c.revision > known.get(c.key, 0) and not c.key.startswith("sys.")]
        rest = changes[APPLY_SLICE:]
        if rest:  # applied after the loop's other work (see APPLY_SLICE)
            self.bridge.requeue(rest)
            changes = changes[:APPLY_SLICE]
        try:
            self.apply_changes(changes)
        except sqlite3.Error:
            self.apply_errors += 1
            _log.exception("event=record_apply_failed")
        else:
            if rest and not self._wake_scheduled:
                self.apply_slices += 1
                self._wake_scheduled = True
                self._loop.call_soon(self._woken)
        if self.usage_unpublished:
            # Counters a write could not publish (no quorum then, or a fenced moment) go as soon as
            # the record speaks again, not only with this process's next write.
            self.publish_usage()

    def apply_changes(self, changes: list[Change] | None = None, *,
                      local: list[tuple[str, dict[str, Any]]] | None = None,
                      usage: dict[tuple[str, str, str], list[float]] | None = None) -> int:
        """Apply the bridge's queued changes (or ``changes``) in one local transaction; how many applied.
        ``local``: a pipelined write's local-only rows (Rule 7), inserted in the same transaction,
        which is then fsynced (they exist nowhere else); ``usage``: its usage counters' deltas (Rule 5:
        this process's counters, their local sums and ``record_usage_own``, in the same transaction)."""
        if changes is None:
            changes = self.bridge.take_changes()
        # what this projection holds already (a write of ours, applied when acknowledged, comes back
        # from the watch) and the record's own keys (leases, probes) need no local transaction
        known = self.revisions
        changes = [c for c in changes if c.value is not None and c.revision > known.get(c.key, 0)
                   and not c.key.startswith("sys.")]
        if not changes and not local and not usage:
            return 0
        if self.db.conn.in_transaction:
            self.bridge.requeue(changes)
            raise RuntimeError("apply_changes inside a transaction")
        if not local and not usage:
            try:
                return self._apply(changes, None, None, checked=True)
            except _ForeignKeyOrder:
                self.unchecked_applies += 1  # a child before its parent (a snapshot): as below
        return self._apply(changes, local, usage, checked=False)

    def _apply(self, changes: list[Change], local: list[tuple[str, dict[str, Any]]] | None,
               usage: dict[tuple[str, str, str], list[float]] | None, *, checked: bool) -> int:
        """:meth:`apply_changes`' transaction. The writers checked the foreign keys, but a snapshot
        brings each key's last value in revision order, which may put a child before its parent.
        ``checked``: the foreign keys stay on, and a row that breaks one rolls the transaction back
        and raises :class:`_ForeignKeyOrder` (nothing requeued: the caller applies again with them
        off, as every apply did before), since turning ``foreign_keys`` off and on (any flag pragma)
        makes SQLite compile every statement of the connection again: ~0.1 ms for each apply and
        for the next write transaction's statements."""
        conn = self.db.conn
        applied: list[tuple[str, dict[str, Any]]] = []
        revisions: dict[str, int] = {}
        usage_rows: set[tuple[str, str, str]] = set()
        self._applying = True
        if not checked:
            conn.execute("PRAGMA foreign_keys = OFF")
        # What is applied here is durable in the record and rebuilt from it on start: no fsync of
        # its own (WAL + NORMAL stays consistent; the next FULL commit syncs it anyway).
        if not local and not usage:
            conn.execute("PRAGMA synchronous = NORMAL")
        began = False
        try:
            try:
                conn.execute("BEGIN IMMEDIATE")
                began = True
                for change in changes:
                    if change.value is None or change.revision <= max(self.revisions.get(change.key, 0),
                                                                       revisions.get(change.key, 0)):
                        continue
                    try:
                        value = _DECODE(change.value)
                    except msgspec.DecodeError:
                        if not change.key.startswith("sys."):
                            self.apply_errors += 1
                            _log.error("event=record_value_undecodable key=%s revision=%d", change.key, change.revision)
                        continue
                    if value.t not in self._columns:
                        continue
                    revisions[change.key] = change.revision
                    try:
                        if value.t == "usage":
                            ident = (value.row["tenant"], value.row["model"], value.row["site"])
                            counters = [value.row.get(c, 0) for c in USAGE_COUNTERS]
                            mine = self.usage.get((value.proc, *ident))
                            if value.proc == self.process and mine is not None:
                                # our own counters only grow; the record may hold an older send
                                if any(m > c for m, c in zip(mine, counters)):
                                    self.usage_unpublished.add(ident)
                                counters = [max(m, c) for m, c in zip(mine, counters)]
                            self.usage[(value.proc, *ident)] = counters
                            usage_rows.add(ident)
                        else:
                            self._apply_row(value)
                            applied.append((value.t, value.row))
                    except (sqlite3.Error, KeyError) as exc:
                        if checked and getattr(exc, "sqlite_errorname", "") == "SQLITE_CONSTRAINT_FOREIGNKEY":
                            raise _ForeignKeyOrder() from None
                        self.apply_errors += 1
                        _log.error("event=record_apply_row_failed key=%s revision=%d error=%s", change.key,
                                   change.revision, exc)
                counted: dict[tuple[str, str, str], list[float]] = {}
                for ident, delta in (usage or {}).items():
                    mine = self.usage.get((self.process, *ident), [0] * len(USAGE_COUNTERS))
                    counted[ident] = [a + b for a, b in zip(mine, delta)]
                    usage_rows.add(ident)
                self._keep_own_usage(counted)
                before_usage = {i: self.usage.get((self.process, *i)) for i in counted}
                for ident, after in counted.items():
                    self.usage[(self.process, *ident)] = after
                try:
                    for ident in usage_rows:
                        self._write_usage_sum(ident)
                except BaseException:
                    for ident, old in before_usage.items():
                        if old is None:
                            self.usage.pop((self.process, *ident), None)
                        else:
                            self.usage[(self.process, *ident)] = old
                    raise
                for table, row in local or ():
                    self._insert_local(table, row)
                conn.execute("COMMIT")
            except _ForeignKeyOrder:
                conn.execute("ROLLBACK")
                raise
            except BaseException:
                if began and conn.in_transaction:
                    conn.execute("ROLLBACK")
                self.bridge.requeue(changes)  # nothing of them applied: again next time
                raise
        finally:
            self._applying = False
            if not checked:
                conn.execute("PRAGMA foreign_keys = ON")
            if not local and not usage:
                conn.execute("PRAGMA synchronous = FULL")
        self.revisions.update(revisions)
        self.applied += len(revisions)
        for table, row in applied:
            for listener in self.listeners:
                try:
                    listener(table, row)
                except Exception:
                    _log.exception("event=record_listener_failed table=%s", table)
        return len(revisions)

    def _insert_local(self, table: str, row: dict[str, Any]) -> None:
        """Rule 7: one captured local-only row, inserted after its batch's ack (a fresh outbox id; a
        hub event numbered after any hub event that came meanwhile; a site's event already here is
        not inserted twice)."""
        cols = [c for c in self._local_columns[table] if c not in LOCAL_INSERTS[table]]
        sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})"
        try:
            self.db.conn.execute(sql, [row[c] for c in cols])
        except sqlite3.IntegrityError:
            if table != "job_events":
                raise
            if row["site"] != HUB_EVENT_SITE:  # a site's event, numbered by the site: already here (a duplicate)
                return
            (seq,) = self.db.conn.execute(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM job_events WHERE job_id = ? AND attempt = ? AND site = ?",
                (row["job_id"], row["attempt"], row["site"])).fetchone()
            self.db.conn.execute(sql, [seq if c == "seq" else row[c] for c in cols])
        self.local_replayed += 1

    def _apply_row(self, value: Value) -> None:
        table, row = value.t, value.row
        pk = TABLES[table][1]
        if value.deleted:
            self.db.conn.execute(f"DELETE FROM {table} WHERE " + " AND ".join(f"{c} = ?" for c in pk),
                                 [row[c] for c in pk])
            return
        shape = (table, tuple(row))  # a row's columns as its writer sent them (one shape per table, mostly)
        upsert = self._upserts.get(shape)
        if upsert is None:
            cols = [c for c in self._columns[table] if c in row]
            updates = [c for c in cols if c not in pk]
            sql = (f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)}) "
                   f"ON CONFLICT ({', '.join(pk)}) DO ")
            sql += ("UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in updates)) if updates else "NOTHING"
            upsert = self._upserts[shape] = (sql, tuple(cols))
        self.db.conn.execute(upsert[0], [row[c] for c in upsert[1]])

    def _write_usage_sum(self, ident: tuple[str, str, str]) -> None:
        total = [0.0] * len(USAGE_COUNTERS)
        for (_, *rest), counters in self.usage.items():
            if tuple(rest) == ident:
                total = [a + b for a, b in zip(total, counters)]
        cols = ", ".join(USAGE_COUNTERS)
        self.db.conn.execute(
            f"INSERT INTO usage (tenant, model, site, {cols}) VALUES (?, ?, ?, {', '.join('?' for _ in total)}) "
            f"ON CONFLICT (tenant, model, site) DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in USAGE_COUNTERS),
            [*ident, *[int(v) if c not in ("card_hours", "energy_cny") else v for c, v in zip(USAGE_COUNTERS, total)]],
        )

    # ------------------------------------------------------------------ start

    def close(self) -> None:
        self._loop = None  # no more wake-ups: the database is closing
        self.bridge.close()

    def load(self) -> None:
        """Rule 6: seed an empty record from this file, else rebuild the tables from the record."""
        changes = self.bridge.take_changes()
        tables = {kind for kind, _ in TABLES.values()}
        if not any(c.value is not None and c.key.split(".", 1)[0] in tables for c in changes):
            self._seed()
        else:
            self._applying = True
            try:
                self.db.conn.execute("PRAGMA foreign_keys = OFF")
                self.db.conn.execute("BEGIN IMMEDIATE")
                for table in self._columns:
                    self.db.conn.execute(f"DELETE FROM {table}")
                self.db.conn.execute("COMMIT")
            finally:
                self._applying = False
                self.db.conn.execute("PRAGMA foreign_keys = ON")
        self.apply_changes(changes)
        self._restore_own_usage()

    def _seed(self) -> None:
        writes: list[Write] = []
        for table, cols in self._columns.items():
            pk = TABLES[table][1]
            for values in self.db.conn.execute(f"SELECT {', '.join(cols)} FROM {table}"):
                row = dict(zip(cols, values))
                if table == "usage":
                    ident = (row["tenant"], row["model"], row["site"])
                    self.usage[(self.process, *ident)] = [row[c] for c in USAGE_COUNTERS]
                    writes.append(Write(record_key("usage", ident, self.process),
                                        _ENCODE(Value(t="usage", row=row, proc=self.process)), 0))
                else:
                    writes.append(Write(record_key(table, [row[c] for c in pk]), _ENCODE(Value(t=table, row=row)), 0))
        for i in range(0, len(writes), MAX_BATCH - 1):
            batch = writes[i:i + MAX_BATCH - 1]
            try:
                revisions = self.bridge.commit(batch)
            except Conflict as exc:  # each seed write is create-only: the record was not empty after all
                raise RecordUnavailable(
                    f"the record was empty when this process read it but holds rows now ({exc}): another "
                    "process seeded it meanwhile, or the first read came before the record's snapshot; "
                    "open it again (its rows win over this file)") from None
            for w, r in zip(batch, revisions):
                self.revisions[w.key] = r
        if writes:
            _log.info("event=record_seeded rows=%d", len(writes))


def attach(db: ReplicatedDatabase, bridge: Bridge, process: str) -> Replica:
    """Make ``db`` a projection of the record behind ``bridge`` (call on the event loop that will
    use the database, once the bridge has started)."""
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    replica = Replica(db, bridge, process, loop=loop)
    replica.install()
    replica.load()
    db.write_hook = replica
    bridge.wakeup = replica.wake
    return replica


async def open_replicated(path: str, bridge: Bridge, process: str) -> ReplicatedDatabase:
    """Open the SQLite file at ``path``, start ``bridge`` (its first load in a worker thread, so the
    loop goes on) and attach: the database returned is a projection of the record.

    Raises:
        RecordUnavailable: the record could not be reached or loaded.
    """
    db = open_db(path, factory=ReplicatedDatabase)
    assert isinstance(db, ReplicatedDatabase)
    try:
        await asyncio.to_thread(bridge.start)
        attach(db, bridge, process)
    except NoQuorum as exc:
        db.conn.close()
        bridge.close()
        raise RecordUnavailable(f"the replicated record cannot be loaded: {exc}") from None
    except BaseException:
        db.conn.close()
        bridge.close()
        raise
    return db
