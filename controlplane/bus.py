"""The hub's NATS adapter: the only hub code that imports ``nats``.

It carries decisions out and brings messages in; it decides nothing. nats-py's exceptions are
translated here (timeouts and no-responders become :class:`SiteUnreachable`, an ``ErrorReply`` becomes
:class:`SiteRefused`), so nothing above this module sees a nats type.

Connection settings follow DESIGN §3: ping every second with two outstanding (a dead server is
noticed in about 3 s, not minutes), reconnect forever, callbacks that log and count.
Malformed messages from agents are counted (``malformed``) and dropped, or answered with an
``ErrorReply`` when they carry a reply subject.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

from controlplane.errors import BusUnavailable, SiteRefused, SiteSilent, SiteUnreachable
from controlplane.runtime import cancel_and_wait
from edge_agent import wire
from edge_agent.nats_barrier import barrier

log = logging.getLogger("cpn.bus")

_LOST = object()
"""What a request's future holds when its site was declared lost before it answered."""

_NO_RESPONDERS = "503"
"""The status header nats-server sets on the reply to a request nobody subscribed to."""


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_result(None)  # a request's timeout: no message


class _Waiter:
    """One request waiting on the shared reply subscription."""

    __slots__ = ("future", "site", "timer", "deadline", "acked")

    def __init__(self, future: asyncio.Future[Msg | None], site: str, timer: asyncio.TimerHandle,
                 deadline: float, acked: bool) -> None:
        self.future = future
        self.site = site
        self.timer = timer
        self.deadline = deadline
        """Loop time the answer is due by, once the site has acknowledged the request."""
        self.acked = acked
        """True once an InferAccepted came (or when none was asked for)."""

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
    no_responders: int = 0
    events: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)

    def bad(self, kind: str) -> None:
        self.malformed += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1


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
        ping_interval_s: float = 1.0,
        strict_inboxes: bool = False,
    ) -> None:
        self.url = url
        self.name = name
        self.user = user
        self.password = password
        self.on_register = on_register
        self.on_heartbeat = on_heartbeat
        self.on_disconnect = on_disconnect
        self.on_reconnect = on_reconnect
        self.ping_interval_s = ping_interval_s
        self.strict_inboxes = strict_inboxes
        self.stats = BusStats()
        self.nc: Any = None
        self._subs: list[Any] = []
        self._event_task: asyncio.Task[None] | None = None
        self._closing = False
        self._psub: Any = None
        # Non-streaming requests share one reply subscription (see _request).
        self._reply_prefix = f"{wire.HUB_INBOX_PREFIX}.{secrets.token_hex(8)}."
        self._reply_key = secrets.token_bytes(16)
        self._reply_n = 0
        self._waiting: dict[str, _Waiter] = {}
        """token -> the request waiting for its answer"""
        self._infer_subjects: dict[str, str] = {}

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<HubBus {state} malformed={self.stats.malformed} requests={self.stats.requests}>"

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def connect(self, timeout_s: float = 10.0) -> None:
        """Connect (retrying until ``timeout_s``) and subscribe to registrations and heartbeats."""

        async def error_cb(exc: Exception) -> None:
            self.stats.errors += 1
            log.warning("event=nats_error error=%r", exc)

        async def disconnected_cb() -> None:
            if self._closing:  # our own close, not an outage
                return
            self.stats.disconnects += 1
            log.warning("event=nats_disconnected")
            self.on_disconnect()

        async def reconnected_cb() -> None:
            self.stats.reconnects += 1
            log.info("event=nats_reconnected url=%s", self.nc.connected_url.netloc if self.nc else "?")
            self.on_reconnect()

        kwargs: dict[str, Any] = {}
        if self.user:
            kwargs["user"] = self.user
            kwargs["password"] = self.password or ""
        servers = [u.strip() for u in self.url.split(",") if u.strip()]
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                self.nc = await nats.connect(
                    servers=servers,
                    name=self.name,
                    ping_interval=self.ping_interval_s,
                    max_outstanding_pings=2,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    connect_timeout=2,
                    allow_reconnect=True,
                    inbox_prefix=wire.HUB_INBOX_PREFIX,
                    error_cb=error_cb,
                    disconnected_cb=disconnected_cb,
                    reconnected_cb=reconnected_cb,
                    pending_size=8 * 1024 * 1024,
                    **kwargs,
                )
                break
            except (nats.errors.NoServersError, OSError, asyncio.TimeoutError) as exc:
                if asyncio.get_running_loop().time() > deadline:
                    raise BusUnavailable(f"cannot connect to NATS at {self.url}: {exc}") from exc
                await asyncio.sleep(0.2)
        limits = {"pending_msgs_limit": 1_000_000, "pending_bytes_limit": 256 * 1024 * 1024}
        self._subs.append(await self.nc.subscribe(wire.REGISTER_WILDCARD, cb=self._on_register, **limits))
        self._subs.append(await self.nc.subscribe(wire.HEARTBEAT_WILDCARD, cb=self._on_heartbeat, **limits))
        self._subs.append(await self.nc.subscribe(self._reply_prefix + "*", cb=self._on_reply, **limits))
        await barrier(self.nc)  # subscriptions live before connect() returns (one flush() is not enough)

    async def close(self) -> None:
        self._closing = True
        if self._event_task is not None:
            await cancel_and_wait([self._event_task])  # the loop also checks _closing
            self._event_task = None
        if self._psub is not None:
            # A fetch reply landing after the consumer task was cancelled stays in the pull
            # subscription's queue, never marked done, and holds nc.drain() for its 30 s timeout.
            # Unsubscribing drops only our inbox; the durable consumer keeps its position.
            try:
                await self._psub.unsubscribe()
            except Exception:
                pass
            self._psub = None
        if self.nc is not None:
            try:
                # Drain lets in-flight handlers answer; bounded, so a stuck reply cannot hold a stop.
                await asyncio.wait_for(self.nc.drain(), 5.0)
            except Exception:
                try:
                    await self.nc.close()
                except Exception:
                    pass
            self.nc = None

    # ------------------------------------------------------------------ inbound

    async def _on_register(self, msg: Msg) -> None:
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

    async def _on_reply(self, msg: Msg) -> None:
        waiter = self._waiting.get(msg.subject[len(self._reply_prefix):])
        if waiter is None or waiter.future.done():
            return
        if msg.data.startswith(wire.ACCEPTED_PREFIX):
            if not waiter.acked:  # the site has it: now wait for the answer until the full timeout
                waiter.acked = True
                waiter.timer.cancel()
                waiter.timer = asyncio.get_running_loop().call_at(waiter.deadline, _expire, waiter.future)
            return
        waiter.future.set_result(msg)

    def fail_requests(self, site: str) -> int:
        """Fail at once every request waiting on ``site`` (declared lost: no need to wait out the
        timeout, the caller fails over). Returns how many."""
        failed = 0
        for waiter in list(self._waiting.values()):
            if waiter.site == site and not waiter.future.done():
                waiter.future.set_result(_LOST)  # type: ignore[arg-type]
                failed += 1
        return failed

    async def _request(self, subject: str, data: bytes, timeout_s: float, who: str,
                       ack_timeout_s: float | None = None) -> Msg:
        """Request/reply over the hub's one reply subscription.

        The protocol of nats-py's ``request`` (one wildcard inbox, a token per request), built for the
        hot path: the token is a keyed hash of a counter rather than fresh random bytes (a site that
        sees its own requests' reply subjects still cannot guess another's), and a plain timer
        replaces ``asyncio.wait_for``.

        With ``ack_timeout_s`` (the request asked for :class:`wire.InferAccepted`), the site must
        answer or acknowledge within that time, then answer within ``timeout_s`` of the start.

        Raises:
            SiteUnreachable: no answer within ``timeout_s`` (or no acknowledgement within
                ``ack_timeout_s``), no responders, or the site was declared lost meanwhile
                (:meth:`fail_requests`); ``who`` names the site.
            BusUnavailable: the connection is closed.
        """
        nc = self._require()
        self._reply_n += 1
        token = hashlib.blake2b(self._reply_n.to_bytes(8, "big"), key=self._reply_key, digest_size=12).hexdigest()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Msg | None] = loop.create_future()
        asked_ack = ack_timeout_s is not None and ack_timeout_s < timeout_s
        first_wait = ack_timeout_s if ack_timeout_s is not None and asked_ack else timeout_s
        waiter = _Waiter(future, who, loop.call_later(first_wait, _expire, future), loop.time() + timeout_s,
                         not asked_ack)
        self._waiting[token] = waiter
        try:
            await nc.publish(subject, data, reply=self._reply_prefix + token)
            msg = await future
        except nats.errors.ConnectionClosedError as exc:
            raise BusUnavailable(str(exc)) from None
        finally:
            waiter.timer.cancel()
            del self._waiting[token]
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
            raise SiteUnreachable(f"{who}: no responders")
        return msg

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
        msg = await self._request(subject, wire.encode(req), timeout_s, site, ack_timeout_s)
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
    ) -> AsyncIterator[wire.InferChunk | wire.InferResult]:
        """Streaming inference: yields chunks, then the final result.

        The first chunk must arrive within ``first_timeout_s`` (so the caller can still fail over);
        later ones within ``idle_timeout_s`` each. With ``ack_timeout_s``, the site must send
        something (its acknowledgement, or the first chunk) within that time.
        """
        nc = self._require()
        self.stats.requests += 1
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        try:
            await nc.publish(wire.infer_subject(site), wire.encode(req), reply=inbox)
            loop = asyncio.get_running_loop()
            first_due = loop.time() + first_timeout_s
            awaiting_ack = ack_timeout_s is not None and ack_timeout_s < first_timeout_s
            timeout = ack_timeout_s if awaiting_ack and ack_timeout_s is not None else first_timeout_s
            first = True
            while True:
                try:
                    msg = await sub.next_msg(timeout=max(timeout, 0.001))
                except nats.errors.TimeoutError:
                    if awaiting_ack:
                        self.stats.ack_timeouts += 1
                        raise SiteSilent(f"{site}: no acknowledgement within {timeout * 1000:.0f} ms") from None
                    self.stats.timeouts += 1
                    raise SiteUnreachable(f"{site}: no answer within {first_timeout_s * 1000:.0f} ms" if first
                                          else f"{site}: no chunk within {idle_timeout_s * 1000:.0f} ms") from None
                if first and msg.headers and msg.headers.get("Status") == "503":
                    self.stats.no_responders += 1
                    raise SiteUnreachable(f"{site}: no responders")
                awaiting_ack = False
                if first and msg.data.startswith(wire.ACCEPTED_PREFIX):
                    timeout = first_due - loop.time()  # the site has it: the first chunk is due as before
                    continue
                first = False
                timeout = idle_timeout_s
                try:
                    reply = wire.infer_reply_decoder.decode(msg.data)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    self.stats.bad("infer_chunk")
                    raise SiteRefused("bad_message", f"{site} sent a malformed chunk: {exc}", False) from None
                if isinstance(reply, wire.ErrorReply):
                    raise SiteRefused(reply.code, reply.message, reply.retryable)
                if isinstance(reply, wire.InferAccepted):
                    continue  # a repeat: nothing to relay
                yield reply
                if isinstance(reply, wire.InferResult):
                    return
        finally:
            try:
                await sub.unsubscribe()
            except Exception:
                pass

    async def command(self, site: str, cmd: Any, timeout_s: float = 2.0) -> wire.Ack:
        """Send a command (StartAttempt, LoadModel, ...) and wait for its Ack."""
        nc = self._require()
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

    async def ensure_event_stream(self, replicas: int = 1) -> None:
        """Create (or update) the ``CPN_EVENTS`` stream: file storage, 2-minute duplicate window."""
        js = self._require().jetstream()
        config = StreamConfig(
            name=wire.EVENTS_STREAM,
            subjects=[wire.EVENT_WILDCARD],
            storage=StorageType.FILE,
            duplicate_window=120.0,
            num_replicas=replicas,
            max_age=7 * 24 * 3600.0,
        )
        try:
            await js.add_stream(config=config)
        except nats.js.errors.BadRequestError:
            await js.update_stream(config=config)

    def consume_events(self, handler: EventHandler, *, durable: str = "hub", batch: int = 256) -> None:
        """Start a durable pull consumer feeding ``handler``; a message is acked after it returns.

        A handler that raises leaves the message un-acked, so JetStream redelivers it (the hub
        applies events idempotently by ``job:attempt:seq``).
        """
        self._event_task = asyncio.create_task(self._consume(handler, durable, batch), name="event-consumer")

    async def _consume(self, handler: EventHandler, durable: str, batch: int) -> None:
        psub = None
        while not self._closing:
            try:
                if psub is None:
                    js = self._require().jetstream()
                    psub = await js.pull_subscribe(
                        wire.EVENT_WILDCARD,
                        durable=durable,
                        stream=wire.EVENTS_STREAM,
                        config=ConsumerConfig(
                            ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, ack_wait=30.0,
                            max_ack_pending=10_000,
                        ),
                    )
                    self._psub = psub
                try:
                    msgs = await psub.fetch(batch, timeout=1.0)
                except (nats.errors.TimeoutError, asyncio.TimeoutError):
                    # Nothing to fetch. nats-py raises a bare asyncio.TimeoutError when a busy loop
                    # has already used up the deadline: that is no fault of the subscription either.
                    continue
                for msg in msgs:
                    await self._apply_event(handler, msg)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.stats.errors += 1
                log.warning("event=event_consumer_error error=%r", exc)
                if psub is not None:  # do not leave its inbox subscription (and late replies) behind
                    with contextlib.suppress(Exception):
                        await psub.unsubscribe()
                psub = self._psub = None
                await asyncio.sleep(0.5)

    async def _apply_event(self, handler: EventHandler, msg: Msg) -> None:
        try:
            event = wire.event_decoder.decode(msg.data)
            if event.site != wire.site_of(msg.subject):
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
