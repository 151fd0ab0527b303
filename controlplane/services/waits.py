"""Why waiting jobs wait, shared from the deciding controller to every hub process, over NATS.

What it holds: :class:`WaitShare`. A job's wait reason is derived state: the leader's scheduler
works it out again at every tick (a new leader at its first), so it is no write of the replicated
record (before, each new job's first reason was a second quorum write of its whole row, fsynced on
three nodes and applied at every process: half the record's writes in ``cpn bench
submissions``). The leader says the reasons that changed in its own SQLite (``db.derived``) and
publishes them as one :class:`News` per scheduling round on :data:`SUBJECT`; every other process
applies them to its SQLite the same way, so ``wait_reason`` reads the same at every gateway.

Rule 1 (in step): each news carries its sender, the sender's leader epoch and a sequence number.
A news from a lower epoch than one already seen (a deposed leader) is dropped. Any other news is
applied; if it is not the next of the sender this process follows (a lost message, a reconnect, a
new leader, a process just started), the process asks for the full set on :data:`ASK`, and the
leader publishes every waiting job's reason as ``full`` news (:data:`CHUNK` reasons a message, each
part a full set as of the same sequence number), after which it follows again.
Rule 2 (order): a reason may arrive before its job's row (the record's watch and this subject are
two paths): a reason that matches no job waiting after that attempt is kept for
:data:`PENDING_S` and applied when the job's row arrives (:meth:`WaitShare.record_changed`).
Rule 3 (soft state): a news lost or undecodable is counted, never fatal: the next round's news or a
full set repairs it; sites cannot publish on ``cpn.v1.hub.>`` (the hub's NATS permissions).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Annotated, Any, Protocol

import msgspec

from controlplane.core.clock import Clock
from controlplane.runtime import BackgroundTasks
from controlplane.store import jobs as store_jobs
from controlplane.store.db import Database, derived

log = logging.getLogger("cpn.waits")

SUBJECT = "cpn.v1.hub.waits"
ASK = "cpn.v1.hub.waits.ask"
PENDING_S = 30.0
"""How long a reason whose job is not (yet) waiting here is kept for its row to arrive (Rule 2)."""
ASK_GAP_S = 1.0
"""A process out of step asks for the full set at most this often."""
FULL_DELAY_S = 0.1
"""The leader answers the asks of this long with one full set (processes starting together)."""
CHUNK = 2000
"""At most this many reasons a message: a tariff wait's reason is ~200 bytes and names its own
saving, so a long queue's reasons would pass NATS's default 1 MB payload in one."""

_Id = Annotated[str, msgspec.Meta(max_length=200)]


class Wait(msgspec.Struct, frozen=True, array_like=True):
    job: _Id
    attempt: Annotated[int, msgspec.Meta(ge=0)]
    reason: Annotated[int, msgspec.Meta(ge=0)]
    """An index into :attr:`News.reasons` (a queue's jobs mostly wait for a few reasons)."""


class News(msgspec.Struct, frozen=True, kw_only=True):
    hub: _Id
    epoch: Annotated[int, msgspec.Meta(ge=0)]
    seq: Annotated[int, msgspec.Meta(ge=0)]
    full: bool = False
    """Every waiting job's reason (an answer to :data:`ASK`), not only those that changed."""
    reasons: Annotated[list[Annotated[str, msgspec.Meta(max_length=4000)]], msgspec.Meta(max_length=100_000)]
    waits: Annotated[list[Wait], msgspec.Meta(max_length=1_000_000)]


class Ask(msgspec.Struct, frozen=True, kw_only=True):
    hub: _Id


_news = msgspec.json.Decoder(News)
_ask = msgspec.json.Decoder(Ask)


class Bus(Protocol):
    """What the share needs of the hub's NATS adapter."""

    async def publish_hub(self, subject: str, data: bytes) -> None: ...

    async def subscribe_hub(self, subject: str, handler: Callable[[bytes], None]) -> None: ...

    def malformed(self, kind: str) -> None: ...


def encode(hub: str, epoch: int, seq: int, waits: list[store_jobs.Wait], *, full: bool = False) -> bytes:
    index: dict[str, int] = {}
    packed = [Wait(job, attempt, index.setdefault(reason, len(index))) for job, attempt, reason in waits]
    return msgspec.json.encode(News(hub=hub, epoch=epoch, seq=seq, full=full, reasons=list(index), waits=packed))


class WaitShare:
    """Wait reasons from the leader to every hub process (see the module)."""

    name = "wait_share"

    def __init__(self, *, hub_id: str, bus: Bus, db: Callable[[], Database], epoch: Callable[[], int],
                 leading: Callable[[], bool], clock: Clock) -> None:
        self.hub_id = hub_id
        self.bus = bus
        self._db = db
        self.epoch = epoch
        self.leading = leading
        self.clock = clock
        self.tasks = BackgroundTasks("waits")
        self._seq = 0
        """The last sequence number this process published."""
        self._following: tuple[str, int, int] | None = None
        """(sender, epoch, last seq applied) while in step with a sender (Rule 1)."""
        self._epoch_seen = 0
        self._asked_at = -float("inf")
        self._full_due = False
        self._pending: dict[str, tuple[int, str, float]] = {}
        """job -> (attempt, reason, when heard): reasons whose job is not waiting here yet (Rule 2)."""
        self._arrived: set[str] = set()
        self._pruned_at = clock.monotonic()
        self.counters: dict[str, int] = {"published": 0, "received": 0, "applied": 0, "asked": 0, "full_sent": 0,
                                         "stale": 0, "malformed": 0, "publish_failed": 0, "pending_dropped": 0}

    def __repr__(self) -> str:
        c = self.counters
        return (f"<WaitShare published={c['published']} received={c['received']} applied={c['applied']} "
                f"pending={len(self._pending)} following={self._following}>")

    async def start(self) -> None:
        await self.bus.subscribe_hub(SUBJECT, self.receive)
        await self.bus.subscribe_hub(ASK, self.asked)
        self._ask()  # a process just started has the reasons the record last held, if any

    async def stop(self) -> None:
        await self.tasks.close()

    # ------------------------------------------------------------------ the leader's side

    def publish(self, waits: list[store_jobs.Wait]) -> None:
        """The reasons a round of this process's scheduler said (``TrainingService.waits_out``)."""
        for i in range(0, len(waits), CHUNK):
            self._seq += 1
            self._send(encode(self.hub_id, self.epoch(), self._seq, waits[i:i + CHUNK]))

    def asked(self, data: bytes) -> None:
        """Another process asks for the full set: the leader publishes it (the asks of
        :data:`FULL_DELAY_S` share one)."""
        try:
            ask = _ask.decode(data)
        except msgspec.DecodeError:
            self._malformed(data)
            return
        if ask.hub == self.hub_id or not self.leading() or self._full_due:
            return
        self._full_due = True
        self.tasks.spawn(self._send_full(), name="waits-full")

    async def _send_full(self) -> None:
        await self.clock.sleep(FULL_DELAY_S)
        self._full_due = False
        if self.leading():
            waits = store_jobs.waiting_reasons(self._db())
            self.counters["full_sent"] += 1
            for i in range(0, max(len(waits), 1), CHUNK):  # every part a full set as of this seq
                self._send(encode(self.hub_id, self.epoch(), self._seq, waits[i:i + CHUNK], full=True))

    def _send(self, data: bytes) -> None:
        # in order: each send is a task, and tasks start in the order they were made
        self.tasks.spawn(self._publish(SUBJECT, data), name="waits-publish")

    async def _publish(self, subject: str, data: bytes) -> None:
        try:
            await self.bus.publish_hub(subject, data)
            self.counters["published"] += 1
        except Exception as exc:  # disconnected: the others ask for the full set once back (Rule 3)
            self.counters["publish_failed"] += 1
            log.warning("event=waits_publish_failed subject=%s bytes=%d error=%r", subject, len(data), exc)

    # ------------------------------------------------------------------ every other process

    def receive(self, data: bytes) -> None:
        """A news from the leader: applied, and the full set asked for when out of step (Rule 1)."""
        try:
            news = _news.decode(data)
            waits = [(w.job, w.attempt, news.reasons[w.reason]) for w in news.waits]
        except (msgspec.DecodeError, IndexError):
            self._malformed(data)
            return
        if news.hub == self.hub_id:
            return
        if news.epoch < self._epoch_seen:
            self.counters["stale"] += 1
            return
        self.counters["received"] += 1
        self._epoch_seen = news.epoch
        following = self._following
        in_step = news.full or (following is not None and following[:2] == (news.hub, news.epoch)
                                and news.seq == following[2] + 1)
        self._apply(waits)
        if in_step:
            self._following = (news.hub, news.epoch, news.seq)
        else:
            self._following = None
            self._ask()

    def record_changed(self, table: str, row: dict[str, Any]) -> None:
        """A row the record's watch applied here: a job with a reason kept for it gets it (Rule 2)."""
        if table != "jobs" or not self._pending or row.get("id") not in self._pending:
            return
        if not self._arrived:
            asyncio.get_running_loop().call_soon(self._apply_arrived)
        self._arrived.add(row["id"])

    def _apply_arrived(self) -> None:
        arrived, self._arrived = self._arrived, set()
        waits = [(job, *self._pending.pop(job)[:2]) for job in arrived if job in self._pending]
        if waits:
            self._apply(waits)

    def _apply(self, waits: list[store_jobs.Wait]) -> None:
        db = self._db()
        with derived(db):
            unmatched = store_jobs.apply_waits(db, waits)
        self.counters["applied"] += len(waits) - len(unmatched)
        now = self.clock.monotonic()
        for job, attempt, reason in unmatched:
            self._pending[job] = (attempt, reason, now)
        if self._pending and now - self._pruned_at > PENDING_S:  # those whose row never came
            self._pruned_at = now
            old = [job for job, (_, _, at) in self._pending.items() if now - at > PENDING_S]
            for job in old:
                del self._pending[job]
            self.counters["pending_dropped"] += len(old)

    def _ask(self) -> None:
        now = self.clock.monotonic()
        if now - self._asked_at < ASK_GAP_S:
            return
        self._asked_at = now
        self.counters["asked"] += 1
        self.tasks.spawn(self._publish(ASK, msgspec.json.encode(Ask(hub=self.hub_id))), name="waits-ask")

    def _malformed(self, data: bytes) -> None:
        self.counters["malformed"] += 1
        self.bus.malformed("waits")
        log.warning("event=waits_malformed bytes=%d", len(data))
