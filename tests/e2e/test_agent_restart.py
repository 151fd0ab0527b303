"""A site's agent is SIGKILLed mid-attempt and started again: the real hub restarts the job from its
checkpoint at once, on the agent's own report, without waiting for the site to be declared lost."""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap
import time
from pathlib import Path

import aiohttp

from controlplane.nats.natsserver import NatsServer
from controlplane.store import jobs as store_jobs
from edge_agent.training import LOST_DETAIL
from tests.e2e.test_training import SITES, checkpoints, job, sim_job
from tests.support.waiting import until
from tests.support.hubrig import Client, hub_config, running_hub

ROOT = Path(__file__).resolve().parents[2]


async def _agent(config: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controlplane.cli", "agent", "--config", str(config), "--log-level", "WARNING",
        cwd=ROOT, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


def _config(tmp: Path, site: str, url: str) -> Path:
    city, tier, cards = SITES[site]
    path = tmp / f"{site}.toml"
    path.write_text(textwrap.dedent(f"""
        site = "{site}"
        nats = "{url}"
        city = "{city}"
        tier = "{tier}"
        accelerators = {{ {", ".join(f'{k} = {v}' for k, v in cards.items())} }}
        data_dir = "{tmp / site}"
        [bus]
        reconnect_wait_s = 0.2
        register_backoff_max_s = 0.5
        event_backoff_max_s = 0.5
        [executors]
        enabled = ["sim"]
    """))
    return path


async def test_sigkilled_agent_restarted_makes_the_hub_restart_its_job_at_once(
        tmp_path: Path, nats_server: NatsServer) -> None:
    # The site is declared lost only after 30 s of silence: any restart sooner is the agent's doing.
    cfg = hub_config(tmp_path, nats_server.url, sim_time_scale=1200, miss_limit=30)
    async with running_hub(cfg) as hub:
        key = hub.create_tenant("acme")
        procs = {s: await _agent(_config(tmp_path, s, nats_server.url)) for s in SITES}
        try:
            await until(lambda: all((v := hub.registry.get(s)) is not None and v.registered for s in SITES), 20,
                        "agents registered")
            async with aiohttp.ClientSession() as session:
                tenant = Client(session, f"http://127.0.0.1:{hub.http_port}", key)
                status, sub, _ = await tenant.call("POST", "/v1/jobs", sim_job(est_hours=4.0))
                assert status in (200, 201, 202), sub
            jid = sub["id"]
            await until(lambda: len(checkpoints(hub, jid, 1)) >= 2, 20, "attempt 1 checkpointed twice")
            site = job(hub, jid).pool
            at_kill = job(hub, jid)

            procs[site].send_signal(signal.SIGKILL)
            await procs[site].wait()
            killed_at = time.time()
            procs[site] = await _agent(_config(tmp_path, site, nats_server.url))

            await until(lambda: len(store_jobs.attempts(hub.db, jid)) == 2
                        and store_jobs.attempts(hub.db, jid)[1].started_at is not None, 20, "attempt 2 started")
            a1, a2 = store_jobs.attempts(hub.db, jid)
            assert hub.registry.get(site).state == "up"  # type: ignore[union-attr]  # never declared lost
            assert (a1.exit_reason, a1.detail) == ("infra_failure", LOST_DETAIL)
            assert a2.started_at is not None and a2.started_at - killed_at < 15
            row = job(hub, jid)
            assert row.infra_restarts == 1 and row.user_retries == 0
            assert row.progress >= at_kill.progress > 0  # resumed from the checkpoint, not from zero
            exits = [e for e in store_jobs.events(hub.db, jid) if e.kind == "attempt_exited" and e.attempt == 1]
            assert len(exits) == 1 and exits[0].body["detail"] == LOST_DETAIL
        finally:
            for proc in procs.values():
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
            await asyncio.gather(*(p.wait() for p in procs.values()))
