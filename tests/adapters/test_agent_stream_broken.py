"""A site telling the hub that a stream broke, when its first try finds the link not up yet.

Real parts: a nats-server on port 0, a real agent, a plain NATS client standing for the hub's
reply inbox. What this proves: the agent's ``stream_broken`` error reaches the hub even when the
first publish of it fails (as it does when nats-py has started reconnecting before the agent's
bus heard of the disconnect: its "connected" still set, the publish refused). Before, that one
try was all: the telling was lost, and a site back within the hub's detection period left the
tenant's stream open until the hub's idle timeout, 30 s (``tests/e2e/test_stream_cut.py[pause]``
failed that way under load: ``infer_stream_broken``, then ``infer_reply_failed``, then nothing).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any


from controlplane.nats.natsserver import NatsServer
from edge_agent import wire
from edge_agent.errors import NotConnected
from tests.support.fakehub import FakeHub, agent_config, running


async def test_a_broken_stream_is_told_even_when_the_first_try_finds_no_link(
        nats_server: NatsServer, tmp_path: Path) -> None:
    async with FakeHub(nats_server.url) as hub, running(agent_config(nats_server.url, site="sh-edge",
                                                                     data_dir=str(tmp_path / "agent"))) as agent:
        await asyncio.wait_for(agent.registered.wait(), 10)
        assert hub.nc is not None
        inbox = hub.nc.new_inbox()
        got: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_msg(msg: Any) -> None:
            await got.put(msg.data)

        sub = await hub.nc.subscribe(inbox, cb=on_msg)
        await hub.nc.flush()
        bus = agent.inference.bus
        publish = bus.publish
        refused = [0]

        async def not_yet(subject: str, data: bytes, headers: dict[str, str] | None = None) -> None:
            if subject == inbox and refused[0] < 2:  # "connected", but nats-py is reconnecting
                refused[0] += 1
                raise NotConnected("site sh-edge: disconnected from NATS")
            await publish(subject, data, headers)

        bus.publish = not_yet
        try:
            await asyncio.wait_for(agent.inference._tell_broken(inbox, "r-1"), 5)
            data = await asyncio.wait_for(got.get(), 5)
        finally:
            bus.publish = publish
            await sub.unsubscribe()
        reply = wire.infer_reply_decoder.decode(data)
        assert isinstance(reply, wire.ErrorReply) and reply.code == "stream_broken", reply
        assert refused[0] == 2 and agent.inference.counters["streams_broken_told"] == 1
