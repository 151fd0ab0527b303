"""The gateway benchmark's floor: a bare aiohttp handler doing one bare NATS request to a bare responder.

``python -m bench.floor_server NATS_URL`` prints ``port=N`` when serving; the responder runs in
``python -m bench.floor_server NATS_URL --responder``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import nats
from aiohttp import web

from bench import common
from edge_agent.nats_barrier import barrier


async def serve(url: str) -> None:
    nc = await nats.connect(url)

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        msg = await nc.request("floor.echo", body, timeout=5)
        return web.Response(body=msg.data, content_type="application/json")

    app = web.Application()
    app.router.add_post("/floor", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"port={port}", flush=True)
    await asyncio.Event().wait()


async def respond(url: str) -> None:
    nc = await nats.connect(url)

    async def echo(msg):  # type: ignore[no-untyped-def]
        await msg.respond(b'{"output":"ok"}')

    await nc.subscribe("floor.echo", cb=echo)
    await barrier(nc)
    print("ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--responder", action="store_true")
    a = p.parse_args()
    common.install_uvloop()
    try:
        asyncio.run(respond(a.url) if a.responder else serve(a.url))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
