"""nats-server dies and comes back under traffic: everyone reconnects, nothing is falsely lost."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from controlplane.nats.natsserver import NatsServer
from edge_agent.agent import Agent
from tests.e2e.test_foundation import SITES, agent_config
from tests.support.waiting import until
from tests.support.hubrig import Client, hub_config, running_hub


async def test_nats_restart_under_traffic(tmp_path: Path, nats_server: NatsServer) -> None:
    async with running_hub(hub_config(tmp_path, nats_server.url)) as hub:
        key = hub.create_tenant("acme", default_origin="shanghai")
        agents = [Agent(agent_config(s, nats_server.url, tmp_path)) for s in SITES]
        await asyncio.gather(*(a.start() for a in agents))
        try:
            await until(lambda: all((v := hub.registry.get(s)) is not None and v.slots_free("m") > 0 for s in SITES), 10, "ready")
            async with aiohttp.ClientSession() as session:
                tenant = Client(session, f"http://127.0.0.1:{hub.http_port}", key)
                outcomes: list[tuple[float, int]] = []
                stop = asyncio.Event()

                async def traffic() -> None:
                    while not stop.is_set():
                        status, _, _ = await tenant.call("POST", "/v1/infer", {"model": "m", "input": "x"})
                        outcomes.append((time.monotonic(), status))
                        await asyncio.sleep(0.02)  # a steady trickle of traffic, not a wait

                task = asyncio.create_task(traffic())
                await until(lambda: len(outcomes) >= 5, 5, "traffic flowing")
                losses_before = hub.metrics.site_losses._value.get()
                await nats_server.restart(kill=True)
                restarted = time.monotonic()
                # Traffic resumes once hub and agents have reconnected.
                await until(lambda: any(t > restarted and s == 200 for t, s in outcomes), 15, "inference resumed")
                resumed_after = min(t for t, s in outcomes if t > restarted and s == 200) - restarted
                # Hold on past a full detection period: nobody may be declared lost. The behaviour is
                # this span of wall time (the agents heartbeat on the wall clock): not a wait for an event.
                await asyncio.sleep(hub.registry.detection_s + 0.5)
                stop.set()
                await task
                assert hub.metrics.site_losses._value.get() == losses_before
                assert all(v.state == "up" for v in hub.registry)
                assert outcomes[-1][1] == 200
                assert resumed_after < 10, resumed_after
        finally:
            await asyncio.gather(*(a.stop() for a in agents), return_exceptions=True)
