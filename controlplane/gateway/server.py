"""Running the gateway app on a host and port (port 0 picks a free one), with connection guards.

aiohttp bounds body size and idle keep-alive but not how long a client may take to send its
headers, nor how many connections may be open. The guard here adds both: a connection that has
not delivered one complete request within ``header_timeout_s`` is aborted (slowloris), and beyond
``max_connections`` a new connection gets a one-line 503 and is closed.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from aiohttp import web

from controlplane.gateway.app import make_app

if TYPE_CHECKING:
    from controlplane.hub import Hub

_BUSY_BODY = b'{"error":{"message":"too many open connections","type":"service_unavailable","code":"too_many_connections","param":null}}'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Retry-After: 1\r\nContent-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY
)


class _Guard:
    """Protocol factory wrapping aiohttp's, adding the header deadline and the connection cap."""

    def __init__(self, server: web.Server, header_timeout_s: float, max_connections: int) -> None:
        self.server = server
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self.open = 0
        self.refused = 0
        self.slow_aborted = 0

    def __call__(self, *args: Any, **kwargs: Any) -> asyncio.Protocol:
        return _Guarded(self.server(*args, **kwargs), self)

    def _check(self, handler: Any, transport: asyncio.BaseTransport) -> None:
        if transport.is_closing():
            return
        if getattr(handler, "_request_count", 1) == 0:
            self.slow_aborted += 1
            transport.abort()  # type: ignore[attr-defined]


class _Guarded(asyncio.Protocol):
    """Delegates to aiohttp's RequestHandler (whose methods cannot be patched: it uses __slots__)."""

    __slots__ = ("handler", "guard")

    def __init__(self, handler: Any, guard: _Guard) -> None:
        self.handler = handler
        self.guard = guard

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.handler.connection_made(transport)
        guard = self.guard
        guard.open += 1
        if guard.open > guard.max_connections:
            guard.refused += 1
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(_BUSY)
            transport.close()
            return
        asyncio.get_running_loop().call_later(guard.header_timeout_s, guard._check, self.handler, transport)

    def data_received(self, data: bytes) -> None:
        self.handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self.handler.eof_received()  # type: ignore[no-any-return]

    def connection_lost(self, exc: BaseException | None) -> None:
        self.guard.open -= 1
        self.handler.connection_lost(exc)

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()


class GatewayServer:
    def __init__(self, runner: web.AppRunner, server: asyncio.Server, guard: _Guard) -> None:
        self.runner = runner
        self.server = server
        self.guard = guard

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        self.server.close()
        await self.runner.cleanup()


async def start(hub: Hub, host: str, port: int) -> GatewayServer:
    app = make_app(hub)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0, keepalive_timeout=75.0)
    await runner.setup()
    assert runner.server is not None
    guard = _Guard(runner.server, hub.config.header_timeout_s, hub.config.max_connections)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(guard, host, port, backlog=1024, reuse_address=True)
    return GatewayServer(runner, server, guard)
