"""The leader's SIGKILL during a burst of submissions, and a leader frozen past its lease (issue: no
single hub).

Real parts: a 3-node nats-server cluster on loopback (``sync_interval: always``), three
``cpn hub --record nats`` subprocesses (each gateway and controller, own hub id and projection),
two real agents running the jobs. What is proved:

- SIGKILL of the leading process: another leads within 5 s (measured from the kill to the first
  ``GET /v1/cluster`` naming a new leader with a newer epoch);
- every 2xx answer names a job that exists exactly once, and a retry of every Idempotency-Key
  (at any surviving gateway) returns the same id;
- no job's attempt that was running is restarted (every job ends on attempt 1, started once), and
  no site ever runs two attempts of one job, nor do two sites run the same job.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.fakehub import agent_config, running
from tests.support.hubprocs import HubArgs, cluster_view
from tests.support.hubrig import DEMO3, Client
from tests.support.natscluster import NatsCluster
from tests.support.waiting import until

JOB = {"name": "burst", "cards": 1, "accelerators": ["H20", "910B"], "est_hours": 2.0, "checkpoint_cost_s": 60}
SITES = {"sh-edge": "H20", "hz-edge": "910B"}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # HubProc's log file
@pytest.mark.parametrize("fault", ["kill", "pause"])
async def test_the_leaders_sigkill_or_pause_during_a_burst_loses_and_duplicates_nothing(
        tmp_path: Path, cluster: NatsCluster, monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    """``kill``: SIGKILL of the leading process. ``pause``: SIGSTOP past its lease, SIGCONT once
    another leads: it steps down, sends nothing (agents would refuse its epoch), its gateway serves
    again, and nothing it decided while frozen lands."""
    from bench.submissions import HubProc

    # The demo layout with room for the burst: 64 cards at each of the two sites.
    layout = tmp_path / "layout.toml"
    layout.write_text(DEMO3.read_text().replace("accelerators = { H20 = 4 }", "accelerators = { H20 = 64 }")
                      .replace("accelerators = { 910B = 4 }", "accelerators = { 910B = 64 }"))
    args = HubArgs(tmp_path, ",".join(cluster.urls), monkeypatch, layout=layout)
    cfgs = [agent_config(cluster.urls[i], site=s, data_dir=str(tmp_path / s), accelerators={"H20": 0, acc: 64}, heartbeat_s=0.5)
            for i, (s, acc) in enumerate(SITES.items())]
    hubs = [await HubProc.start(args("p1", "--create-admin-key"))]
    hubs += [await HubProc.start(args("p2")), await HubProc.start(args("p3"))]
    admin = hubs[0].admin_key
    try:
        async with running(cfgs[0]) as a1, running(cfgs[1]) as a2, \
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            agents = (a1, a2)
            await asyncio.wait_for(a1.registered.wait(), 20)
            await asyncio.wait_for(a2.registered.wait(), 20)
            # Which process leads (any gateway tells).
            by_port = {h.port: h for h in hubs}
            view: dict[str, Any] = {}

            async def led() -> bool:
                got = await cluster_view(session, hubs[1].port, admin)
                if got and got.get("leader"):
                    view.update(got)
                    return any(p["leading"] and p["state"] == "up" for p in got["processes"])
                return False

            deadline = time.monotonic() + 20
            while not await led():
                assert time.monotonic() < deadline, view
                await asyncio.sleep(0.1)
            old_epoch = view["leader"]["epoch"]
            (leader_port,) = [int(p["listen"].rsplit(":", 1)[1]) for p in view["processes"] if p["leading"]]
            leader = by_port[leader_port]
            status, made, _ = await Client(session, f"http://127.0.0.1:{hubs[0].port}", admin).call(
                "POST", "/v1/tenants", {"id": "acme"})
            assert status == 201, made
            key = made["api_key"]
            alive = list(hubs)
            answers: dict[str, str] = {}
            killed_at: list[float] = []

            async def submit(k: str) -> None:
                """Submit under Idempotency-Key ``k`` until a 2xx, moving to another gateway when one fails."""
                tries = 0
                while True:
                    hub = alive[(hash(k) + tries) % len(alive)]
                    tries += 1
                    try:
                        status, body, _ = await Client(session, f"http://127.0.0.1:{hub.port}", key).call(
                            "POST", "/v1/jobs", JOB, headers={"Idempotency-Key": k})
                    except (aiohttp.ClientError, asyncio.TimeoutError):
                        await asyncio.sleep(0.05)
                        continue
                    if status in (200, 201):
                        assert answers.setdefault(k, body["id"]) == body["id"], (k, body)
                        return
                    assert status == 503, (status, body)  # the record's quorum while a node moves: retry
                    await asyncio.sleep(0.05)

            keys = [f"burst-{i}" for i in range(60)]

            async def burst() -> None:
                for i in range(0, len(keys), 6):
                    await asyncio.gather(*(submit(k) for k in keys[i:i + 6]))
                    if i == 18:  # a third in: the leader dies or freezes (its gateway's requests move on)
                        leader.proc.send_signal(signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
                        killed_at.append(time.monotonic())
                        alive.remove(leader)

            await burst()
            # A new leader, within 5 s of the kill, with a newer epoch.
            survivor = alive[0]
            while True:
                got = await cluster_view(session, survivor.port, admin)
                if got and got.get("leader") and got["leader"]["epoch"] > old_epoch and any(
                        p["leading"] and p["state"] == "up" and p["pid"] != leader.proc.pid for p in got["processes"]):
                    break
                assert time.monotonic() - killed_at[0] < 5.0, got
                await asyncio.sleep(0.05)
            takeover_s = time.monotonic() - killed_at[0]
            print(f"takeover after the leader's SIG{'KILL' if fault == 'kill' else 'STOP'}: {takeover_s:.2f} s")
            if fault == "kill":
                await leader.proc.wait()
            else:
                leader.proc.send_signal(signal.SIGCONT)
                # It wakes believing it leads; it must step down, and one process leads.
                deadline = time.monotonic() + 10
                while True:
                    got = await cluster_view(session, leader.port, admin)
                    if got and [p["pid"] for p in got["processes"] if p["leading"] and p["state"] == "up"] == [
                            p["pid"] for p in got["processes"] if p["hub_id"] == got["leader"]["hub_id"]] and \
                            got["leader"]["epoch"] > old_epoch and not any(
                                p["leading"] for p in got["processes"] if p["pid"] == leader.proc.pid):
                        break
                    assert time.monotonic() < deadline, got
                    await asyncio.sleep(0.1)
                alive.append(leader)  # its gateway serves again
                after = [f"after-{i}" for i in range(6)]
                keys.extend(after)
                await asyncio.gather(*(submit(k) for k in after))

            # Every key's retry, at each surviving gateway, returns the same id; each 2xx job exists once.
            for hub in alive:
                c = Client(session, f"http://127.0.0.1:{hub.port}", key)
                for k in keys:
                    status, body, _ = await c.call("POST", "/v1/jobs", JOB, headers={"Idempotency-Key": k})
                    assert status in (200, 201) and body["id"] == answers[k], (k, status, body)
                status, listing, _ = await c.call("GET", "/v1/jobs?limit=500")
                assert status == 200
                ids = [j["id"] for j in listing["data"]]
                assert sorted(ids) == sorted(answers.values()) and len(set(ids)) == len(keys), listing

            # Every job ends up running, each on its first attempt, at exactly one site.
            c = Client(session, f"http://127.0.0.1:{survivor.port}", key)
            jobs: dict[str, Any] = {}

            async def all_running() -> bool:
                status, listing, _ = await c.call("GET", "/v1/jobs?limit=500")
                jobs.update({j["id"]: j for j in listing["data"]})
                return status == 200 and all(j["state"] == "running" for j in listing["data"])

            deadline = time.monotonic() + 30
            while not await all_running():
                assert time.monotonic() < deadline, {j["id"]: (j["state"], j["attempt"]) for j in jobs.values()}
                await asyncio.sleep(0.2)
            restarted = {j["id"]: j["attempt"] for j in jobs.values() if j["attempt"] != 1}
            print(f"jobs on a later attempt: {restarted}")
            where: dict[str, list[tuple[str, int]]] = {}
            for agent in agents:
                for job_id, handle in agent.training.attempts.items():
                    where.setdefault(job_id, []).append((agent.site, handle.attempt))
            assert set(where) == set(answers.values())
            assert all(len(v) == 1 and v[0][1] == jobs[k]["attempt"] for k, v in where.items()), where
            stale = sum(a.counters.get("stale_epoch", 0) for a in agents)
            print(f"commands refused as stale_epoch by the agents: {stale}")
            if fault == "kill":
                assert stale == 0
            # Not restarted: an attempt acknowledged slowly (the loaded machine, a takeover) is not
            # failed as vanished the moment its acknowledgement comes (it was, before the fix).
            assert not restarted, restarted
    finally:
        for h in hubs:
            await h.stop()
