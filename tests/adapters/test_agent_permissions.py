"""The agent under its real per-site NATS identity (controlplane/nats/natsconf.py permissions): everything
it does (register, heartbeats, streamed answers, JetStream events with PubAcks on its own inbox)
fits inside what the site is allowed, with no JetStream API permission."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controlplane.nats import natsconf
from controlplane.nats.natsserver import NatsServer
from edge_agent import wire
from tests.support.confserver import server_from
from tests.support.fakehub import FakeHub, agent_config, running

SITE = "perm-site"


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[tuple[NatsServer, natsconf.CredentialSet, list[str]]]:
    creds = natsconf.derive_credentials([SITE], b"s" * 32)
    text = natsconf.single_server_config(creds, host="127.0.0.1", port=0, store_dir=None, leafnode_port=None, monitor=None)
    lines: list[str] = []
    async with server_from(tmp_path, "nats", text, lines.append) as server:
        yield server, creds, lines


async def test_agent_works_within_its_site_permissions(secured: tuple[NatsServer, natsconf.CredentialSet, list[str]],
                                                       tmp_path: Path) -> None:
    server, creds, lines = secured
    site_creds = creds.sites[SITE]
    async with FakeHub(server.url, user=creds.hub.user, password=creds.hub.password) as hub:
        await hub.create_stream()
        cfg = agent_config(server.url, SITE, user=site_creds.user, password=site_creds.password,
                           backend={"sim": {"per_token_ms": 5.0}})
        async with running(cfg) as agent:
            await asyncio.wait_for(agent.registered.wait(), 5)
            await hub.wait_heartbeat(SITE)
            got = await hub.infer_stream(SITE, wire.InferRequest(request_id="p1", model="qwen", max_tokens=20,
                                                                 stream=True))
            assert len(got) == 21 and isinstance(got[-1][1], wire.InferResult)
            cmd = wire.StartAttempt(job="pj", attempt=1, cards=1, accelerator="H20", work_s=10, time_scale=100,
                                    checkpoint_interval_s=4)
            assert isinstance(await hub.command(SITE, cmd), wire.Ack)
            events = await hub.wait_events(lambda ev: len(ev) == 4, what="events under site permissions")
            assert [e.msg_id for e in events] == ["pj:1:1", "pj:1:2", "pj:1:3", "pj:1:4"]
            assert agent.events.counters["published"] == 4 and agent.bus.counters["errors"] == 0
    assert not [line for line in lines if "violation" in line.lower()], lines
