"""End to end: hub + three agents in three cities over a real nats-server, driven over HTTP.

demo-3 layout: edge pools in Shanghai, Hangzhou (165 km away) and Nanjing (267 km away).
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
from tests.support.hubrig import Client, hub_config, running_hub
from tests.support.waiting import until

SITES = {"sh-edge": ("shanghai", {"H20": 4}), "hz-edge": ("hangzhou", {"910B": 4}), "nj-edge": ("nanjing", {"L20": 4})}


def agent_config(site: str, url: str, tmp: Path) -> AgentConfig:
    city, cards = SITES[site]
    return AgentConfig(
        site=site, nats=url, city=city, tier="edge", accelerators=cards, heartbeat_s=0.25 if False else 1.0,
        data_dir=str(tmp / site), models=[ModelConfig(name="m", cards=1.0, slots=8)],
        backend=BackendConfig(sim=SimBackendConfig(ttft_ms=0, per_token_ms=0, slots=8)),
    )


@pytest.fixture
async def network(tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[tuple[Hub, dict[str, Agent], Client, Client]]:
    async with running_hub(hub_config(tmp_path, nats_server.url)) as hub:
        admin_key = hub.create_admin_key()
        key = hub.create_tenant("acme")
        agents = {s: Agent(agent_config(s, nats_server.url, tmp_path)) for s in SITES}
        await asyncio.gather(*(a.start() for a in agents.values()))
        await until(lambda: all((v := hub.registry.get(s)) is not None and "m" in v.replicas and v.replicas["m"].state == "ready" for s in SITES), 10, "agents ready")
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{hub.http_port}"
            try:
                yield hub, agents, Client(session, base, key), Client(session, base, admin_key)
            finally:
                await asyncio.gather(*(a.stop() for a in agents.values()), return_exceptions=True)


async def infer(tenant: Client, origin: str) -> tuple[int, dict[str, str], dict]:  # type: ignore[type-arg]
    status, body, headers = await tenant.call("POST", "/v1/infer", {"model": "m", "input": "hello", "origin": origin})
    return status, headers, body


async def test_nearest_site_serves_then_failover_on_loss_then_back(network, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    hub, agents, tenant, admin = network
    status, headers, body = await infer(tenant, "hangzhou")
    assert status == 200 and headers["X-CPN-Site"] == "hz-edge" and body["output"].startswith("hz-edge")

    await agents["hz-edge"].stop()
    killed = time.monotonic()
    # Until detection, requests still succeed: the hub fails over when hz-edge has no responders.
    status, headers, _ = await infer(tenant, "hangzhou")
    assert status == 200 and headers["X-CPN-Site"] in {"sh-edge", "nj-edge"}
    await until(lambda: hub.registry.get("hz-edge").state == "lost", 3.5, "hz-edge lost")  # type: ignore[union-attr]
    assert time.monotonic() - killed <= 3.5 + 0.3
    status, headers, _ = await infer(tenant, "hangzhou")
    assert status == 200 and headers["X-CPN-Site"] == "sh-edge", headers  # next nearest (165 km vs 235 km)
    _, sites, _ = await admin.call("GET", "/v1/sites")
    assert {s["id"]: s["state"] for s in sites["data"]}["hz-edge"] == "lost"

    agents["hz-edge"] = Agent(agent_config("hz-edge", hub.config.nats_url, tmp_path))
    await agents["hz-edge"].start()
    await until(lambda: (v := hub.registry.get("hz-edge")) is not None and v.state == "up" and v.slots_free("m") > 0, 10, "hz-edge back")
    status, headers, _ = await infer(tenant, "hangzhou")
    assert status == 200 and headers["X-CPN-Site"] == "hz-edge"


async def test_hub_restart_keeps_tenants_and_agents_reregister_by_themselves(tmp_path: Path, nats_server: NatsServer) -> None:
    config = hub_config(tmp_path, nats_server.url)
    agents = [Agent(agent_config(s, nats_server.url, tmp_path)) for s in SITES]
    try:
        async with running_hub(config) as hub:
            key = hub.create_tenant("acme", default_origin="nanjing")
            await asyncio.gather(*(a.start() for a in agents))
            await until(lambda: sum(1 for v in hub.registry if v.registered) == 3, 10, "registered")
        async with running_hub(config) as hub:
            await until(lambda: sum(1 for v in hub.registry if v.registered) == 3, 10, "re-registered")
            await until(lambda: "m" in hub.known_models() and hub.registry.get("nj-edge").slots_free("m") > 0, 5, "ready")  # type: ignore[union-attr]
            async with aiohttp.ClientSession() as session:
                tenant = Client(session, f"http://127.0.0.1:{hub.http_port}", key)
                status, body, headers = await tenant.call("POST", "/v1/infer", {"model": "m", "input": "after restart"})
                assert status == 200 and headers["X-CPN-Site"] == "nj-edge"
    finally:
        await asyncio.gather(*(a.stop() for a in agents), return_exceptions=True)
