"""Agent-side fencing: a real agent, two fake hubs speaking with different leader epochs.

What these prove: once a site has seen epoch N, every kind of command from an older epoch is
refused with ``stale_epoch`` (counted, nothing done), epoch 0 (a hub without election) still
works, and a restarted agent remembers N from its data dir.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.nats.natsserver import NatsServer
from edge_agent import wire
from edge_agent.fencing import EpochFence
from tests.support.fakehub import FakeHub, agent_config, running


def test_fence_remembers_the_highest_epoch(tmp_path: Path) -> None:
    fence = EpochFence(tmp_path / "hub_epoch")
    assert fence.admit(0) and fence.admit(4) and fence.admit(4) and fence.admit(9)
    assert not fence.admit(8) and fence.refused == 1
    assert fence.admit(0)  # a hub that predates epochs
    assert (tmp_path / "hub_epoch").stat().st_mode & 0o777 == 0o600
    assert EpochFence(tmp_path / "hub_epoch").highest == 9
    assert EpochFence(None).admit(3)


async def test_commands_from_a_deposed_leader_are_refused(nats_server: NatsServer, tmp_path: Path) -> None:
    cfg = agent_config(nats_server.url, site="edge-e", data_dir=str(tmp_path / "agent"))
    async with FakeHub(nats_server.url, name="old-leader") as old, FakeHub(nats_server.url, name="new-leader") as new:
        new.answer_register = False  # one hub answers registrations; both send commands
        async with running(cfg) as agent:
            await agent.registered.wait()
            assert isinstance(await old.command("edge-e", wire.Drain(on=False, epoch=4)), wire.Ack)
            assert isinstance(await new.command("edge-e", wire.Drain(on=False, epoch=7)), wire.Ack)

            stale: list[object] = [
                wire.StartAttempt(job="j1", attempt=1, cards=1, accelerator="H20", epoch=4),
                wire.StopAttempt(job="j1", attempt=1, epoch=4),
                wire.LoadModel(model="llama", deployment="d1", cards=0.5, epoch=4),
                wire.UnloadModel(model="qwen", deployment="local", epoch=6),
                wire.Drain(on=True, epoch=6),
            ]
            for cmd in stale:
                reply = await old.command("edge-e", cmd)
                assert isinstance(reply, wire.ErrorReply) and reply.code == "stale_epoch", (cmd, reply)
            assert agent.counters["stale_epoch"] == 5
            assert not agent.training.attempts and not agent.draining
            assert ("llama", "d1") not in agent.inventory.replicas and ("qwen", "local") in agent.inventory.replicas

            # the current leader goes on; a hub without epochs (0) is still heard
            reply = await new.command("edge-e", wire.LoadModel(model="llama", deployment="d1", cards=0.5, epoch=7))
            assert isinstance(reply, wire.Ack)
            assert isinstance(await old.command("edge-e", wire.UnloadModel(model="llama", deployment="d1")), wire.Ack)

        # a restarted agent remembers the epoch
        async with running(cfg) as again:
            await again.registered.wait()
            assert again.fence.highest == 7
            reply = await old.command("edge-e", wire.Drain(on=True, epoch=6))
            assert isinstance(reply, wire.ErrorReply) and reply.code == "stale_epoch"
            assert not again.draining


@pytest.mark.parametrize("body", [
    b'{"type":"drain","on":false}',  # from a hub that predates epochs
    b'{"type":"drain","on":false,"epoch":3,"something_new":1}',
])
def test_epoch_is_optional_on_the_wire(body: bytes) -> None:
    cmd = wire.command_decoder.decode(body)
    assert isinstance(cmd, wire.Drain) and cmd.epoch in (0, 3)
