"""The hub is SIGKILLed at random points during a burst of job submissions with idempotency keys.

After each restart, clients retry with the same key. Every submission that got a 2xx must exist
exactly once, and a retry with its key must get the original job id.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
from pathlib import Path

import aiohttp
import pytest

from controlplane.nats.natsserver import NatsServer
from tests.support.hubrig import DEMO3

N_JOBS = 150
KILLS = 3


async def start_hub(cfg: Path) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controlplane.cli", "hub", "--config", str(cfg),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env={**os.environ, "CPN_LOG": "ERROR"},
    )
    assert proc.stdout is not None
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line, "hub exited during start-up"
        if "listening on" in line:
            return proc, line.strip().rsplit(" ", 1)[1]


@pytest.mark.timeout(180)
async def test_sigkill_during_a_submission_burst_loses_and_duplicates_nothing(tmp_path: Path, nats_server: NatsServer) -> None:
    db = tmp_path / "hub.db"
    made = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controlplane.cli", "tenant", "create", "acme", "--rate", "100000", "--db", str(db),
        stdout=asyncio.subprocess.PIPE,
    )
    key = (await made.communicate())[0].decode().strip()
    cfg = tmp_path / "hub.toml"
    port = 0
    proc, url = None, ""

    async def boot() -> None:
        nonlocal proc, url, port
        cfg.write_text(f'nats_url = "{nats_server.url}"\ndb_path = "{db}"\nlayout = "{DEMO3}"\nlisten_port = {port}\n'
                       "default_rate_per_s = 100000.0\ndefault_burst = 100000\n")
        proc, url = await start_hub(cfg)
        port = int(url.rsplit(":", 1)[1])

    await boot()
    accepted: dict[str, str] = {}
    retried: set[str] = set()
    progress = asyncio.Event()  # set at each accepted submission: the kills follow the burst, not the clock
    rng = random.Random(7)
    body = {"cards": 2, "accelerators": ["A800"], "est_hours": 1.0}

    async def submit(session: aiohttp.ClientSession, idem: str) -> None:
        while True:
            try:
                async with session.post(f"{url}/v1/jobs", json={**body, "name": idem},
                                        headers={"Authorization": f"Bearer {key}", "Idempotency-Key": idem},
                                        timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    if resp.status in (200, 201):
                        job = (await resp.json())["id"]
                        assert accepted.setdefault(idem, job) == job, f"{idem}: two ids for one key"
                        progress.set()
                        return
                    assert resp.status >= 500 or resp.status == 503, (resp.status, await resp.text())
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                pass
            retried.add(idem)
            await asyncio.sleep(0.05)  # the client's retry back-off (part of the burst being tested)

    async def killer() -> None:
        for k in range(KILLS):
            # a kill once 1/5, 2/5 and 3/5 of the burst is accepted (a fast hub takes a whole burst within a
            # fixed delay), then a random moment later: the fault lands inside the burst whatever the hub's speed
            while len(accepted) < (k + 1) * N_JOBS // (KILLS + 2):
                progress.clear()
                await progress.wait()
            await asyncio.sleep(rng.uniform(0, 0.02))
            assert proc is not None
            proc.kill()
            await proc.wait()
            await boot()

    try:
        async with aiohttp.ClientSession() as session:
            sem = asyncio.Semaphore(4)

            async def one(i: int) -> None:
                async with sem:
                    await submit(session, f"burst-{i}")

            await asyncio.gather(killer(), *(one(i) for i in range(N_JOBS)))
            assert len(accepted) == N_JOBS
            assert len(retried) >= KILLS, "the kills did not land inside the burst"
            # Every accepted job exists exactly once; a retry with its key returns the original id.
            async with session.get(f"{url}/v1/jobs?limit=1000", headers={"Authorization": f"Bearer {key}"}) as resp:
                listing = (await resp.json())["data"]
            names = [j["name"] for j in listing]
            assert sorted(names) == sorted(accepted) and len(set(names)) == len(names)
            assert {j["id"] for j in listing} == set(accepted.values())
            for idem in rng.sample(sorted(accepted), 10):
                async with session.post(f"{url}/v1/jobs", json={**body, "name": idem},
                                        headers={"Authorization": f"Bearer {key}", "Idempotency-Key": idem}) as resp:
                    assert resp.status in (200, 201) and (await resp.json())["id"] == accepted[idem]
    finally:
        if proc is not None and proc.returncode is None:
            proc.terminate()
            await proc.wait()
