"""A replica the autoscaler added is scaled in by the next hub too: the mark "added by the
autoscaler" is in the record (``replicas.scaled_at``), not in one process's memory. Before, a
restarted hub protected every replica it found and the burst's replica stayed for good."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from controlplane.nats.natsserver import NatsServer
from controlplane.store import deployments as store_deployments
from edge_agent.agent import Agent
from tests.e2e.test_capacity import INFER, SITES, live
from tests.e2e.test_deployments import until_state
from tests.support.capacityrig import FAST, sim_site
from tests.support.hubrig import Client, hub_config, running_hub
from tests.support.waiting import until


async def test_a_restarted_hub_scales_in_the_replica_the_last_one_added(tmp_path: Path, nats_server: NatsServer) -> None:
    config = hub_config(tmp_path, nats_server.url, heartbeat_s=0.5, autoscale=FAST)
    agents = [Agent(sim_site(s, city, cards, nats_server.url, tmp_path)) for s, (city, cards) in SITES.items()]
    try:
        async with running_hub(config) as hub:
            key = hub.create_tenant("acme", default_origin="hangzhou", rate_per_s=10_000, burst=10_000)
            await asyncio.gather(*(a.start() for a in agents))
            await until(lambda: all((v := hub.registry.get(s)) is not None and v.heartbeats > 0 for s in SITES),
                        timeout_s=10, what="agents heard")
            async with aiohttp.ClientSession() as session:
                tenant = Client(session, f"http://127.0.0.1:{hub.http_port}", key)
                status, dep, _ = await tenant.call("POST", "/v1/deployments", {
                    "model": "qwen", "origins": ["hangzhou"], "budget_ms": 10, "cards_per_replica": 0.25,
                    "min_cities": 1, "slots_per_replica": 2, "min_replicas": 1, "max_replicas": 2})
                assert status == 201, dep
                dep, _ = await until_state(tenant, dep["id"], lambda d: d["state"] == "ready", 10, "ready")
                stop = asyncio.Event()

                async def client_loop() -> None:
                    while not stop.is_set():
                        await tenant.call("POST", "/v1/infer", INFER)

                loops = [asyncio.create_task(client_loop()) for _ in range(3)]
                try:
                    dep, _ = await until_state(
                        tenant, dep["id"], lambda d: len(live(d)) == 2 and all(s == "ready" for s in live(d).values()),
                        20, "a second replica under the burst")
                finally:
                    stop.set()
                    await asyncio.gather(*loops)
                added = set(live(dep)) - {"hz-edge"}
                assert len(added) == 1
                marked = store_deployments.scaled_replicas(hub.db)
                assert set(marked) == {(dep["id"], next(iter(added)))}  # recorded with the placement
        # A new hub process on the same record: it knows which replica the autoscaler added.
        async with running_hub(config) as hub:
            await until(lambda: all((v := hub.registry.get(s)) is not None and v.heartbeats > 0 for s in SITES),
                        timeout_s=15, what="agents back")
            async with aiohttp.ClientSession() as session:
                tenant = Client(session, f"http://127.0.0.1:{hub.http_port}", key)
                dep, _ = await until_state(tenant, dep["id"], lambda d: set(live(d)) == {"hz-edge"}, 30,
                                           "the added replica scaled in by the new hub")
                assert any(why.startswith(f"-{next(iter(added))}: a replica idle") for why in dep["scaling"]["scale_in"])
                assert store_deployments.scaled_replicas(hub.db) == {}
    finally:
        await asyncio.gather(*(a.stop() for a in agents), return_exceptions=True)
