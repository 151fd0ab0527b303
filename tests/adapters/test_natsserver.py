from __future__ import annotations

import nats

from controlplane.nats.natsserver import NatsServer


async def test_server_starts_on_port_zero_and_serves_requests(nats_server: NatsServer) -> None:
    assert nats_server.port > 0
    nc = await nats.connect(nats_server.url)
    try:
        async def echo(msg):  # type: ignore[no-untyped-def]
            await msg.respond(msg.data.upper())

        await nc.subscribe("t.echo", cb=echo)
        reply = await nc.request("t.echo", b"ping", timeout=2)
        assert reply.data == b"PING"
    finally:
        await nc.close()


async def test_restart_keeps_port(nats_server: NatsServer) -> None:
    port = nats_server.port
    await nats_server.restart(kill=True)
    assert nats_server.port == port and nats_server.running
