"""End to end: tidal lending with a real hub, real agents and a real nats-server, the hub's time
injected (a ``ManualClock`` set to 06:50 China time): a training gang starts on the idle cards of an
edge pool ("lent until ..."), is told to checkpoint and stop before the forecast morning ramp
("reclaimed for inference"), and resumes from its checkpoint on a hub pool."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from controlplane.config import LendingConfig
from controlplane.nats.natsserver import NatsServer
from controlplane.store import jobs as store_jobs
from edge_agent.agent import Agent
from tests.e2e.test_training import agent_config, job, sim_job
from tests.support.hubrig import Client, hub_config, running_hub
from tests.support.manualclock import ManualClock
from tests.support.waiting import until

MIDNIGHT = 1795363200.0  # 2026-11-23 00:00 China local time
# Inference needs nothing before 07:00 local and every card from then on (illustrative, sharp).
PROFILE = (0.0,) * 7 + (4.0,) * 17


async def test_lent_edge_cards_are_reclaimed_checkpoint_first_and_the_job_resumes_on_the_hub(
        tmp_path: Path, nats_server: NatsServer) -> None:
    clock = ManualClock(start=MIDNIGHT + 6 * 3600 + 50 * 60)  # 06:50 local
    lend = LendingConfig(enabled=True, profile=PROFILE, margin_s=120.0, min_lend_s=300.0)
    config = hub_config(tmp_path, nats_server.url, sim_time_scale=60, lending=lend)
    async with running_hub(config, clock=clock) as hub:
        key = hub.create_tenant("acme")
        agents = {"hz-edge": Agent(agent_config("hz-edge", nats_server.url, tmp_path))}
        try:
            await agents["hz-edge"].start()
            await until(lambda: (v := hub.registry.get("hz-edge")) is not None and v.registered, 10, "edge registered")
            async with aiohttp.ClientSession() as session:
                tenant = Client(session, f"http://127.0.0.1:{hub.http_port}", key)
                status, sub, _ = await tenant.call("POST", "/v1/jobs", sim_job(est_hours=4.0))
                assert status == 201, sub
                jid = sub["id"]
                await until(lambda: job(hub, jid).state == "running" and job(hub, jid).pool == "hz-edge", 15,
                            "the job running on the edge's lent cards")
                lent = [e for e in store_jobs.events(hub.db, jid) if e.kind == "lent"]
                # 4 idle 910B, none needed before 07:00: lent until 06:58 (the 120 s margin)
                assert lent and lent[0].body["until"] == MIDNIGHT + 7 * 3600 - 120.0, lent
                # Its stop falls due at 06:58 − 30 s (its checkpoint) − 60 s: not yet at 06:56.
                clock.advance(6 * 60)
                await asyncio.sleep(1.5)
                assert job(hub, jid).state == "running"
                clock.advance(60)  # 06:57
                await until(lambda: job(hub, jid).state in ("queued", "restarting"), 15, "the lent attempt stopped")
                kinds = [e.kind for e in store_jobs.events(hub.db, jid)]
                assert "reclaimed" in kinds and kinds.index("reclaimed") < len(kinds) - 1
                row = job(hub, jid)
                assert row.progress > 0 and row.checkpoint_pool == "hz-edge"  # checkpointed before the stop
                reclaimed = [e for e in store_jobs.events(hub.db, jid) if e.kind == "reclaimed"][0]
                assert "reclaimed for inference" in reclaimed.body["reason"]
                # The edge lends nothing from now on; the hub pool comes up and the job resumes there.
                agents["sh-hub"] = Agent(agent_config("sh-hub", nats_server.url, tmp_path))
                await agents["sh-hub"].start()
                await until(lambda: job(hub, jid).state == "running" and job(hub, jid).pool == "sh-hub", 15,
                            "the job resumed on the hub")
                assert job(hub, jid).attempt == 2
        finally:
            await asyncio.gather(*(a.stop() for a in agents.values()), return_exceptions=True)
