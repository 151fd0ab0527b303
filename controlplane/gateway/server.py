"""Running the gateway app on a host and port (port 0 picks a free one), with connection guards.

aiohttp bounds body size and idle keep-alive but not how long a client may take to send a request's
headers, nor how many connections may be open, in all or from one address. The guard adds:

- a header deadline on every request of a connection: a request's headers must be complete within
  ``header_timeout_s`` of their first byte (of the connection's start, for its first request), else
  the connection is aborted (slowloris, also on keep-alive connections);
- the idle keep-alive timeout ``keepalive_timeout_s`` (aiohttp's own): a connection with no request
  under way and no byte of a next one is closed after it;
- a cap on open connections (``max_connections``) and on those from one client address
  (``max_connections_per_client``; connections from ``trusted_proxies`` count only toward the cap):
  beyond either, a new connection gets a one-line 503 and is closed;
- TLS (1.2 or newer) when ``tls_cert`` and ``tls_key`` are set, the handshake within ``header_timeout_s``.

(A body sent slowly is bounded by ``body_timeout_s`` where it is read, in app.py.)

With ``[gateway] hot_routes`` (the default) a connection starts in this protocol's own framing:
the hot inference routes are answered here (``hotpath.py``), and the first request that is not
one hands the connection to aiohttp's protocol for good, the bytes read so far replayed. The
header deadline, the keep-alive timeout, the caps and a graceful stop hold for both.

Refusals and cuts are counted in ``cpn_gateway_connections_refused{reason}`` (``max_connections``,
``max_connections_per_client``, ``header_timeout``). The guard uses only what asyncio's and uvloop's
transports have in common (uvloop's are not asyncio classes).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web
from aiohttp.tcp_helpers import tcp_keepalive, tcp_nodelay

from controlplane.core.errors import RequestError
from controlplane.gateway import admin, health, hotpath, infer, openai, openapi, usage
from controlplane.gateway.app import SERVICES, TRUSTED, UNMATCHED, Routes, guarded, unmatched
from controlplane.gateway.clientaddr import TrustedProxies

if TYPE_CHECKING:
    from controlplane.config import HubConfig
    from controlplane.services.record import Services


def _busy(message: str, code: str) -> bytes:
    body = ('{"error":{"message":"%s","type":"service_unavailable","code":"%s","param":null}}' % (message, code)).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Retry-After: 1\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


_BUSY = _busy("too many open connections", "too_many_connections")
_BUSY_CLIENT = _busy("too many open connections from your address", "too_many_connections_from_client")
REFUSED_LINGER_S = 1.0
"""How long a refused connection may stay open after its 503 (so the client reads it, not a reset)."""
SHUTDOWN_TIMEOUT_S = 5.0
"""How long a stopping gateway lets answers under way finish."""


class _Guard:
    """Protocol factory wrapping aiohttp's: the header deadline and the connection caps."""

    def __init__(self, server: web.Server, config: HubConfig, trusted: TrustedProxies,
                 counts: dict[tuple[str, ...], int] | None = None, hot: hotpath.HotRoutes | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.server = server
        self.hot = hot
        """The hot routes answered below aiohttp (``hotpath.py``); None: aiohttp serves all."""
        self.hot_conns: set[_Guarded] = set()
        """Connections not handed to aiohttp (yet)."""
        self.closing = False
        self.keepalive_timeout_s = config.keepalive_timeout_s
        self.header_timeout_s = config.header_timeout_s
        self.max_connections = config.max_connections
        self.max_per_client = config.max_connections_per_client
        self.trusted = trusted
        self.counts: dict[tuple[str, ...], int] = counts if counts is not None else {}
        self.clock = clock or time.monotonic
        """What a connection stamps its reads with (``_Guarded.arrived``): the services' clock, the
        one the handlers measure with."""
        self.open = 0
        self.by_client: dict[str, int] = {}
        self.loop = asyncio.get_running_loop()

    def __call__(self) -> asyncio.Protocol:
        return _Guarded(self)

    def count(self, reason: str) -> None:
        key = (reason,)
        self.counts[key] = self.counts.get(key, 0) + 1

    @property
    def refused(self) -> int:
        return self.counts.get(("max_connections",), 0) + self.counts.get(("max_connections_per_client",), 0)

    @property
    def slow_aborted(self) -> int:
        return self.counts.get(("header_timeout",), 0)

    async def close_hot(self, timeout_s: float) -> None:
        """Graceful shutdown of the connections not handed to aiohttp: idle ones are closed now,
        busy ones after their answer, those still busy after ``timeout_s`` are aborted."""
        self.closing = True
        busy = []
        for conn in list(self.hot_conns):
            if conn.busy is None:
                if conn.transport is not None:
                    conn.transport.close()
            else:
                busy.append(conn.busy)
        if busy:
            await asyncio.wait(busy, timeout=timeout_s)
        for conn in list(self.hot_conns):
            if conn.transport is not None:
                conn.transport.abort()


class _Guarded(asyncio.Protocol):
    """Delegates to aiohttp's RequestHandler (whose methods cannot be patched: it uses __slots__).

    ``head_since`` is when the first byte of a request head that is not complete yet arrived (the
    connection's start for its first request), None while a request is being served or the
    connection is idle between requests. Reading it costs the hot path two attribute loads: a
    request that arrives whole never arms a timer beyond the connection's first.
    """

    __slots__ = ("guard", "handler", "transport", "client", "head_since", "timer", "hot", "remote", "buf", "busy",
                 "relaying", "close_after", "idle_since", "drain", "paused", "reading_paused", "arrived")

    def __init__(self, guard: _Guard) -> None:
        self.guard = guard
        self.handler: Any = None
        self.transport: asyncio.Transport | None = None
        self.client = ""
        self.head_since: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        # The hot path's (hotpath.py) state, while the connection is not aiohttp's:
        self.hot: hotpath.HotRoutes | None = None
        self.remote: str | None = None
        self.buf = b""
        """Bytes read and not served yet, from the start of a request."""
        self.busy: asyncio.Task[None] | None = None
        """The request being answered (one at a time: pipelined ones wait in ``buf``)."""
        self.relaying = False
        self.close_after = False
        self.idle_since: float | None = None
        self.drain: asyncio.Future[None] | None = None
        self.paused = False
        self.reading_paused = False
        self.arrived: float | None = None
        """When this connection last read bytes (the guard's clock): a request's time in the gateway
        starts there, before aiohttp parses it (``app.arrived``), not when its handler runs."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self.guard
        self.transport = t = cast(asyncio.Transport, transport)
        guard.open += 1
        peer = t.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) and peer else ""
        self.remote = host or None
        from_client = 0
        if host and not guard.trusted.trusts_peer(host):
            self.client = host
            from_client = guard.by_client[host] = guard.by_client.get(host, 0) + 1
        if guard.open > guard.max_connections:
            self._refuse(_BUSY, "max_connections")
        elif from_client > guard.max_per_client:
            self._refuse(_BUSY_CLIENT, "max_connections_per_client")
        else:
            if guard.hot is not None:
                self.hot = guard.hot
                guard.hot_conns.add(self)
                tcp_nodelay(t, True)  # as aiohttp's protocol does: no small write waits for an ACK
                tcp_keepalive(t)
            else:
                self.handler = guard.server()
                self.handler.connection_made(t)
            self.head_since = now = guard.loop.time()
            self.timer = guard.loop.call_at(now + guard.header_timeout_s, self._expire)

    def _refuse(self, answer: bytes, reason: str) -> None:
        t = self.transport
        assert t is not None
        self.guard.count(reason)
        t.write(answer)
        if t.can_write_eof():  # half-close (TCP; TLS cannot): the client sees the end of the 503 at once
            t.write_eof()
        # Closing at once, with the client's request unread, would reset the connection before the
        # client reads the 503: wait for the client to close (eof_received), at most REFUSED_LINGER_S.
        self.guard.loop.call_later(REFUSED_LINGER_S, t.close)

    def _expire(self) -> None:
        self.timer = None
        since, t, handler = self.head_since, self.transport, self.handler
        if handler is None and self.hot is not None and t is not None and not t.is_closing():
            self._expire_hot(t)
            return
        if since is None or t is None or t.is_closing() or handler is None:
            return
        if handler._messages or handler._request_in_progress:
            self.head_since = None
            return
        guard = self.guard
        due = since + guard.header_timeout_s
        if guard.loop.time() < due:
            self.timer = guard.loop.call_at(due, self._expire)
            return
        guard.count("header_timeout")
        t.abort()

    def _expire_hot(self, t: asyncio.Transport) -> None:
        """The header deadline and the idle keep-alive timeout of a connection not handed over."""
        if self.busy is not None:
            return  # re-armed when the answer is out (done)
        guard = self.guard
        now = guard.loop.time()
        if self.head_since is not None:
            due = self.head_since + guard.header_timeout_s
            if now >= due:
                guard.count("header_timeout")
                t.abort()
                return
        elif self.idle_since is not None:
            due = self.idle_since + guard.keepalive_timeout_s
            if now >= due:
                t.close()
                return
        else:
            return
        self.timer = guard.loop.call_at(due, self._expire)

    def _arm(self, due: float) -> None:
        timer = self.timer
        if timer is not None:
            if timer.when() <= due:
                return
            timer.cancel()
        self.timer = self.guard.loop.call_at(due, self._expire)

    def _take(self) -> None:
        """Serve the next request in ``buf`` here, or hand the connection over (hotpath.py, Rule 2)."""
        hot = self.hot
        assert hot is not None
        buf = self.buf
        head = hot.parse(buf)
        if head is hotpath.INCOMPLETE:
            if self.head_since is None:
                self.head_since = now = self.guard.loop.time()
                self._arm(now + self.guard.header_timeout_s)
            return
        if head is None or not isinstance(head, hotpath.Head) or len(buf) < head.body_start + head.length:
            self._hand_over()  # not ours, or the body is still arriving: aiohttp reads it
            return
        end = head.body_start + head.length
        self.buf = buf[end:]
        self.head_since = None
        self.close_after = head.close
        self.busy = hot.loop.create_task(hot.serve(self, head, buf[head.body_start:end], self.remote, self.arrived))

    def _hand_over(self) -> None:
        """Give the connection to aiohttp for good: its protocol, the unserved bytes replayed."""
        guard, t = self.guard, self.transport
        assert self.hot is not None and t is not None
        self.hot.handed += 1
        self.hot = None
        guard.hot_conns.discard(self)
        buf, self.buf = self.buf, b""
        self.head_since = self.idle_since = None
        self.handler = guard.server()
        self.handler.connection_made(t)
        if self.reading_paused:
            self.reading_paused = False
            t.resume_reading()
        if self.paused:
            self.handler.pause_writing()
        if buf:
            self.data_received(buf)

    # The hot path's side of hotpath.Connection:

    def send(self, data: bytes) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)

    async def write(self, data: bytes) -> None:
        t = self.transport
        if t is None or t.is_closing():
            raise ConnectionResetError("the client went away")
        t.write(data)
        if self.paused:
            self.drain = drain = self.guard.loop.create_future()
            await drain

    def done(self) -> None:
        """The answer is out: the next pipelined request, or wait for one (or close)."""
        self.busy = None
        self.relaying = False
        t = self.transport
        if t is None or t.is_closing() or self.hot is None:
            return
        if self.close_after or self.guard.closing:
            t.close()
            return
        if self.reading_paused:
            self.reading_paused = False
            t.resume_reading()
        if self.buf:
            self._take()
            if self.hot is None:
                return  # handed to aiohttp
        if self.busy is None and self.head_since is None:
            self.idle_since = now = self.guard.loop.time()
            if self.timer is None:
                self.timer = self.guard.loop.call_at(now + self.guard.keepalive_timeout_s, self._expire)

    def data_received(self, data: bytes) -> None:
        self.arrived = self.guard.clock()
        handler = self.handler
        if handler is None:
            if self.hot is not None:  # not handed to aiohttp (yet)
                self.buf = self.buf + data if self.buf else data
                if self.busy is None:
                    self._take()
                elif len(self.buf) > hotpath.MAX_HEAD_BYTES and self.transport is not None:
                    self.reading_paused = True  # pipelined requests wait for the one being answered
                    self.transport.pause_reading()
            return  # else a refused connection: its 503 is on the way
        handler.data_received(data)
        if handler._messages or handler._request_in_progress:
            self.head_since = None  # a whole request head arrived (or these bytes are a body)
        elif self.head_since is None:
            guard = self.guard
            self.head_since = now = guard.loop.time()
            if self.timer is None:
                self.timer = guard.loop.call_at(now + guard.header_timeout_s, self._expire)

    def eof_received(self) -> bool | None:
        if self.handler is None:
            return None  # close
        return self.handler.eof_received()  # type: ignore[no-any-return]

    def connection_lost(self, exc: BaseException | None) -> None:
        guard = self.guard
        guard.open -= 1
        if self.client:
            left = guard.by_client[self.client] - 1
            if left:
                guard.by_client[self.client] = left
            else:
                del guard.by_client[self.client]
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.handler is not None:
            self.handler.connection_lost(exc)
            return
        guard.hot_conns.discard(self)
        drain, self.drain = self.drain, None
        if drain is not None and not drain.done():
            drain.set_exception(ConnectionResetError("the client went away"))
        if self.busy is not None and self.relaying:
            self.busy.cancel()  # a stream's client is gone: the relay tells the site to stop

    def pause_writing(self) -> None:
        self.paused = True
        if self.handler is not None:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.paused = False
        if self.handler is not None:
            self.handler.resume_writing()
            return
        drain, self.drain = self.drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context for the gateway: TLS 1.2 or newer, the certificate chain and key given.

    Raises:
        RequestError: naming the file that could not be read or does not hold a usable key/chain.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise RequestError(f"TLS: {exc.filename or cert} not found", field="tls_cert") from None
    except (ssl.SSLError, OSError) as exc:
        raise RequestError(f"TLS: cannot load certificate {cert} with key {key}: {exc}", field="tls_cert") from None
    return ctx


class GatewayServer:
    def __init__(self, runner: web.AppRunner, server: asyncio.Server, guard: _Guard, scheme: str) -> None:
        self.runner = runner
        self.server = server
        self.guard = guard
        self.scheme = scheme
        """``https`` when the gateway serves TLS, else ``http``."""

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        self.server.close()
        await self.guard.close_hot(SHUTDOWN_TIMEOUT_S)
        await self.runner.cleanup()


_HANDLER_STATE = ("_messages", "_request_in_progress")
"""aiohttp RequestHandler attributes the header deadline reads (private: checked at start-up)."""


def make_app(services: Services, extra_routes: Sequence[ModuleType] = ()) -> web.Application:
    """Build the aiohttp application over ``services``; each API module (the built-in ones, then
    ``extra_routes``, each with ``add_routes(routes)``) adds its routes."""
    app = web.Application(client_max_size=services.config.max_body_bytes)
    app[SERVICES] = services
    try:
        app[TRUSTED] = TrustedProxies.parse(services.config.trusted_proxies)
    except ValueError as exc:
        raise RequestError(str(exc), field="trusted_proxies") from None
    # GET /openapi.json documents every module that adds routes, in this order.
    app[openapi.MODULES] = [health, admin, infer, openai, usage, openapi, *extra_routes]
    routes = Routes(app, services)
    # The hot endpoints first: aiohttp's dispatcher tries resources in registration order.
    infer.add_routes(routes)
    openai.add_routes(routes)
    health.add_routes(routes)
    admin.add_routes(routes)
    usage.add_routes(routes)
    openapi.add_routes(routes)
    for extra in extra_routes:
        extra.add_routes(routes)
    app.router.add_route("*", UNMATCHED, guarded(services, unmatched, "unmatched", public=False))
    return app


async def start(services: Services, host: str, port: int, *,
                extra_routes: Sequence[ModuleType] = ()) -> GatewayServer:
    from aiohttp.web_protocol import RequestHandler

    missing = [name for name in _HANDLER_STATE if name not in getattr(RequestHandler, "__slots__", ())]
    if missing:  # pragma: no cover - an aiohttp that changed its internals
        raise RuntimeError(f"this aiohttp's RequestHandler lacks {missing}: the gateway's header deadline needs them")
    config = services.config
    if bool(config.tls_cert) != bool(config.tls_key):
        raise RequestError("TLS needs both tls_cert and tls_key (--tls-cert and --tls-key)",
                           field="tls_key" if config.tls_cert else "tls_cert")
    ctx = tls_context(config.tls_cert, config.tls_key) if config.tls_cert and config.tls_key else None
    app = make_app(services, extra_routes)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT_S,
                           keepalive_timeout=config.keepalive_timeout_s)
    await runner.setup()
    assert runner.server is not None
    loop = asyncio.get_running_loop()
    hot = hotpath.HotRoutes(app, loop) if config.gateway.hot_routes else None
    guard = _Guard(runner.server, config, app[TRUSTED], services.metrics.gateway_refused.counts, hot,
                   services.clock.monotonic)
    server = await loop.create_server(guard, host, port, backlog=1024, reuse_address=True, ssl=ctx,
                                      ssl_handshake_timeout=config.header_timeout_s if ctx else None)
    return GatewayServer(runner, server, guard, "https" if ctx else "http")
