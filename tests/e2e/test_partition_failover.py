"""A partitioned site is left after the acknowledgement timeout, not the full site timeout.

Real hub, real nats-server, two real agents; hz-edge (the nearest to the tenant) reaches NATS
through a fault proxy. Loss detection is set slow here (10 missed heartbeats) and the site
timeout long (8 s), so only the acknowledgement protocol can explain a quick failover.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from controlplane.hub import Hub
from controlplane.nats.natsserver import NatsServer
from edge_agent.agent import Agent
from edge_agent.config import AgentConfig, BackendConfig, ModelConfig, SimBackendConfig
from tests.support.waiting import until
from tests.support.faultproxy import FaultProxy
from tests.support.hubrig import Client, hub_config, running_hub

CHAT = {"model": "qwen", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}


CARDS = {"hz-edge": {"910B": 4}, "sh-edge": {"H20": 4}}
"""What the layout declares for each site (a site may claim no more)."""


def agent(site: str, city: str, url: str) -> Agent:
    return Agent(AgentConfig(
        site=site, nats=url, city=city, tier="edge", accelerators=CARDS[site], heartbeat_s=1.0,
        models=[ModelConfig(name="qwen", cards=1.0, slots=8)],
        backend=BackendConfig(sim=SimBackendConfig(ttft_ms=20, per_token_ms=5, slots=8)),
    ))


@pytest.fixture
async def rig(tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[tuple[Hub, FaultProxy, Client]]:
    config = hub_config(tmp_path, nats_server.url, heartbeat_s=1.0, miss_limit=10, site_timeout_s=8.0,
                        site_ack_timeout_s=1.0)
    async with FaultProxy(nats_server.url) as proxy, running_hub(config) as hub:
        key = hub.create_tenant("acme", default_origin="hangzhou")
        agents = [agent("hz-edge", "hangzhou", proxy.url), agent("sh-edge", "shanghai", nats_server.url)]
        try:
            await asyncio.gather(*(a.start() for a in agents))
            await until(lambda: all((v := hub.registry.get(s)) is not None and v.slots_free("qwen") > 0
                                    for s in ("hz-edge", "sh-edge")), 10, "both sites ready")
            async with aiohttp.ClientSession() as session:
                yield hub, proxy, Client(session, f"http://127.0.0.1:{hub.http_port}", key)
        finally:
            proxy.set_pass()
            await asyncio.gather(*(a.stop() for a in agents), return_exceptions=True)


async def test_a_partitioned_site_is_left_at_the_ack_timeout_then_passed_over_until_heard_again(rig) -> None:  # type: ignore[no-untyped-def]
    hub, proxy, tenant = rig
    status, body, headers = await tenant.call("POST", "/v1/chat/completions", CHAT)
    assert status == 200 and headers["X-CPN-Site"] == "hz-edge", body

    proxy.set_blackhole()  # hz-edge's link drops every byte; the hub does not know yet
    started = time.monotonic()
    status, body, headers = await tenant.call("POST", "/v1/chat/completions", CHAT)
    waited_s = time.monotonic() - started
    assert status == 200, body
    assert headers["X-CPN-Site"] == "sh-edge" and headers["X-CPN-Route"] == "failover"
    assert 0.9 <= waited_s < 4.0, waited_s  # the 1 s ack timeout; without it 8 s (site timeout)
    view = hub.registry.get("hz-edge")
    assert view is not None and view.state == "up" and view.silent  # not lost: silent
    assert hub.bus.stats.ack_timeouts == 1
    _, metrics, _ = await tenant.call("GET", "/metrics")
    assert 'cpn_nats_errors_total{kind="ack_timeout"} 1.0' in metrics

    # Passed over while silent: the next requests go straight to Shanghai, streaming included.
    status, _, headers = await tenant.call("POST", "/v1/chat/completions", CHAT)
    assert status == 200 and headers["X-CPN-Site"] == "sh-edge" and headers["X-CPN-Route"] != "failover"
    async with tenant.session.post(tenant.base + "/v1/chat/completions", json={**CHAT, "stream": True},
                                   headers=tenant.headers({})) as resp:
        assert resp.status == 200 and resp.headers["X-CPN-Site"] == "sh-edge"
        assert (await resp.read()).decode().rstrip().endswith("data: [DONE]")
    assert hub.bus.stats.ack_timeouts == 1

    proxy.set_pass()  # the link heals: the agent reconnects, registers, and is heard again
    await until(lambda: not view.silent, 15, "hz-edge heard from again")
    status, _, headers = await tenant.call("POST", "/v1/chat/completions", CHAT)
    assert status == 200 and headers["X-CPN-Site"] == "hz-edge"


async def test_a_restarted_hub_serves_within_a_round_trip_not_a_heartbeat(tmp_path: Path, nats_server: NatsServer) -> None:
    """A restarted hub knows no replica until sites speak; it asks the sites it has seen to register
    at once. Heartbeats here are 5 s apart, so waiting for them would take up to 5 s."""
    config = hub_config(tmp_path, nats_server.url, heartbeat_s=5.0)
    hz = agent("hz-edge", "hangzhou", nats_server.url)
    try:
        async with running_hub(config) as hub:
            key = hub.create_tenant("acme", default_origin="hangzhou")
            await hz.start()
            await until(lambda: (v := hub.registry.get("hz-edge")) is not None and v.slots_free("qwen") > 0, 10,
                        "hz-edge ready")
        started = time.monotonic()
        async with running_hub(config) as hub, aiohttp.ClientSession() as session:
            tenant = Client(session, f"http://127.0.0.1:{hub.http_port}", key)
            async def served() -> bool:
                status = (await tenant.call("POST", "/v1/chat/completions", CHAT))[0]
                assert status in (200, 404, 503), status  # 404, 503: no replica known yet
                return status == 200

            await until(served, 10, "a chat answer from the restarted hub")
            served_after_s = time.monotonic() - started
            assert served_after_s < 2.5, served_after_s  # a heartbeat could be 5 s away
            assert hub.registry.get("hz-edge").registered  # type: ignore[union-attr]
    finally:
        await hz.stop()
