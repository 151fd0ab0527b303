"""``barrier`` against a real nats-server: a subscription made before it is live for every other
connection once it returns (one ``flush()`` is not that: see ``edge_agent.nats_barrier``)."""

from __future__ import annotations

import nats
import nats.errors
import pytest
from nats.aio.msg import Msg

from controlplane.nats.natsserver import NatsServer
from edge_agent.nats_barrier import barrier


async def test_a_subscription_is_live_for_other_connections_once_the_barrier_returns(nats_server: NatsServer) -> None:
    site = await nats.connect(nats_server.url)
    hub = await nats.connect(nats_server.url)

    async def echo(msg: Msg) -> None:
        await msg.respond(msg.data)

    try:
        # Each round: a fresh subject, subscribed just before the barrier, then asked from another
        # connection with no-responders on: a SUB the server had not yet processed answers 503 at once.
        for i in range(300):
            await site.subscribe(f"barrier.{i}", cb=echo)
            await barrier(site)
            reply = await hub.request(f"barrier.{i}", str(i).encode(), timeout=5)
            assert reply.data == str(i).encode()
    finally:
        await site.close()
        await hub.close()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await barrier(site)
