"""The floor every hub figure is compared with: one bare nats-py request/reply, same machine, same run."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import nats

from controlplane.nats.natsserver import NatsServer
from edge_agent.nats_barrier import barrier


async def request_reply_latencies(url: str, n: int = 2000) -> list[float]:
    """Sequential request/reply round trips (seconds) against a bare responder on ``url``."""
    nc = await nats.connect(url)
    responder = await nats.connect(url)

    async def echo(msg):  # type: ignore[no-untyped-def]
        await msg.respond(msg.data)

    await responder.subscribe("bench.echo", cb=echo)
    await barrier(responder)
    payload = b"x" * 200
    for _ in range(200):
        await nc.request("bench.echo", payload, timeout=2)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await nc.request("bench.echo", payload, timeout=2)
        out.append(time.perf_counter() - t)
    await nc.close()
    await responder.close()
    return sorted(out)


async def measure(n: int = 2000) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        async with NatsServer(Path(tmp) / "js") as server:
            return await request_reply_latencies(server.url, n)
