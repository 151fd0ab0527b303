"""A hub whose capacity follows demand, with simulated agents that preload nothing, for the
end-to-end tests of the autoscaler: a real nats-server, the hub deciding every 0.3 s (scale in
after 2 s idle, demand meter 1 s / 3 s) and each site a real agent with a sim backend (40 ms to
the first token, 5 ms a token, 8 slots, 0.2 s to load a model), heartbeating every 0.5 s.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from controlplane.config import AutoscaleConfig
from controlplane.hub import Hub
from edge_agent.agent import Agent
from edge_agent.config import AgentConfig, BackendConfig, SimBackendConfig
from tests.support.hubrig import Client, hub_config, running_hub
from tests.support.waiting import until

FAST = AutoscaleConfig(interval_s=0.3, scale_in_after_s=2.0, demand_fast_s=1.0, demand_slow_s=3.0)
"""The autoscaler's short cool-down: what the tests wait for is seconds, not the default minutes."""


def sim_site(site: str, city: str, cards: dict[str, int], url: str, tmp: Path) -> AgentConfig:
    return AgentConfig(
        site=site, nats=url, city=city, tier="edge", accelerators=dict(cards), heartbeat_s=0.5,
        data_dir=str(tmp / site),
        backend=BackendConfig(sim=SimBackendConfig(ttft_ms=40, per_token_ms=5, slots=8, load_time_s=0.2)),
    )


@asynccontextmanager
async def autoscaling(tmp: Path, url: str, sites: dict[str, tuple[str, dict[str, int]]],
                      **hub_kw: Any) -> AsyncIterator[tuple[Hub, Client]]:
    """The hub (``hub_kw``: more settings) and one agent per ``site: (city, cards)``, each heard at
    the hub; yields the hub and tenant ``acme`` (origin Hangzhou, no rate limit to speak of)."""
    config = hub_config(tmp, url, heartbeat_s=0.5, autoscale=FAST, **hub_kw)
    async with running_hub(config) as hub:
        key = hub.create_tenant("acme", default_origin="hangzhou", rate_per_s=10_000, burst=10_000)
        agents = [Agent(sim_site(s, city, cards, url, tmp)) for s, (city, cards) in sites.items()]
        try:
            await asyncio.gather(*(a.start() for a in agents))
            await until(lambda: all((v := hub.registry.get(s)) is not None and v.heartbeats > 0 for s in sites),
                        timeout_s=10, what="agents heard")
            async with aiohttp.ClientSession() as session:
                yield hub, Client(session, f"http://127.0.0.1:{hub.http_port}", key)
        finally:
            await asyncio.gather(*(a.stop() for a in agents), return_exceptions=True)
