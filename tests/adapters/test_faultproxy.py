"""The fault proxy with a real nats-server and nats-py: pass, delay, blackhole, reset."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from controlplane.nats.natsserver import NatsServer
from edge_agent.nats_barrier import barrier
from tests.support.faultproxy import FaultProxy
from tests.support.waiting import until


@pytest.fixture
async def echo(nats_server: NatsServer) -> AsyncIterator[Client]:
    """A responder connected straight to the server (not through the proxy)."""
    nc = await nats.connect(nats_server.url)

    async def on_echo(msg: Msg) -> None:
        await msg.respond(msg.data)

    await nc.subscribe("echo", cb=on_echo)
    await barrier(nc)
    try:
        yield nc
    finally:
        await nc.close()


class Events:
    def __init__(self) -> None:
        self.disconnected = 0
        self.reconnected = 0
        self.errors: list[str] = []

    async def on_disconnected(self) -> None:
        self.disconnected += 1

    async def on_reconnected(self) -> None:
        self.reconnected += 1

    async def on_error(self, exc: Exception) -> None:
        self.errors.append(repr(exc))


async def agent_like_client(url: str, ev: Events) -> Client:
    # architecture §4: ping every 1 s, 2 outstanding, reconnect forever.
    return await nats.connect(
        url, ping_interval=1, max_outstanding_pings=2, allow_reconnect=True, max_reconnect_attempts=-1,
        reconnect_time_wait=0.1, connect_timeout=1, disconnected_cb=ev.on_disconnected,
        reconnected_cb=ev.on_reconnected, error_cb=ev.on_error,
    )


async def test_pass_and_delay(nats_server: NatsServer, echo: Client) -> None:
    async with FaultProxy(nats_server.url) as proxy:
        nc = await nats.connect(proxy.url, allow_reconnect=False)
        try:
            loop = asyncio.get_running_loop()
            assert (await nc.request("echo", b"hi", timeout=2)).data == b"hi"
            t0 = loop.time()
            await nc.request("echo", b"x", timeout=2)
            fast_s = loop.time() - t0
            proxy.set_delay(300)
            t0 = loop.time()
            assert (await nc.request("echo", b"slow", timeout=2)).data == b"slow"
            slow_s = loop.time() - t0
            assert slow_s >= 0.6 > fast_s  # 300 ms each way
            proxy.set_pass()
            t0 = loop.time()
            await nc.request("echo", b"x", timeout=2)
            assert loop.time() - t0 < 0.5
            assert proxy.links == 1
        finally:
            await nc.close()


async def test_blackhole_is_noticed_by_pings_and_healed_by_reconnect(nats_server: NatsServer, echo: Client) -> None:
    async with FaultProxy(nats_server.url) as proxy:
        ev = Events()
        nc = await agent_like_client(proxy.url, ev)
        try:
            assert (await nc.request("echo", b"before", timeout=2)).data == b"before"
            proxy.set_blackhole()
            with pytest.raises(nats.errors.TimeoutError):
                await nc.request("echo", b"lost", timeout=0.3)  # nothing gets through, nothing closes
            noticed_s = await until(lambda: ev.disconnected >= 1, 4.0, "the client to notice the partition")
            assert noticed_s <= 3.5
            print(f"blackhole noticed after {noticed_s:.2f} s")
            await asyncio.sleep(0.5)  # the behaviour: a while of partition in which nothing may get through
            assert ev.reconnected == 0  # reconnect attempts are held too
            proxy.set_pass()
            await until(lambda: ev.reconnected >= 1, 5.0, "the client to reconnect")
            assert (await nc.request("echo", b"after", timeout=2)).data == b"after"
        finally:
            await nc.close()


async def test_reset_drops_connections_and_refuses_until_switched_back(nats_server: NatsServer, echo: Client) -> None:
    async with FaultProxy(nats_server.url) as proxy:
        ev = Events()
        nc = await agent_like_client(proxy.url, ev)
        try:
            proxy.set_reset()
            reset_s = await until(lambda: ev.disconnected >= 1, 2.0, "the client to see the reset")
            assert reset_s < 1.0  # a reset is immediate, no ping timeout needed
            accepted = proxy.accepted
            await until(lambda: proxy.accepted >= accepted + 2, 3.0, "refused reconnect attempts")
            assert ev.reconnected == 0 and proxy.links == 0
            proxy.set_pass()
            await until(lambda: ev.reconnected >= 1, 5.0, "the client to reconnect")
            assert (await nc.request("echo", b"back", timeout=2)).data == b"back"
        finally:
            await nc.close()


async def test_close_with_open_links_leaves_nothing_behind(nats_server: NatsServer) -> None:
    proxy = FaultProxy(nats_server.url)
    await proxy.start()
    nc = await nats.connect(proxy.url, allow_reconnect=False)
    proxy.set_blackhole()
    # A new connection is accepted and held: the client never gets the server's INFO.
    with pytest.raises(asyncio.TimeoutError):
        await nats.connect(proxy.url, allow_reconnect=False, connect_timeout=0.5)
    assert proxy.accepted == 2
    await proxy.close()  # with a live link: aborted, its tasks awaited
    await until(lambda: nc.is_closed, 2.0, "the client to see the proxy go")
    assert proxy.links == 0
    with pytest.raises(ValueError, match="host and a port"):
        FaultProxy("nats://nowhere")
