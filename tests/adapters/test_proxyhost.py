"""Fault proxies in a child process (what `cpn bench regions` puts on its WAN links): a real
nats-server and nats-py through them; the delay is added by the child, whatever this loop does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.msg import Msg

from bench.regions import echo_server
from controlplane.nats.natsserver import NatsServer
from controlplane.tools.proxyhost import ProxyHost, ProxyHostError
from edge_agent.nats_barrier import barrier


@pytest.fixture
async def host() -> AsyncIterator[ProxyHost]:
    h = ProxyHost()
    await h.start()
    try:
        yield h
    finally:
        await h.close()


@pytest.mark.timeout(60)
async def test_a_child_proxy_forwards_delays_and_blackholes(nats_server: NatsServer, host: ProxyHost) -> None:
    echo = await nats.connect(nats_server.url)

    async def on_echo(msg: Msg) -> None:
        await msg.respond(msg.data)

    await echo.subscribe("echo", cb=on_echo)
    await barrier(echo)
    pid, port = await host.add(nats_server.url)
    nc = await nats.connect(f"nats://127.0.0.1:{port}", max_reconnect_attempts=0)
    try:
        assert (await nc.request("echo", b"a", timeout=5)).data == b"a"
        await host.set_mode([pid], "delay", 100.0)
        started = time.monotonic()
        assert (await nc.request("echo", b"b", timeout=5)).data == b"b"
        assert time.monotonic() - started >= 0.2  # 100 ms each way, added in the child
        await host.set_mode([pid], "blackhole")
        with pytest.raises(nats.errors.TimeoutError):
            await nc.request("echo", b"c", timeout=0.5)
    finally:
        await nc.close()
        await echo.close()


@pytest.mark.timeout(30)
async def test_bad_commands_are_refused_by_name_and_the_host_goes_on(nats_server: NatsServer, host: ProxyHost) -> None:
    with pytest.raises(ProxyHostError, match="needs a host and a port"):
        await host.add("nats://nowhere")
    with pytest.raises(ProxyHostError, match="mode 'sideways'"):
        pid, _ = await host.add(nats_server.url)
        await host.set_mode([pid], "sideways")
    with pytest.raises(ProxyHostError, match="delay ms must be >= 0"):
        await host.set_mode([0], "delay", -1.0)
    pid, port = await host.add(nats_server.url)
    assert port > 0
    await host.remove([pid])  # closed: its port refuses, its id is not reused
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    with pytest.raises(ProxyHostError, match=f"proxy {pid} was removed"):
        await host.set_mode([pid], "pass")
    assert (await host.add(nats_server.url))[0] == pid + 1


@pytest.mark.timeout(60)
async def test_a_sub_millisecond_delay_is_kept_to_a_fraction_of_a_millisecond(host: ProxyHost) -> None:
    """A 0.25 ms delay each way leaves on time, not a millisecond late: on asyncio's default loop the
    child's timers waited in whole milliseconds (epoll), so every delayed chunk left >= 0.75 ms late
    and `cpn bench regions` measured ~4 ms per request that was the proxies' own."""
    async with echo_server() as upstream:
        pid, port = await host.add(upstream)
        await host.set_mode([pid], "delay", 0.25)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for i in range(50):  # one chunk each way at a time: nothing else wakes the child's loop
            writer.write(b"%d" % i)
            assert await reader.read(100) == b"%d" % i
        writer.close()
        stats = await host.stats()
        assert stats["delayed"] >= 100
        assert stats["late_ms_p50"] < 0.5, stats


@pytest.mark.timeout(60)
async def test_lateness_is_told_per_proxy_too(host: ProxyHost) -> None:
    """`cpn bench regions` reads how late each origin's own tenant-leg proxy was, not only the run's."""
    async with echo_server() as upstream:
        used, port = await host.add(upstream)
        idle, _ = await host.add(upstream)
        await host.set_mode([used, idle], "delay", 0.25)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for i in range(10):
            writer.write(b"%d" % i)
            assert await reader.read(100) == b"%d" % i
        writer.close()
        assert (await host.stats([used]))["delayed"] >= 20
        assert (await host.stats([idle]))["delayed"] == 0
        assert (await host.stats([used, idle]))["delayed"] == (await host.stats())["delayed"]
        await host.remove([idle])
        with pytest.raises(ProxyHostError, match=f"proxy {idle} was removed"):
            await host.stats([idle])
