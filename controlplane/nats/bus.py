"""The hub's NATS adapter: the only hub code that imports ``nats``.

It carries decisions out and brings messages in; it decides nothing. nats-py's exceptions are
translated here (timeouts and no-responders become :class:`SiteUnreachable`, an ``ErrorReply`` becomes
:class:`SiteRefused`), so nothing above this module sees a nats type.

Connection settings follow architecture §4: ping every ``ping_interval_s`` (0.5 s) with
``max_outstanding_pings`` (2) outstanding, so a dead *or frozen* server (paused, hung: its sockets stay
open) is left within 1.5 s, not minutes; reconnect forever, to another server of the cluster than the
one just left (:mod:`edge_agent.nats_reconnect`); callbacks that log and count.

A connection that does not work must not be blamed on the sites: an inference request finds the
connection reconnecting (it waits up to ``RECONNECT_WAIT_S``, then :class:`BusUnavailable`, which the
gateway answers 503 ``nats_unavailable`` at once, so a client moves to another gateway), and a site
that did not acknowledge is only called silent after :meth:`HubBus.responsive` shows that the
connection itself still answers (else the request goes once more on the next connection).

Malformed messages from agents are counted (``malformed``) and dropped, or answered with an
``ErrorReply`` when they carry a reply subject.

Site limits (docs/security.md, "Site limits"): before decoding anything a site sent, the bus checks
its size and the site's token bucket (:class:`~controlplane.core.sitegate.SiteGate`); refusals are
counted in ``stats.dropped`` by (kind, reason). Site traffic (registrations, heartbeats, events)
comes in on a connection of its own, so a flood queues there and not behind inference replies.

Events: a site publishes on its ``evt`` subject as a request; the hub, not JetStream, receives
it, checks the reply is in the site's own inbox (else drops it, ``reply_spoof``: no answer goes
anywhere), size and rate, then stores it in ``CPN_EVENTS`` under ``cpn.v1.events.<site>`` and
relays JetStream's PubAck to the site. Sites cannot publish on the stream's subjects, so JetStream
never answers a reply subject a site chose.

Regional event streams (a super-cluster, ``event_regions``): a site of such a region has its events
stored in ``CPN_EVENTS_<region>`` under ``cpn.v1.events.<region>.<site>``, a stream placed in that
region (placement tag ``region:<id>``), so a region cut off from the controller still stores its
sites' events durably in-region (its gateway relays them) and the controller consumes them after
healing. Each site's events go to one stream, so they stay in order; the controller runs one
durable consumer per stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    Placement,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from controlplane.core.errors import BusUnavailable, SiteAbsent, SiteRefused, SiteSilent, SiteUnreachable
from controlplane.runtime import BackgroundTasks, TaskScope, cancel_and_wait
from controlplane.core.sitegate import Kind, SiteGate, SiteLimits
from edge_agent import nats_reconnect, tls, wire
from edge_agent.nats_barrier import barrier
from edge_agent.nats_fast import publish_soon, subscribe_now

log = logging.getLogger("cpn.bus")

_LOST = object()
"""What a request's future holds when its site was declared lost before it answered."""

_RESEND = object()
"""What a request's future holds when the connection it went out on was dropped before an answer
came: it is sent once more on the next connection (:meth:`HubBus._request`)."""

_NO_RESPONDERS = "503"
"""The status header nats-server sets on the reply to a request nobody subscribed to."""

STORED_EVENTS_ROOT = "cpn.v1.events"
"""Subjects of ``CPN_EVENTS`` (``cpn.v1.events.<site>``): only the hub publishes there."""
STORED_EVENTS_WILDCARD = STORED_EVENTS_ROOT + ".*"
EVENTS_QUEUE = "cpn-hub-events"
"""Queue group of the hubs' event subscriptions: each event is stored by one hub."""
MSG_ID_HEADER = "Nats-Msg-Id"

PING_ABANDON_S = 30.0
"""How long a PING of :meth:`HubBus.responsive` may stay unanswered (its answer is no longer awaited
after the caller's own timeout; a reconnect drops it before this)."""

BUS_PROBE_S = 0.5
"""When a site does not acknowledge a request in time, how long the hub's own connection has to
answer a PING before the silence is put down to the connection (the request then goes again on the
next connection) rather than to the site."""

RECONNECT_WAIT_S = 2.0
"""Longest an inference request waits for the hub's reconnecting NATS connection before it is
refused (:class:`BusUnavailable`, 503): reconnecting to another node of a cluster takes
milliseconds, so this matters only when no node answers; then it rides out a lone server's restart
(about a second), and past it the client is better served by another gateway."""


def stored_event_subject(site: str, region: str | None = None) -> str:
    """Subject an event of ``site`` is stored under: in ``CPN_EVENTS``, or with ``region`` in that
    region's stream (:func:`regional_events_stream`)."""
    return f"{STORED_EVENTS_ROOT}.{site}" if region is None else f"{STORED_EVENTS_ROOT}.{region}.{site}"


def regional_events_stream(region: str) -> str:
    """The name of ``region``'s event stream (subjects ``cpn.v1.events.<region>.*``)."""
    return f"{wire.EVENTS_STREAM}_{region}"


def site_of_stored(subject: str) -> str | None:
    """The site of a stored event (``cpn.v1.events.<site>``, regional ``cpn.v1.events.<region>.<site>``
    or old ``...site.<site>.evt``)."""
    if subject.startswith(STORED_EVENTS_ROOT + "."):
        tokens = subject[len(STORED_EVENTS_ROOT) + 1:].split(".")
        if len(tokens) == 2 and not wire.is_valid_id(tokens[0]):
            return None
        site = tokens[-1] if len(tokens) <= 2 else ""
        return site if wire.is_valid_id(site) else None
    return wire.site_of(subject)


DECISIONS = (wire.StartAttempt, wire.StopAttempt, wire.LoadModel, wire.UnloadModel)
"""The commands only the leading controller sends (``Drain`` is an operator's, through any gateway)."""


def _consumer_config(durable: str, start_seq: int | None = None, stream: str = wire.EVENTS_STREAM) -> ConsumerConfig:
    # No filter subject: the whole stream, including events stored by an older hub under the
    # sites' own subjects.
    policy = DeliverPolicy.ALL if start_seq is None else DeliverPolicy.BY_START_SEQUENCE
    regional = stream != wire.EVENTS_STREAM
    return ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT, deliver_policy=policy,
                          opt_start_seq=start_seq, ack_wait=REGIONAL_ACK_WAIT_S if regional else 30.0,
                          max_ack_pending=_max_ack_pending(stream))


REGIONAL_ACK_WAIT_S = 2.0
"""A regional stream's delivery not acknowledged within this is sent again: short, because a
delivery lost on the link to the controller (a cut) holds every later event of the region (one in
flight), and the site's heartbeats, no longer naming a finished attempt, do not wait for them (an
attempt left out of ``vanished_heartbeats`` heartbeats is failed). A handler slower than this gets
the same event again afterwards, which the record absorbs (``duplicate``)."""


def _max_ack_pending(stream: str) -> int:
    """One event in flight on a regional stream: its consumer is in another cluster than the
    controller, and a delivery lost on the link between them (a cut) would otherwise be redelivered
    after ``ack_wait``, behind later events of the same site (an older checkpoint applied after a
    newer one). One at a time, a lost delivery holds the rest until it is redelivered: in order."""
    return 10_000 if stream == wire.EVENTS_STREAM else 1


def _js_error(code: int, description: str) -> bytes:
    """A PubAck-shaped JetStream error: agents read it as "not stored, retry later"."""
    return json.dumps({"error": {"code": code, "description": description}}).encode()


def _retire_ping(pings: set[asyncio.Future[None]]) -> Callable[[asyncio.Future[None]], None]:
    def retire(ping: asyncio.Future[None]) -> None:
        pings.discard(ping)
        if not ping.cancelled():
            ping.exception()  # retrieved: a PING nobody waits for any more may fail quietly
    return retire


class _Waiter:
    """One request waiting on the shared reply subscription."""

    __slots__ = ("future", "site", "due", "deadline", "acked", "streamed", "stream")

    def __init__(self, future: asyncio.Future[Msg | None], site: str, due: float,
                 deadline: float, acked: bool, streamed: bool = False) -> None:
        self.future = future
        self.site = site
        self.streamed = streamed
        """A streamed request: if its first message is a chunk, the rest go to :attr:`stream`."""
        self.stream: _Stream | None = None
        """Set when a streamed request's first message was a chunk (:meth:`HubBus._on_reply`)."""
        self.due = due
        """Loop time the current wait ends (the acknowledgement's, then the answer's): the bus's one
        timer for every request (:meth:`HubBus._due`) ends it with no message."""
        self.deadline = deadline
        """Loop time the answer is due by, once the site has acknowledged the request."""
        self.acked = acked
        """True once an InferAccepted came (or when none was asked for)."""

_TIMER_SLACK_S = 0.001
"""Loop timers are kept in whole milliseconds: a wait due within one of now has timed out."""


class _Stream:
    """One streaming request's messages after its first chunk, as they come in on the shared reply
    subscription (until then it waits as a plain request does: :meth:`HubBus._request`).

    Its waits are bounded by one timer for the whole stream, not one per message: a wait notes when
    it times out and arms the timer only if none is due by then; when the timer fires it ends the
    wait under way if that one is due, else re-arms for it. A stream of many chunks costs a timer
    or two, not one per chunk. :meth:`close` cancels it."""

    __slots__ = ("queue", "wake", "dropped", "site", "lost", "loop", "wait_until", "timer", "timer_at", "token")

    def __init__(self, site: str = "", loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.token = ""
        """Its reply token (its key in ``HubBus._streams``)."""
        self.wait_until: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.queue: deque[Msg] = deque()
        self.wake: asyncio.Future[None] | None = None
        self.dropped = False
        """Set when the connection the request went out on was dropped (:meth:`next` returns None)."""
        self.site = site
        self.lost = False
        """Set when its site was declared lost (:meth:`HubBus.fail_requests`): it ends now."""

    def lose(self) -> None:
        self.lost = True
        wake = self.wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def drop(self) -> None:
        self.dropped = True
        wake = self.wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def put(self, msg: Msg) -> None:
        self.queue.append(msg)
        wake = self.wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def ready(self) -> bool:
        """Whether a message other than an acknowledgement has come and not been taken yet."""
        return any(not m.data.startswith(wire.ACCEPTED_PREFIX) for m in self.queue)

    async def next(self, timeout_s: float) -> Msg | None:
        """The next message, or None when none came within ``timeout_s`` or the connection was
        dropped (:attr:`dropped`)."""
        if not self.queue and (self.dropped or self.lost):
            return None
        if not self.queue:
            loop = self.loop
            wake = self.wake = loop.create_future()
            until = self.wait_until = loop.time() + timeout_s
            if self.timer is None or self.timer_at > until:
                if self.timer is not None:
                    self.timer.cancel()
                self.timer_at = until
                self.timer = loop.call_at(until, self._on_timer)
            try:
                await wake
            finally:
                self.wake = None
                self.wait_until = None
            if not self.queue:
                return None
        return self.queue.popleft()

    def _on_timer(self) -> None:
        self.timer = None
        wake, until = self.wake, self.wait_until
        if wake is None or until is None or wake.done():
            return  # nothing waits now: the next wait arms the timer again
        if self.loop.time() + _TIMER_SLACK_S >= until:
            wake.set_result(None)  # timed out
        else:
            self.timer_at = until
            self.timer = self.loop.call_at(until, self._on_timer)

    def close(self) -> None:
        """The stream is over: its timer goes."""
        timer, self.timer = self.timer, None
        if timer is not None:
            timer.cancel()


class _Rest:
    """The messages of a stream after its first chunk (:meth:`HubBus.infer_stream`): chunks in
    order, then the final result. Closing it (:meth:`aclose`, or its end or failure) ends the
    stream's timer and forgets it."""

    __slots__ = ("bus", "stream", "site", "request_id", "idle_timeout_s", "expected", "ended")

    def __init__(self, bus: HubBus, stream: _Stream, site: str, request_id: str, idle_timeout_s: float) -> None:
        self.bus = bus
        self.stream = stream
        self.site = site
        self.request_id = request_id
        self.idle_timeout_s = idle_timeout_s
        self.expected = 0
        """The next chunk's index: a site numbers its chunks 0, 1, 2, ..."""
        self.ended = False

    def __aiter__(self) -> _Rest:
        return self

    async def __anext__(self) -> wire.InferChunk | wire.InferResult:
        if self.ended:
            raise StopAsyncIteration
        stream, site = self.stream, self.site
        try:
            while True:
                msg = await stream.next(max(self.idle_timeout_s, 0.001))
                if msg is None:
                    if stream.lost:
                        raise SiteUnreachable(f"{site}: declared lost (silent for the detection period) mid-answer")
                    if stream.dropped:
                        stream.dropped = False
                        continue  # the site has it: what it sends next comes on the new connection
                    self.bus.stats.timeouts += 1
                    raise SiteUnreachable(f"{site}: no chunk within {self.idle_timeout_s * 1000:.0f} ms")
                reply = self.read(msg)
                if reply is None:
                    continue
                if isinstance(reply, wire.InferResult):
                    self.close()
                return reply
        except BaseException:
            self.close()
            raise

    def read(self, msg: Msg) -> wire.InferChunk | wire.InferResult | None:
        """One message of the stream, decoded (None: a repeated acknowledgement, nothing to relay)."""
        site = self.site
        try:
            reply = wire.infer_reply_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.bus.stats.bad("infer_chunk")
            raise SiteRefused("bad_message", f"{site} sent a malformed chunk: {exc}", False) from None
        if isinstance(reply, wire.ErrorReply):
            raise SiteRefused(reply.code, reply.message, reply.retryable)
        if isinstance(reply, wire.InferAccepted):
            return None
        if isinstance(reply, wire.InferChunk):
            expected = self.expected
            if reply.index > expected:  # chunks lost on the way (the site's NATS link broke)
                raise SiteRefused("stream_broken", f"{site}: chunks {expected}-{reply.index - 1} of the "
                                  "stream never came (its NATS link broke mid-answer)", False)
            self.expected = max(expected, reply.index + 1)
        return reply

    def close(self) -> None:
        if not self.ended:
            self.ended = True
            self.bus._end_stream(self.stream, self.request_id)

    async def aclose(self) -> None:
        self.close()


RegisterHandler = Callable[[wire.Register], wire.RegisterAck | wire.ErrorReply]
HeartbeatHandler = Callable[[wire.Heartbeat], None]
EventHandler = Callable[[wire.AttemptStarted | wire.Checkpointed | wire.AttemptExited], Awaitable[None]]


@dataclass
class BusStats:
    malformed: int = 0
    errors: int = 0
    disconnects: int = 0
    reconnects: int = 0
    requests: int = 0
    timeouts: int = 0
    ack_timeouts: int = 0
    """Requests a site did not acknowledge in time (failed over quickly: a partition or dead link)."""
    resent: int = 0
    """Requests sent again on a new connection because theirs was dropped or stuck (a frozen server)."""
    no_responders: int = 0
    events: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    dropped: dict[tuple[str, str], int] = field(default_factory=dict)
    """(kind, reason) -> messages from sites refused before decoding (rate, oversize, reply_spoof)."""

    def bad(self, kind: str) -> None:
        self.malformed += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1

    def drop(self, kind: str, reason: str) -> None:
        key = (kind, reason)
        self.dropped[key] = self.dropped.get(key, 0) + 1


class HubBus:
    """The hub's connection to NATS.

    Args:
        url: NATS server URL(s), comma separated.
        user, password: the hub's own identity (optional on an open server).
        on_register / on_heartbeat: synchronous handlers (pure core behind them).
        on_disconnect / on_reconnect: told about the hub's own connection state.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str = "cpn-hub",
        user: str | None = None,
        password: str | None = None,
        on_register: RegisterHandler,
        on_heartbeat: HeartbeatHandler,
        on_disconnect: Callable[[], None] = lambda: None,
        on_reconnect: Callable[[], None] = lambda: None,
        ping_interval_s: float = 0.5,
        max_outstanding_pings: int = 2,
        strict_inboxes: bool = False,
        site_limits: SiteLimits | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tasks: TaskScope | None = None,
        event_region_of: Callable[[str], str | None] = lambda site: None,
    ) -> None:
        self.url = url
        self.event_region_of = event_region_of
        """The region whose event stream holds a site's events (None: ``CPN_EVENTS``)."""
        self._event_streams: list[str] = [wire.EVENTS_STREAM]
        """The event streams this hub made sure of (``CPN_EVENTS`` and the regional ones): one consumer each."""
        self.events_backlog: dict[str, int] = {}
        """Per regional event stream: events stored and not yet applied by this hub's consumer, as
        last seen (each delivery's ``num_pending`` after it is applied; while idle, the consumer's
        pending and unacknowledged counts). After a cut, a region's backlog drains one event per
        round trip while its sites' heartbeats arrive at once: :meth:`events_behind` tells the
        training service to wait for the events before failing an attempt the heartbeats no
        longer name."""
        self.tasks = tasks if tasks is not None else BackgroundTasks(name).scope("bus")
        """Where the bus runs its background work (the event consumer): the process's tasks, handed in
        by the composition root; a bus used on its own (tests, tools) gets an owner of its own."""
        self.name = name
        self.user = user
        self.password = password
        self.on_register = on_register
        self.on_heartbeat = on_heartbeat
        self.on_disconnect = on_disconnect
        self.on_reconnect = on_reconnect
        self.ping_interval_s = ping_interval_s
        self.max_outstanding_pings = max_outstanding_pings
        """A connection is dropped as stale (and another server tried) after this many PINGs in a
        row went unanswered: a frozen server is left within ``ping_interval_s * (this + 1)``."""
        self.strict_inboxes = strict_inboxes
        self.site_limits = site_limits or SiteLimits()
        self.gate = SiteGate(self.site_limits)
        self.tls_ca, self.tls_cert, self.tls_key = tls_ca, tls_cert, tls_key
        self.stats = BusStats()
        self.epoch: Callable[[], int] = lambda: 0
        self.deciding: Callable[[], bool] = lambda: True
        """False while this process may not send the leader's commands (:data:`DECISIONS`): set by
        the composition root to the leadership's clock-read check, so a leader frozen past its
        lease sends nothing on waking, before its elector has even noticed."""
        """The controller's leader epoch now (``services/leadership.py`` sets it; 0: no election),
        stamped on every command that carries one, so agents refuse a deposed leader's commands."""
        self.nc: Any = None
        self._pings: set[asyncio.Future[None]] = set()
        """PINGs of :meth:`responsive` still out (held until they end)."""
        self._up = asyncio.Event()
        """Set while :attr:`nc` is connected (cleared on a disconnect, set again on the reconnect)."""
        self._generation = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        """The loop of the requests, kept: ``asyncio.get_running_loop()`` costs a ``getpid`` system
        call on Python 3.11 (see :meth:`_running_loop`)."""
        """Disconnects of :attr:`nc` so far: a request sent in an earlier generation was lost with it."""
        self._changed: asyncio.Future[None] | None = None
        """Resolved at the next disconnect or reconnect of :attr:`nc` (for :meth:`_next_connection`)."""
        self.sites_nc: Any = None
        """Second connection for what sites send (registrations, heartbeats, events)."""
        self._subs: list[Any] = []
        self._event_tasks: list[asyncio.Future[Any]] = []
        self._closing = False
        self._psubs: dict[str, Any] = {}
        self._events_in: Any = None
        # Non-streaming requests share one reply subscription (see _request).
        self._reply_prefix = f"{wire.HUB_INBOX_PREFIX}.{secrets.token_hex(8)}."
        self._reply_key = secrets.token_bytes(16)
        self._reply_n = 0
        self._waiting: dict[str, _Waiter] = {}
        """token -> the request waiting for its answer"""
        self._sweep: asyncio.TimerHandle | None = None
        """The one timer of every waiting request (:meth:`_due`), armed no later than the first due."""
        self._sweep_at = 0.0
        self._sweep_loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, _Stream] = {}
        """token -> a streaming request's messages (same reply subscription)"""
        self._stream_of: dict[str, _Stream] = {}
        """request id -> its stream, for :meth:`stream_ready`"""
        self._infer_subjects: dict[str, str] = {}

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<HubBus {state} malformed={self.stats.malformed} requests={self.stats.requests}>"

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    @property
    def server(self) -> str:
        """``host:port`` of the NATS server the hub's requests go through ("" while not connected)."""
        url = self.nc.connected_url if self.nc is not None else None
        return str(url.netloc) if url is not None else ""

    @property
    def clustered(self) -> bool:
        """Whether the connected server belongs to a cluster (the ``cluster`` field of its INFO;
        nats-py keeps INFO in a private attribute, read here only)."""
        info = getattr(self.nc, "_server_info", None) or {}
        return bool(info.get("cluster"))

    async def connect(self, timeout_s: float = 10.0) -> None:
        """Connect (retrying until ``timeout_s``) and subscribe to registrations and heartbeats."""
        self._loop = asyncio.get_running_loop()

        last_error: list[Exception] = []

        async def error_cb(exc: Exception) -> None:
            if isinstance(exc, nats.errors.SlowConsumerError):
                # A flood beyond what the hub keeps up with, dropped by nats-py: count it by kind,
                # cheaply (this runs once per dropped message), and say so once in a while.
                kind = "heartbeat" if exc.subject.endswith(".hb") else "other"
                self.stats.drop(kind, "queue_full")
                if self.stats.dropped[(kind, "queue_full")] % 10_000 == 1:
                    log.warning("event=nats_slow_consumer kind=%s dropped=%d", kind,
                                self.stats.dropped[(kind, "queue_full")])
                return
            self.stats.errors += 1
            last_error[:] = [exc]
            log.warning("event=nats_error error=%r", exc)

        async def disconnected_cb() -> None:
            if self._closing:  # our own close, not an outage
                return
            self._up.clear()
            self._generation += 1
            self._connection_changed()
            # What went out on the lost connection will not be answered on it: send again on the next.
            for waiter in self._waiting.values():
                if not waiter.future.done():
                    waiter.future.set_result(_RESEND)  # type: ignore[arg-type]
            for stream in self._streams.values():
                stream.drop()
            self.stats.disconnects += 1
            log.warning("event=nats_disconnected server=%s", nats_reconnect.current_netloc(self.nc))
            self.on_disconnect()

        async def reconnected_cb() -> None:
            self.stats.reconnects += 1
            self._up.set()
            self._connection_changed()
            log.info("event=nats_reconnected url=%s", self.nc.connected_url.netloc if self.nc else "?")
            self.on_reconnect()

        kwargs: dict[str, Any] = {}
        if self.user:
            kwargs["user"] = self.user
            kwargs["password"] = self.password or ""
        if self.tls_ca:
            try:
                kwargs["tls"] = tls.client_context(self.tls_ca, self.tls_cert, self.tls_key)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise BusUnavailable(f"NATS TLS files: {exc}") from None
        servers = [u.strip() for u in self.url.split(",") if u.strip()]
        if self.tls_ca:
            # nats-py upgrades to TLS when the server asks for it or the URL says tls://; say it
            # always, so a server without TLS is refused rather than spoken to in clear.
            servers = ["tls://" + u.split("://", 1)[-1] for u in servers]
        deadline = asyncio.get_running_loop().time() + timeout_s

        async def open_connection(name: str, **callbacks: Any) -> Any:
            held: list[Any] = []  # the client, for its reconnect handler (it reconnects only once connected)

            def pick(pool: list[Any], info: dict[str, Any]) -> tuple[Any, float]:
                left = nats_reconnect.current_netloc(held[0]) if held else ""
                return nats_reconnect.next_server(pool, left, wait_s=0.5)

            while True:
                try:
                    # nats-py retries a failing first connect forever when reconnects are on (a TLS
                    # verification error, say): bound it by our deadline.
                    remaining = max(deadline - asyncio.get_running_loop().time(), 0.5)
                    held[:] = [await asyncio.wait_for(nats.connect(
                        servers=servers,
                        name=name,
                        ping_interval=self.ping_interval_s,
                        max_outstanding_pings=self.max_outstanding_pings,
                        reconnect_to_server_handler=pick,
                        max_reconnect_attempts=-1,
                        reconnect_time_wait=0.5,
                        connect_timeout=2,
                        allow_reconnect=True,
                        inbox_prefix=wire.HUB_INBOX_PREFIX,
                        error_cb=error_cb,
                        pending_size=8 * 1024 * 1024,
                        **callbacks,
                        **kwargs,
                    ), remaining)]
                    return held[0]
                except (nats.errors.NoServersError, OSError, asyncio.TimeoutError) as exc:
                    if asyncio.get_running_loop().time() > deadline:
                        why = exc if str(exc) or not last_error else last_error[0]
                        raise BusUnavailable(f"cannot connect to NATS at {self.url}: {why}") from exc
                    await asyncio.sleep(0.2)

        self.nc = await open_connection(self.name, disconnected_cb=disconnected_cb, reconnected_cb=reconnected_cb)
        self._up.set()
        # Site traffic on a connection of its own: a site's flood fills that socket and that
        # connection's queues, not the one inference replies come back on.
        self.sites_nc = await open_connection(self.name + "-sites")
        limits = {"pending_msgs_limit": 1_000_000, "pending_bytes_limit": 256 * 1024 * 1024}
        # Heartbeats beyond what the hub keeps up with are dropped by nats-py (slow consumer) rather
        # than queued without bound: a heartbeat is superseded by the next one anyway.
        hb_limits = {"pending_msgs_limit": 20_000, "pending_bytes_limit": 64 * 1024 * 1024}
        self._subs.append(await self.sites_nc.subscribe(wire.REGISTER_WILDCARD, cb=self._on_register, **limits))
        self._subs.append(await self.sites_nc.subscribe(wire.HEARTBEAT_WILDCARD, cb=self._on_heartbeat, **hb_limits))
        # Answers are handed over at once from nats-py's reader (no queue, no task: see nats_fast).
        self._subs.append(await subscribe_now(self.nc, self._reply_prefix + "*", self._on_reply))
        await barrier(self.sites_nc)
        await barrier(self.nc)  # subscriptions live before connect() returns (one flush() is not enough)

    async def close(self) -> None:
        self._closing = True
        if self._event_tasks:
            await cancel_and_wait(self._event_tasks)  # the loops also check _closing
            self._event_tasks = []
        for stream, psub in list(self._psubs.items()):
            # A fetch reply landing after the consumer task was cancelled stays in the pull
            # subscription's queue, never marked done, and holds nc.drain() for its 30 s timeout.
            # Unsubscribing drops only our inbox; the durable consumer keeps its position.
            try:
                await psub.unsubscribe()
            except Exception:
                pass
            self._psubs.pop(stream, None)
        for nc in (self.sites_nc, self.nc):
            if nc is None:
                continue
            try:
                # Drain lets in-flight handlers answer; bounded, so a stuck reply cannot hold a stop.
                await asyncio.wait_for(nc.drain(), 5.0)
            except Exception:
                try:
                    await nc.close()
                except Exception:
                    pass
        for ping in list(self._pings):
            ping.cancel()
        self.nc = self.sites_nc = None
        self._up.clear()

    # ------------------------------------------------------------------ inbound

    def _refused(self, kind: Kind, msg: Msg) -> str | None:
        """Why ``msg`` (of ``kind``, on a site's subject) is dropped before decoding, or None."""
        site = wire.site_of(msg.subject)
        if site is None:
            reason: str | None = "subject"
        else:
            reason = self.gate.admit(kind, site, len(msg.data), asyncio.get_running_loop().time())
        if reason is not None:
            self.stats.drop(kind, reason)
            log.debug("event=site_message_dropped kind=%s subject=%s reason=%s", kind, msg.subject, reason)
        return reason

    async def _on_register(self, msg: Msg) -> None:
        if self._refused("register", msg) is not None:
            return
        try:
            decoded = wire.agent_message_decoder.decode(msg.data)
            if not isinstance(decoded, wire.Register):
                raise msgspec.ValidationError("expected a register message")
            subject_site = wire.site_of(msg.subject)
            if decoded.site != subject_site:
                raise msgspec.ValidationError(f"site {decoded.site!r} registering on {subject_site!r}'s subject")
            wire.check_id(decoded.site, "site")
            if self.strict_inboxes and msg.reply and not msg.reply.startswith(wire.inbox_prefix(decoded.site) + "."):
                # A site may only ask for answers in its own inbox; else it could aim the hub's
                # replies at another site.
                self.stats.bad("reply_spoof")
                self.stats.drop("register", "reply_spoof")
                log.warning("event=reply_spoof site=%s reply=%s", decoded.site, msg.reply)
                return
        except (msgspec.DecodeError, msgspec.ValidationError, wire.WireError) as exc:
            self.stats.bad("register")
            log.warning("event=malformed kind=register subject=%s error=%s", msg.subject, exc)
            if msg.reply:
                await self._respond(msg, wire.error_reply("bad_message", str(exc)))
            return
        try:
            answer = self.on_register(decoded)
        except Exception as exc:  # a bug in the core must still answer the agent
            log.exception("event=register_failed site=%s", decoded.site)
            answer = wire.ErrorReply(code="internal", message=f"hub failed: {exc}", retryable=True)
        if msg.reply:
            await self._respond(msg, wire.encode(answer))

    async def _on_heartbeat(self, msg: Msg) -> None:
        if self._refused("heartbeat", msg) is not None:
            return
        try:
            decoded = wire.agent_message_decoder.decode(msg.data)
            if not isinstance(decoded, wire.Heartbeat) or decoded.site != wire.site_of(msg.subject):
                raise msgspec.ValidationError("expected a heartbeat for the subject's site")
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.stats.bad("heartbeat")
            log.debug("event=malformed kind=heartbeat subject=%s error=%s", msg.subject, exc)
            return
        try:
            self.on_heartbeat(decoded)
        except Exception:
            log.exception("event=heartbeat_failed site=%s", decoded.site)

    async def _respond(self, msg: Msg, data: bytes) -> None:
        try:
            await msg.respond(data)
        except Exception as exc:
            self.stats.errors += 1
            log.warning("event=respond_failed subject=%s error=%r", msg.subject, exc)

    # ------------------------------------------------------------------ outbound

    def _require(self) -> Any:
        if self.nc is None or self.nc.is_closed:
            raise BusUnavailable("not connected to NATS")
        return self.nc

    async def _connected_nc(self) -> Any:
        """The connection, once it is connected: while it reconnects, wait up to
        :data:`RECONNECT_WAIT_S` for it (a request published meanwhile would only sit in nats-py's
        buffer while its site's acknowledgement timed out, and the site be called silent).

        Raises:
            BusUnavailable: closed, or still reconnecting after the wait.
        """
        nc = self._require()
        if nc.is_connected:
            return nc
        try:
            await asyncio.wait_for(self._up.wait(), RECONNECT_WAIT_S)
        except TimeoutError:
            raise BusUnavailable(f"the NATS connection is down (reconnecting for over {RECONNECT_WAIT_S:g} s)") from None
        return self._require()

    def _connection_changed(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None and not changed.done():
            changed.set_result(None)

    async def _next_connection(self, generation: int) -> Any:
        """The connection that replaced the one of ``generation``, once connected: waits for the
        stuck one to be found stale (``ping_interval_s * (max_outstanding_pings + 1)`` at most) and
        the next one to connect.

        Raises:
            BusUnavailable: not replaced and connected in that time (no NATS node answers).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ping_interval_s * (self.max_outstanding_pings + 1) + RECONNECT_WAIT_S
        while not (self._generation > generation and self._require().is_connected):
            left = deadline - loop.time()
            if left <= 0:
                raise BusUnavailable("the hub's NATS connection does not answer and was not replaced in time")
            if self._changed is None:
                self._changed = loop.create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._changed), left)
        return self.nc

    async def responsive(self, timeout_s: float) -> bool:
        """Whether the connection answers a PING within ``timeout_s`` (a frozen server does not,
        though its socket is open and nats-py still says connected)."""
        nc = self.nc
        if nc is None or not nc.is_connected:
            return False
        # Not ``flush(timeout=timeout_s)``: nats-py (2.16) cancels the PING's future on a timeout, and
        # a PONG coming later (a slow server, not a dead one) then fails in its reader, which stops
        # reading. The PING is left to its own longer timeout instead; we only stop waiting.
        ping = asyncio.ensure_future(nc.flush(timeout=PING_ABANDON_S))
        self._pings.add(ping)
        ping.add_done_callback(_retire_ping(self._pings))
        done, _ = await asyncio.wait({ping}, timeout=timeout_s)
        return bool(done) and not ping.cancelled() and ping.exception() is None

    def _on_reply(self, msg: Msg) -> None:
        token = msg.subject[len(self._reply_prefix):]
        waiter = self._waiting.get(token)
        if waiter is None:
            stream = self._streams.get(token)
            if stream is not None:
                stream.put(msg)
            return
        if waiter.future.done():
            return
        if msg.data.startswith(wire.ACCEPTED_PREFIX):
            if not waiter.acked:  # the site has it: now wait for the answer until the full timeout
                waiter.acked = True
                waiter.due = waiter.deadline  # later: the timer armed for the earlier due re-arms
            return
        if waiter.streamed and msg.data.startswith(wire.CHUNK_PREFIX):
            # A stream that comes in pieces: its later messages queue on a stream of their own
            # from now on (the waiter is done with the first).
            del self._waiting[token]
            stream = waiter.stream = self._streams[token] = _Stream(waiter.site, self._loop)
            stream.token = token
        waiter.future.set_result(msg)

    def fail_requests(self, site: str) -> int:
        """Fail at once every request waiting on ``site`` (declared lost: no need to wait out the
        timeout, the caller fails over). Returns how many."""
        failed = 0
        for waiter in list(self._waiting.values()):
            if waiter.site == site and not waiter.future.done():
                waiter.future.set_result(_LOST)  # type: ignore[arg-type]
                failed += 1
        for stream in list(self._streams.values()):  # streams too, mid-answer: not at their idle timeout
            if stream.site == site and not stream.lost:
                stream.lose()
                failed += 1
        return failed

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _due(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        """A request's wait ends at ``due`` (loop time): the one timer of all requests is armed for
        it unless already due by then. One timer for every request, not one armed and cancelled per
        request (about 1.9 us each on uvloop): it fires about once per timeout period while answers
        come in time, and ends the waits that are due."""
        sweep = self._sweep
        if sweep is None or self._sweep_at > due or self._sweep_loop is not loop:
            if sweep is not None:
                sweep.cancel()
            self._sweep_at, self._sweep_loop = due, loop
            self._sweep = loop.call_at(due, self._on_sweep, loop)

    def _on_sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """End every wait that is due (no message: the request's timeout), re-arm for the next."""
        self._sweep = None
        now = loop.time() + _TIMER_SLACK_S
        next_due: float | None = None
        for waiter in self._waiting.values():
            if waiter.future.done():
                continue
            if waiter.due <= now:
                waiter.future.set_result(None)
            elif next_due is None or waiter.due < next_due:
                next_due = waiter.due
        if next_due is not None:
            self._sweep_at, self._sweep_loop = next_due, loop
            self._sweep = loop.call_at(next_due, self._on_sweep, loop)

    def _token(self) -> str:
        """A reply token: a keyed hash of a counter (unguessable, cheaper than fresh random bytes)."""
        self._reply_n += 1
        return hashlib.blake2b(self._reply_n.to_bytes(8, "big"), key=self._reply_key, digest_size=12).hexdigest()

    async def _request(self, subject: str, data: bytes, timeout_s: float, who: str,
                       ack_timeout_s: float | None = None, streamed: bool = False) -> tuple[Msg, _Stream | None]:
        """Request/reply over the hub's one reply subscription.

        The protocol of nats-py's ``request`` (one wildcard inbox, a token per request), built for the
        hot path: the token is a keyed hash of a counter rather than fresh random bytes (a site that
        sees its own requests' reply subjects still cannot guess another's), and the bus's one timer
        for every waiting request (:meth:`_due`) replaces ``asyncio.wait_for``.

        With ``ack_timeout_s`` (the request asked for :class:`wire.InferAccepted`), the site must
        answer or acknowledge within that time, then answer within ``timeout_s`` of the start.

        Returns the first message, and for a ``streamed`` request whose first message is a chunk,
        the :class:`_Stream` its later messages come on (else None): a stream answered whole is
        waited for exactly as a plain request is.

        Raises:
            SiteUnreachable: no answer within ``timeout_s`` (or no acknowledgement within
                ``ack_timeout_s``), no responders, or the site was declared lost meanwhile
                (:meth:`fail_requests`); ``who`` names the site.
            BusUnavailable: the connection is closed.
        """
        nc = self.nc
        if nc is None or not nc.is_connected:
            nc = await self._connected_nc()
        token = self._token()
        loop = self._running_loop()
        future: asyncio.Future[Msg | None] = loop.create_future()
        asked_ack = ack_timeout_s is not None and ack_timeout_s < timeout_s
        first_wait = ack_timeout_s if ack_timeout_s is not None and asked_ack else timeout_s
        now = loop.time()
        waiter = _Waiter(future, who, now + first_wait, now + timeout_s, not asked_ack, streamed)
        self._waiting[token] = waiter
        self._due(loop, waiter.due)
        resent = False
        try:
            while True:
                generation = self._generation
                if not publish_soon(nc, subject, data, self._reply_prefix + token):
                    await nc.publish(subject, data, reply=self._reply_prefix + token)
                msg = await waiter.future
                if msg is _RESEND:
                    if resent:
                        raise BusUnavailable("the hub's NATS connection dropped twice during one request")
                elif msg is not None or waiter.acked or resent or await self.responsive(BUS_PROBE_S):
                    break  # an answer, or a silence that is the site's (our connection answers)
                # The connection it went out on is gone or stuck (a frozen server): once more on the
                # next one, the acknowledgement due anew, the answer by the same deadline.
                nc = await self._next_connection(generation)
                resent = True
                self.stats.resent += 1
                waiter.future = loop.create_future()
                waiter.acked = not asked_ack
                now = loop.time()
                waiter.due = now + min(first_wait, max(waiter.deadline - now, 0.001))
                self._due(loop, waiter.due)
        except nats.errors.ConnectionClosedError as exc:
            raise BusUnavailable(str(exc)) from None
        except BaseException:
            if waiter.stream is not None:  # its first chunk came, then the wait was cancelled
                self._end_stream(waiter.stream, "")
            raise
        finally:
            self._waiting.pop(token, None)  # gone already when a chunk came first
        if msg is None:
            if not waiter.acked:
                self.stats.ack_timeouts += 1
                raise SiteSilent(f"{who}: no acknowledgement within {first_wait * 1000:.0f} ms")
            self.stats.timeouts += 1
            raise SiteUnreachable(f"{who}: no answer within {timeout_s * 1000:.0f} ms")
        if msg is _LOST:
            raise SiteUnreachable(f"{who} was declared lost while serving the request")
        if msg.headers and msg.headers.get("Status") == _NO_RESPONDERS:
            self.stats.no_responders += 1
            raise SiteAbsent(f"{who}: no responders")
        return msg, waiter.stream

    async def infer(self, site: str, req: wire.InferRequest, timeout_s: float,
                    ack_timeout_s: float | None = None) -> wire.InferResult:
        """One non-streaming inference at ``site``; with ``ack_timeout_s``, see :meth:`_request`
        (``req.ack`` must be set, and the site must be one that acknowledges).

        Raises:
            SiteUnreachable: timeout, no acknowledgement or no responders.
            SiteRefused: the site answered with an ErrorReply.
        """
        self.stats.requests += 1
        subject = self._infer_subjects.get(site)
        if subject is None:
            subject = self._infer_subjects[site] = wire.infer_subject(site)
        msg, _ = await self._request(subject, wire.encode(req), timeout_s, site, ack_timeout_s)
        return self._decode_result(site, msg.data)

    def _decode_result(self, site: str, data: bytes) -> wire.InferResult:
        try:
            reply = wire.infer_reply_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.stats.bad("infer_reply")
            raise SiteRefused("bad_message", f"{site} sent a malformed reply: {exc}", True) from None
        if isinstance(reply, wire.ErrorReply):
            raise SiteRefused(reply.code, reply.message, reply.retryable)
        if isinstance(reply, (wire.InferChunk, wire.InferAccepted)):
            self.stats.bad("infer_reply")
            raise SiteRefused("bad_message", f"{site} sent a {type(reply).__name__} as its answer", True)
        if reply.site != site:
            self.stats.bad("infer_reply")
            raise SiteRefused("bad_message", f"a reply for {site} came from {reply.site}", True)
        return reply

    async def infer_stream(
        self, site: str, req: wire.InferRequest, first_timeout_s: float, idle_timeout_s: float = 30.0,
        ack_timeout_s: float | None = None,
    ) -> tuple[wire.InferChunk | wire.InferResult, AsyncIterator[wire.InferChunk | wire.InferResult] | None]:
        """Streaming inference: the first message, and the iterator of the rest (None when the
        first is already the final result: the whole answer came at once).

        The first message is waited for as a plain request's answer (:meth:`_request`: the same
        waiter, timer, acknowledgement and resending), so a stream answered whole costs what a
        plain request costs; only one that comes in pieces gets a queue and a timer of its own
        (:class:`_Stream`, read by :class:`_Rest`), and must then be closed (``aclose``) if not read
        to its end. The first message must arrive within ``first_timeout_s`` (so the caller can
        still fail over); later ones within ``idle_timeout_s`` each. With ``ack_timeout_s``, the
        site must send something (its acknowledgement, or the first chunk) within that time.

        Raises:
            SiteUnreachable: timeout, no acknowledgement or no responders.
            SiteRefused: the site answered with an ErrorReply (or something malformed).
        """
        self.stats.requests += 1
        subject = self._infer_subjects.get(site)
        if subject is None:
            subject = self._infer_subjects[site] = wire.infer_subject(site)
        msg, stream = await self._request(subject, wire.encode(req), first_timeout_s, site, ack_timeout_s, True)
        if stream is None:
            return self._decode_result(site, msg.data), None
        rest = _Rest(self, stream, site, req.request_id, idle_timeout_s)
        try:
            first = rest.read(msg)
        except BaseException:
            rest.close()
            raise
        assert isinstance(first, wire.InferChunk)  # it starts as one (``wire.CHUNK_PREFIX``)
        self._stream_of[req.request_id] = stream
        return first, rest

    def _end_stream(self, stream: _Stream, request_id: str) -> None:
        """A stream is over: its timer goes, and it is forgotten."""
        stream.close()
        if self._streams.get(stream.token) is stream:
            del self._streams[stream.token]
        if self._stream_of.get(request_id) is stream:
            del self._stream_of[request_id]

    def stream_ready(self, request_id: str) -> bool:
        """Whether the stream of ``request_id`` has its next message here already (taking it will
        not wait): a relay may then hold what it writes and send both together."""
        stream = self._stream_of.get(request_id)
        return stream is not None and stream.ready()

    async def command(self, site: str, cmd: Any, timeout_s: float = 2.0) -> wire.Ack:
        """Send a command (StartAttempt, LoadModel, ...), stamped with the leader's epoch, and wait
        for its Ack."""
        nc = self._require()
        if isinstance(cmd, DECISIONS) and not self.deciding():
            # A deposed (or frozen and just resumed) leader's sender: nothing leaves; the entry stays
            # for whoever leads here next. The epoch below is the agents' second line.
            raise BusUnavailable(f"{site}: this process does not lead (a {type(cmd).__name__} is the leader's)")
        if isinstance(cmd, wire.EPOCH_COMMANDS):
            epoch = self.epoch()
            if epoch and cmd.epoch != epoch:
                cmd = msgspec.structs.replace(cmd, epoch=epoch)
        try:
            msg = await nc.request(wire.cmd_subject(site), wire.encode(cmd), timeout=timeout_s)
        except nats.errors.NoRespondersError:
            raise SiteUnreachable(f"{site}: no responders") from None
        except nats.errors.TimeoutError:
            raise SiteUnreachable(f"{site}: no answer within {timeout_s * 1000:.0f} ms") from None
        except nats.errors.ConnectionClosedError as exc:
            raise BusUnavailable(str(exc)) from None
        try:
            reply = wire.command_reply_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.stats.bad("cmd_reply")
            raise SiteRefused("bad_message", f"{site} sent a malformed reply: {exc}") from None
        if isinstance(reply, wire.ErrorReply):
            raise SiteRefused(reply.code, reply.message, reply.retryable)
        return reply

    async def publish_command(self, site: str, cmd: Any) -> None:
        """Fire-and-forget command (e.g. CancelInfer); failures are logged, not raised."""
        try:
            nc = self._require()
            await nc.publish(wire.cmd_subject(site), wire.encode(cmd))
        except Exception as exc:
            log.debug("event=publish_command_failed site=%s error=%r", site, exc)

    # ------------------------------------------------------------------ JetStream events

    def event_stream_config(self, replicas: int = 1, region: str | None = None, shares: int = 1) -> StreamConfig:
        """``CPN_EVENTS`` (with ``region``: that region's ``CPN_EVENTS_<region>``, placed in the
        region by its JetStream server tag): what the hub stores for sites, bounded per site and in
        total. With regional streams the total (``stream_max_bytes``) is split evenly over the
        ``shares`` streams, so the account's JetStream storage holds them all.

        Interest retention: an event the hub has acknowledged is gone, so a site's count in the
        stream is its backlog. ``max_msgs_per_subject`` with ``discard_new_per_subject`` refuses a
        site's events beyond its own backlog limit (it retries later) and never pushes out another
        site's; ``max_bytes`` with DiscardNew refuses rather than deletes too.
        """
        lim = self.site_limits
        return StreamConfig(
            name=wire.EVENTS_STREAM if region is None else regional_events_stream(region),
            subjects=[STORED_EVENTS_WILDCARD if region is None else f"{STORED_EVENTS_ROOT}.{region}.*"],
            placement=None if region is None else Placement(tags=[f"region:{region}"]),
            retention=RetentionPolicy.INTEREST,
            storage=StorageType.FILE,
            duplicate_window=120.0,
            num_replicas=replicas,
            max_age=7 * 24 * 3600.0,
            max_msg_size=lim.max_event_bytes,
            max_bytes=lim.stream_max_bytes // max(1, shares),
            max_msgs_per_subject=lim.stream_max_msgs_per_site,
            discard=DiscardPolicy.NEW,
            discard_new_per_subject=True,
        )

    async def ensure_event_stream(self, replicas: int = 1, *, durable: str = "hub",
                                  regions: Mapping[str, int] | None = None) -> None:
        """Create ``CPN_EVENTS`` (or update it to the limits above: a stream made by an older hub
        had none and captured the sites' own ``evt`` subjects), its durable consumer, and start
        taking events from sites. ``regions`` (region id -> replicas): also each region's stream,
        placed in that region, and its consumer."""
        nc = self._require()
        js = nc.jetstream()
        shares = 1 + len(regions or {})
        try:
            await self._ensure_stream(js, self.event_stream_config(replicas, shares=shares), durable)
            for region, n in sorted((regions or {}).items()):
                config = self.event_stream_config(n, region, shares)
                await self._ensure_stream(js, config, durable)
                if config.name not in self._event_streams:
                    self._event_streams.append(str(config.name))
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.errors.ConnectionReconnectingError,
                nats.js.errors.ServiceUnavailableError, nats.js.errors.ServerError, asyncio.TimeoutError) as exc:
            # JetStream without a meta or stream leader (nodes down, an election under way): not now.
            raise BusUnavailable(f"JetStream cannot make the event streams now: {exc!r}") from None
        if self._events_in is None:
            self._events_in = await self.sites_nc.subscribe(
                wire.EVENT_WILDCARD, queue=EVENTS_QUEUE, cb=self._on_site_event,
                pending_msgs_limit=100_000, pending_bytes_limit=64 * 1024 * 1024,
            )
            self._subs.append(self._events_in)
            await barrier(self.sites_nc)

    async def _ensure_stream(self, js: Any, config: StreamConfig, durable: str) -> None:
        stream = str(config.name)
        # The consumer exists before any event is stored: with interest retention a message no
        # consumer is interested in is dropped. A stream an older hub made (limits retention, the
        # sites' own subjects, a consumer filtered on them) gets its consumer replaced first,
        # from where it had got to, while limits retention still keeps every message; then the
        # stream is updated. Updating the consumer's filter in place is not enough: nats-server
        # 2.15.1 then still drops events on the new subjects as "no interest" (measured).
        try:
            await js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            await js.add_stream(config=config)
            await self._ensure_consumer(js, durable, stream)
        else:
            await self._ensure_consumer(js, durable, stream)
            await js.update_stream(config=config)

    @staticmethod
    async def _ensure_consumer(js: Any, durable: str, stream: str = wire.EVENTS_STREAM) -> None:
        """The durable consumer of the whole stream (no filter), keeping an older one's position."""
        try:
            info = await js.consumer_info(stream, durable)
        except nats.js.errors.NotFoundError:
            await js.add_consumer(stream, _consumer_config(durable, stream=stream))
            return
        if not info.config.filter_subject and not info.config.filter_subjects:
            return
        await js.delete_consumer(stream, durable)
        await js.add_consumer(stream, _consumer_config(durable, start_seq=info.ack_floor.stream_seq + 1, stream=stream))

    async def _on_site_event(self, msg: Msg) -> None:
        """A site's event: checked, stored under the hub's subject, PubAck relayed to the site."""
        site = wire.site_of(msg.subject)
        if site is None:
            self.stats.drop("event", "subject")
            return
        if not msg.reply.startswith(wire.inbox_prefix(site) + "."):
            # The answer would go where the site chose: another site's subject or inbox. Nothing
            # is stored and nothing is sent.
            self.stats.drop("event", "reply_spoof")
            log.warning("event=reply_spoof kind=event site=%s reply=%s", site, msg.reply)
            return
        reason = self.gate.admit("event", site, len(msg.data), asyncio.get_running_loop().time())
        msg_id = msg.headers.get(MSG_ID_HEADER, "") if msg.headers else ""
        if reason is None and not msg_id:
            reason = "no_msg_id"
        if reason is not None:
            self.stats.drop("event", reason)
            code = {"oversize": 413, "rate": 429}.get(reason, 400)
            await self._respond(msg, _js_error(code, f"event refused by the hub: {reason}"))
            return
        try:
            ack = await self._require().request(
                stored_event_subject(site, self.event_region_of(site)), msg.data, timeout=2.0,
                headers={MSG_ID_HEADER: msg_id})
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.errors.ConnectionClosedError) as exc:
            self.stats.errors += 1
            log.warning("event=event_store_failed site=%s error=%r", site, exc)
            return  # no answer: the agent retries
        await self._respond(msg, ack.data)

    def consume_events(self, handler: EventHandler, *, durable: str = "hub", batch: int = 256) -> None:
        """Start a durable pull consumer feeding ``handler``; a message is acked after it returns.

        A handler that raises leaves the message un-acked, so JetStream redelivers it (the hub
        applies events idempotently by ``job:attempt:seq``).
        """
        if any(not t.done() for t in self._event_tasks):
            return  # one consumer per stream and process (a leader that leads again resumes the same ones)
        self._event_tasks = [self.tasks.spawn(self._consume(handler, durable, batch, stream), f"event-consumer-{stream}")
                             for stream in self._event_streams]

    async def stop_consuming(self) -> None:
        """Stop taking events (this process stopped leading); un-acked ones go to the next consumer
        of the same durable after their ack wait, acked ones are never delivered again."""
        if self._event_tasks:
            await cancel_and_wait(self._event_tasks)
            self._event_tasks = []
        for stream, psub in list(self._psubs.items()):
            with contextlib.suppress(Exception):
                await psub.unsubscribe()
            self._psubs.pop(stream, None)

    async def _consume(self, handler: EventHandler, durable: str, batch: int, stream: str = wire.EVENTS_STREAM) -> None:
        psub = None
        regional = stream != wire.EVENTS_STREAM
        while not self._closing:
            try:
                if psub is None:
                    js = self._require().jetstream()
                    await self._ensure_consumer(js, durable, stream)
                    psub = await js.pull_subscribe_bind(durable=durable, stream=stream)
                    self._psubs[stream] = psub
                try:
                    # One at a time where one is in flight (a regional stream): a larger batch would
                    # wait out the timeout for messages the server will not send.
                    msgs = await psub.fetch(min(batch, _max_ack_pending(stream)), timeout=1.0)
                except (nats.errors.TimeoutError, asyncio.TimeoutError):
                    # Nothing to fetch. nats-py raises a bare asyncio.TimeoutError when a busy loop
                    # has already used up the deadline: that is no fault of the subscription either.
                    # On a regional stream "nothing" may be a delivery lost on a cut link, holding
                    # the backlog behind it for an ack wait: ask the consumer what it holds.
                    if regional:
                        await self._note_backlog(durable, stream)
                    continue
                for msg in msgs:
                    await self._apply_event(handler, msg)
                    if regional:
                        with contextlib.suppress(ValueError, AttributeError, TypeError):
                            self.events_backlog[stream] = int(msg.metadata.num_pending)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.stats.errors += 1
                log.warning("event=event_consumer_error stream=%s error=%r", stream, exc)
                if psub is not None:  # do not leave its inbox subscription (and late replies) behind
                    with contextlib.suppress(Exception):
                        await psub.unsubscribe()
                psub = None
                self._psubs.pop(stream, None)
                await asyncio.sleep(0.5)

    async def _note_backlog(self, durable: str, stream: str) -> None:
        """The consumer's pending and unacknowledged events into :attr:`events_backlog` (unchanged if
        it does not answer within a second: a cut link; its sites' heartbeats do not arrive either)."""
        try:
            info = await self._require().jetstream().consumer_info(stream, durable, timeout=1.0)
        except Exception:  # a cut, a reconnect: the last figure stands
            return
        self.events_backlog[stream] = int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    def events_behind(self, site: str) -> bool:
        """Events of ``site`` may be stored and not yet applied here: its region's stream had a
        backlog when last seen. False for a site whose events go to ``CPN_EVENTS`` (they travel with
        its heartbeats)."""
        region = self.event_region_of(site)
        return region is not None and self.events_backlog.get(regional_events_stream(region), 0) > 0

    async def _apply_event(self, handler: EventHandler, msg: Msg) -> None:
        try:
            event = wire.event_decoder.decode(msg.data)
            if event.site != site_of_stored(msg.subject):
                raise msgspec.ValidationError(f"event for site {event.site!r} on {msg.subject}")
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.stats.bad("event")
            log.warning("event=malformed kind=event subject=%s error=%s", msg.subject, exc)
            await msg.ack()  # poison: never redeliver
            return
        try:
            await handler(event)
        except Exception:
            log.exception("event=event_apply_failed job=%s attempt=%s seq=%s", event.job, event.attempt, event.seq)
            await msg.nak(delay=1.0)
            return
        self.stats.events += 1
        await msg.ack()

    # ------------------------------------------------------------------ hub to hub (soft state)

    async def publish_hub(self, subject: str, data: bytes) -> None:
        """Publish soft state to the other hub processes (e.g. a gateway's demand counts); raises
        :class:`BusUnavailable` when not connected."""
        await self._require().publish(subject, data)

    async def subscribe_hub(self, subject: str, handler: Callable[[bytes], None]) -> None:
        """Hand every message on ``subject`` to ``handler`` (synchronous; it counts and drops what it
        cannot use). Live when this returns."""
        nc = self._require()

        async def on_msg(msg: Msg) -> None:
            try:
                handler(msg.data)
            except Exception:
                self.stats.bad("hub")
                log.exception("event=hub_message_failed subject=%s", msg.subject)

        self._subs.append(await nc.subscribe(subject, cb=on_msg))
        await barrier(nc)

    def malformed(self, kind: str) -> None:
        """Count a malformed message a handler of :meth:`subscribe_hub` dropped."""
        self.stats.bad(kind)
