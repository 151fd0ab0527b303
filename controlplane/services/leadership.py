"""Who decides: the controller's leadership, and the services that run only while this process leads.

A hub process has a role (``HubConfig.role``): ``hub`` (gateway and controller, as one process
always was), ``gateway`` (tenants' HTTP only: it never decides) or ``controller`` (decides, no HTTP).
The deciding services (the training scheduler with its outbox and event consumer, the deployments
reconciler) are *followers* of :class:`Leadership`: they run only while this process leads.

- Rule 1 (``sole``): a process on its own SQLite record is the only one there can be; it leads from
  start to stop with epoch 0 (commands carry no epoch, exactly as before elections existed).
- Rule 2 (``elected``): on the replicated record (``record = "nats"``) every controller campaigns
  for the lease ``controller`` (``replicated/lease.py``). The winner's epoch is stamped on every
  command it sends (``HubBus.epoch``; agents refuse older epochs) and its fence rides on every
  commit of its record (``RecordBridge.fence``), so a leader that was frozen past its lease can
  neither command a site nor write a decision once another has taken over.
- Rule 3: when the lease is lost, the followers are stopped before anything else; when it is won,
  they start (the outbox re-sends what is pending, the scheduler ticks).
- Rule 3a (handover): after the followers have started, the ``on_lead`` callbacks run (each with the
  epoch): what the previous leader decided but may not have sent is rebuilt from the record there
  (``services/handover.py``), since the outbox is local to each process.
- Rule 4 (``never``): a gateway-only process does not campaign; its followers never run, while
  their read and write APIs (submissions, deployments) work on the shared record for the leader
  to act on.
- Every process on the replicated record says it is alive under ``sys.process.<hub_id>`` every
  :data:`PRESENCE_S`, so ``GET /v1/cluster`` on any gateway lists them, the leader and its epoch.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import secrets
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import msgspec

from controlplane.core.clock import Clock
from controlplane.replicated.errors import NotFound, RecordError
from controlplane.replicated.kv import FENCE_PREFIX, Fence, NodeState, Record
from controlplane.replicated.lease import LEASE_PREFIX, LeaderElector
from controlplane.replicated.lease_rules import LeaseConfig, LeaseRecord
from controlplane.runtime import TaskScope

log = logging.getLogger("cpn.leadership")

LEASE = "controller"
PROCESS_PREFIX = "sys.process."
PRESENCE_S = 1.0
"""How often a process on the replicated record says it is alive."""
STALE_S = 5.0
"""A process not heard of for this long is listed as silent."""


class Follower(Protocol):
    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Presence(msgspec.Struct, frozen=True, kw_only=True):
    """What a process says of itself in the record (``sys.process.<hub_id>``)."""

    hub_id: str
    identity: str
    role: str
    pid: int
    host: str
    listen: str
    """``host:port`` of its gateway ("" for a controller without HTTP)."""
    leading: bool
    epoch: int
    at: float
    """Wall-clock seconds when it said so."""


class Leadership:
    """The leadership of one process and the services that follow it.

    Args:
        mode: ``sole``, ``elected`` or ``never`` (module rules 1, 2 and 4).
        hub_id: the process's id (unique per process in a cluster).
        role: ``hub``, ``gateway`` or ``controller`` (for ``/v1/cluster``).
        record_urls: NATS URLs of the record's cluster (``elected`` and ``never`` on the record).
        record_connect: more ``nats.connect`` options for it (the process's identity, TLS).
        set_epoch: called with the epoch to stamp on commands (0: none).
        set_fence: called with the fence every commit must carry (None: unfenced).
    """

    def __init__(self, *, mode: str, hub_id: str, role: str, clock: Clock, tasks: TaskScope,
                 record_urls: Sequence[str] = (), set_epoch: Callable[[int], None] = lambda e: None,
                 set_fence: Callable[[Fence | None], None] = lambda f: None, listen: Callable[[], str] = lambda: "",
                 on_change: Callable[[bool, int], None] = lambda leading, epoch: None,
                 lease: LeaseConfig | None = None, record_connect: Mapping[str, Any] | None = None) -> None:
        if mode not in ("sole", "elected", "never"):
            raise ValueError(f"leadership mode {mode!r}: sole, elected or never")
        self.name = "leadership"
        self.mode = mode
        self.hub_id = hub_id
        self.role = role
        self.clock = clock
        self.tasks = tasks
        self.record_urls = list(record_urls)
        self.record_connect = dict(record_connect or {})
        """More ``nats.connect`` options of the record's connection (identity, TLS)."""
        self.set_epoch = set_epoch
        self.set_fence = set_fence
        self.on_change = on_change
        """Told (leading, epoch) whenever this process starts or stops leading (the metrics)."""
        self.listen = listen
        self.lease = lease or LeaseConfig()
        self.identity = f"{hub_id}:{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.followers: list[Follower] = []
        self.on_lead: list[Callable[[int], object]] = []
        """Called with the epoch once this process leads and its followers have started (Rule 3a)."""
        self.on_step_down: list[Callable[[], object]] = []
        """Called (awaited if it returns an awaitable) after the followers have stopped when this process
        stops leading."""
        self.record: Record | None = None
        self.elector: LeaderElector | None = None
        self.leading = False
        self.epoch = 0
        self.terms = 0
        self._change = asyncio.Lock()
        self.gateways = 1
        """Gateways (role hub or gateway) heard from in the record within ``STALE_S``, this one
        included; 1 on SQLite. The tenancy service enforces 1/gateways of each tenant's rate."""
        self._say_now = asyncio.Event()
        """Set when this process starts or stops leading: its presence is written at once, so
        ``GET /v1/cluster`` shows the change without waiting out :data:`PRESENCE_S`."""

    def __repr__(self) -> str:
        return f"<Leadership {self.mode} {self.identity} leading={self.leading} epoch={self.epoch}>"

    def deciding(self) -> bool:
        """May this process send the leader's commands now? Read from the clock on every call
        (``LeaderElector.may_decide``), so a leader frozen past ``holder_silent_s`` says no on
        waking, and one whose renewals wait for the record stream's election holds back its
        commands (keeping the lease, its epoch and its followers) until a renewal lands."""
        if self.mode == "sole":
            return True
        return self.leading and self.elector is not None and self.elector.may_decide()

    def follow(self, service: Follower) -> None:
        """``service`` runs only while this process leads (started and stopped by this)."""
        self.followers.append(service)

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        if self.mode == "sole":
            await self._lead(0)
        if self.record_urls and self.mode in ("elected", "never"):
            self.record = await Record.open(self.record_urls, name=f"cpn-leadership-{self.hub_id}",
                                            connect=self.record_connect)
            self.tasks.spawn(self._presence_loop(), name="presence")
        if self.mode == "elected":
            assert self.record is not None
            self.elector = LeaderElector(self.record, LEASE, self.identity, self.lease,
                                         on_started_leading=self._won, on_stopped_leading=self._lost,
                                         clock=self.clock.monotonic)
            self.elector.start()

    async def stop(self) -> None:
        try:
            if self.elector is not None:
                elector, self.elector = self.elector, None
                await elector.stop(release=True)  # steps down first: followers stop, then others may lead
        except Exception:  # no quorum to release the lease: it runs out by itself
            log.exception("event=lease_release_failed hub=%s", self.hub_id)
        finally:
            try:
                await self._step_down("stopping")
                await self.tasks.close()
            finally:
                if self.record is not None:
                    record, self.record = self.record, None
                    await record.close()

    # ------------------------------------------------------------------ elections

    def _won(self, epoch: int) -> None:
        self.tasks.spawn(self._lead(epoch), name=f"lead-{epoch}")

    def _lost(self, reason: str = "") -> None:
        # Stop deciding at once (synchronously: the elector calls this before another may lead):
        # commands and commits of this process stop carrying the epoch, so they can no longer pass
        # for the leader's; the followers' tasks are then stopped in the background.
        self.leading = False
        self._say_now.set()
        self.set_epoch(0)
        self.set_fence(None)
        self.on_change(False, 0)
        log.warning("event=leadership_lost hub=%s epoch=%d reason=%s", self.hub_id, self.epoch, reason)
        self.tasks.spawn(self._step_down(reason or "lost"), name="step-down")

    async def _lead(self, epoch: int) -> None:
        async with self._change:
            self.epoch = epoch
            self.terms += 1
            self.set_epoch(epoch)
            self.set_fence(Fence(LEASE, epoch) if epoch else None)
            self.leading = True
            self._say_now.set()
            self.on_change(True, epoch)
            log.info("event=leading hub=%s epoch=%d identity=%s", self.hub_id, epoch, self.identity)
            for service in self.followers:
                await service.start()
            for callback in self.on_lead:
                try:
                    result = callback(epoch)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    log.exception("event=on_lead_failed hub=%s epoch=%d", self.hub_id, epoch)

    async def _step_down(self, reason: str) -> None:
        async with self._change:
            was = self.leading or self.mode == "sole"
            self.leading = False
            self._say_now.set()
            self.set_epoch(0)
            self.set_fence(None)
            self.on_change(False, 0)
            for service in reversed(self.followers):
                try:
                    await service.stop()
                except Exception:
                    log.exception("event=follower_stop_failed service=%s", service.name)
            for callback in self.on_step_down:
                try:
                    result = callback()
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    log.exception("event=on_step_down_failed hub=%s", self.hub_id)
            if was:
                log.info("event=stepped_down hub=%s epoch=%d reason=%s", self.hub_id, self.epoch, reason)

    # ------------------------------------------------------------------ presence and the cluster view

    def _presence(self) -> Presence:
        return Presence(hub_id=self.hub_id, identity=self.identity, role=self.role, pid=os.getpid(),
                        host=socket.gethostname(), listen=self.listen(), leading=self.leading, epoch=self.epoch,
                        at=self.clock.time())

    async def _presence_loop(self) -> None:
        assert self.record is not None
        key = PROCESS_PREFIX + self.hub_id
        revision: int | None = None
        while True:
            value = msgspec.json.encode(self._presence())
            try:
                if revision is None:  # first write of this life, or after a failure: read where the key is
                    try:
                        revision = (await self.record.get(key)).revision
                    except NotFound:
                        revision = 0
                revision = await self.record.update(key, value, revision) if revision else \
                    await self.record.create(key, value)
            except RecordError as exc:
                revision = None
                log.debug("event=presence_failed hub=%s error=%s", self.hub_id, exc)
            try:
                self.gateways = await self._count_gateways()
            except RecordError as exc:  # keep the last count
                log.debug("event=gateway_count_failed hub=%s error=%s", self.hub_id, exc)
            await self._presence_pause()

    async def _presence_pause(self) -> None:
        """:data:`PRESENCE_S` on the clock, or less if the leadership changes meanwhile."""
        sleep = asyncio.ensure_future(self.clock.sleep(PRESENCE_S))
        woken = asyncio.ensure_future(self._say_now.wait())
        try:
            await asyncio.wait({sleep, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleep, woken):
                task.cancel()
            await asyncio.gather(sleep, woken, return_exceptions=True)
            self._say_now.clear()

    async def _count_gateways(self) -> int:
        assert self.record is not None
        now = self.clock.time()
        seen = {self.hub_id} if self.role != "controller" else set()
        for key in await self.record.keys(PROCESS_PREFIX + ">"):
            try:
                p = msgspec.json.decode((await self.record.get(key)).value, type=Presence)
            except (NotFound, msgspec.ValidationError):
                continue
            if p.role != "controller" and now - p.at <= STALE_S:
                seen.add(p.hub_id)
        return max(1, len(seen))

    async def view(self) -> dict[str, Any]:
        """``GET /v1/cluster``: the hub processes, the leader and its epoch, the NATS nodes."""
        me = self._presence()
        if self.record is None:  # sole: this process is the whole control plane
            return {"mode": self.mode, "leader": {"hub_id": me.hub_id, "identity": me.identity, "epoch": 0},
                    "processes": [_process(me, self.clock.time())], "nats_nodes": []}
        now = self.clock.time()
        processes: list[dict[str, Any]] = []
        leader: dict[str, Any] | None = None
        try:
            for key in await self.record.keys(PROCESS_PREFIX + ">"):
                entry = await self.record.get(key)
                try:
                    processes.append(_process(msgspec.json.decode(entry.value, type=Presence), now))
                except msgspec.ValidationError:
                    continue
            lease = await self.record.get(LEASE_PREFIX + LEASE)
            held = msgspec.json.decode(lease.value, type=LeaseRecord)
            if not held.released:
                # The epoch is the fence's revision, and the fence's value the identity its acquisition
                # wrote: one read gives both (two reads may come from replicas at different revisions,
                # pairing an old holder with a new epoch).
                fence = await self.record.get(FENCE_PREFIX + LEASE)
                holder = fence.value.decode(errors="replace") or held.holder
                leader = {"identity": holder, "hub_id": holder.split(":", 1)[0], "epoch": fence.revision}
        except RecordError as exc:
            log.info("event=cluster_view_partial error=%s", exc)
        nodes: list[NodeState] = await self.record.nodes()
        processes.sort(key=lambda p: p["hub_id"])
        return {"mode": self.mode, "leader": leader, "processes": processes,
                "nats_nodes": [msgspec.to_builtins(n) for n in nodes]}


def _process(p: Presence, now: float) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(p)
    out["seen_s_ago"] = round(max(0.0, now - p.at), 3)
    out["state"] = "up" if now - p.at <= STALE_S else "silent"
    return out
