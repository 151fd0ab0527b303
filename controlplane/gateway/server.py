"""Running the gateway app on a host and port (port 0 picks a free one)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from controlplane.gateway.app import make_app

if TYPE_CHECKING:
    from controlplane.hub import Hub


class GatewayServer:
    def __init__(self, runner: web.AppRunner, site: web.TCPSite) -> None:
        self.runner = runner
        self.site = site

    @property
    def port(self) -> int:
        server = self.site._server  # aiohttp keeps the asyncio server here
        assert server is not None and server.sockets
        return int(server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start(hub: Hub, host: str, port: int) -> GatewayServer:
    app = make_app(hub)
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=5.0,
        keepalive_timeout=75.0,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
    await site.start()
    return GatewayServer(runner, site)
