"""The controller keeps leading through a NATS node's fault (issue: no single hub).

Real parts: a 3-node nats-server cluster on loopback (``sync_interval: always``) and three
``cpn hub --record nats`` subprocesses (each gateway and controller). The NATS node that leads the
record's stream ``CPN_RECORD`` is SIGKILLed (restarted later, same store) or SIGSTOPped (resumed
later) while a controller leads. Nothing can be written until the stream elects a new leader
(nats-server: 4-9 s). What is proved:

- the leading process keeps the lease: the epoch never changes (every ``GET /v1/cluster`` sampled
  through the fault names the same epoch or none), no hub logs a lost lease, and the fence is
  still at that epoch afterwards (any other acquisition moves it);
- a submission sent as the node fails is answered once the stream is back: a 2xx whose job then
  exists at every gateway, or the documented 503 whose retry with the same Idempotency-Key makes
  exactly one job; never a lost 2xx.

Before (renew deadline 2 s): the leader stepped down at its deadline and the country had no
controller for 5-10 s (``cpn chaos --ha``), then another process led with a newer epoch.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.hubprocs import HubArgs, cluster_view, scrape
from tests.support.hubrig import Client
from tests.support.natscluster import NatsCluster
from tests.support.waiting import until

JOB = {"name": "through-a-fault", "cards": 1, "accelerators": ["H20", "910B"], "est_hours": 2.0,
       "checkpoint_cost_s": 60}


@pytest.mark.serial
@pytest.mark.timeout(180)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # HubProc's log file
@pytest.mark.parametrize("fault", ["kill", "pause"])
async def test_a_fault_of_the_node_leading_the_record_stream_changes_no_controller(
        tmp_path: Path, cluster: NatsCluster, monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    from bench.submissions import HubProc

    args = HubArgs(tmp_path, ",".join(cluster.urls), monkeypatch)
    logs = args.logs

    hubs = [await HubProc.start(args("p1", "--create-admin-key"))]
    hubs += [await HubProc.start(args("p2")), await HubProc.start(args("p3"))]
    admin = hubs[0].admin_key
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            view: dict[str, Any] = {}
            deadline = time.monotonic() + 30
            while True:
                got = await cluster_view(session, hubs[1].port, admin)
                if got and got.get("leader") and got.get("nats_nodes") and any(
                        p["leading"] and p["state"] == "up" for p in got["processes"]):
                    view = got
                    break
                assert time.monotonic() < deadline, got
                await asyncio.sleep(0.1)
            epoch = view["leader"]["epoch"]
            leader_id = view["leader"]["hub_id"]
            (stream_leader,) = [n["name"] for n in view["nats_nodes"] if n["leader"]]
            status, made, _ = await Client(session, f"http://127.0.0.1:{hubs[0].port}", admin).call(
                "POST", "/v1/tenants", {"id": "acme"})
            assert status == 201, made
            tenant = made["api_key"]

            async def submit(port: int, key: str) -> tuple[int, Any]:
                status, body, _ = await Client(session, f"http://127.0.0.1:{port}", tenant).call(
                    "POST", "/v1/jobs", JOB, headers={"Idempotency-Key": key})
                return status, body

            async def known_everywhere() -> bool:  # a new key reaches each gateway's projection
                for hub in hubs:
                    status, _, _ = await Client(session, f"http://127.0.0.1:{hub.port}", tenant).call(
                        "GET", "/v1/jobs?limit=1")
                    if status != 200:
                        return False
                return True

            await until(known_everywhere, 20, "the tenant's key at every gateway", interval_s=0.2)
            assert (await submit(hubs[2].port, "before"))[0] in (200, 201)
            epochs_seen: set[int] = set()
            sampling = True

            async def sample() -> None:
                """Every 0.2 s through the fault: which epoch any gateway names (none while partial)."""
                while sampling:
                    for hub in hubs:
                        got = await cluster_view(session, hub.port, admin)
                        if got and got.get("leader"):
                            epochs_seen.add(got["leader"]["epoch"])
                    await asyncio.sleep(0.2)

            sampler = asyncio.create_task(sample())
            t0 = time.monotonic()
            if fault == "kill":
                await cluster.kill(stream_leader)
            else:
                await cluster.pause(stream_leader)
            # sent as the node fails: it waits for the stream's new leader
            status, during = await submit(hubs[1].port, "during")
            answered_s = time.monotonic() - t0
            assert status in (200, 201, 503), (status, during)
            await asyncio.sleep(2.0)  # the fault's length after the stream moved: the leader renews on
            if fault == "kill":
                await cluster.restart(stream_leader)
            else:
                await cluster.resume(stream_leader)
            after_status, after = await submit(hubs[0].port, "after")
            assert after_status in (200, 201), after
            sampling = False
            await sampler
            print(f"{fault} of the stream's leader node {stream_leader}: the submission during it answered "
                  f"{status} after {answered_s:.2f} s; epochs seen {sorted(epochs_seen)} (was {epoch})")

            # One controller all along: the same epoch everywhere, the fence unmoved, no lease lost.
            assert epochs_seen == {epoch}
            got = await cluster_view(session, hubs[2].port, admin)
            assert got and got["leader"]["epoch"] == epoch and got["leader"]["hub_id"] == leader_id, got
            assert [p["hub_id"] for p in got["processes"] if p["leading"]] == [leader_id], got
            for log in logs.iterdir():
                text = log.read_text(errors="replace")
                assert "lease_lost" not in text and "leadership_lost" not in text, (log.name, text[-2000:])
            # ... and /metrics says so: the leader rode the election out (counted), no process lost a
            # term or took one over early
            for name, hub in zip(("p1", "p2", "p3"), hubs):
                samples = await scrape(session, hub.port)
                rideouts = samples[("cpn_leader_rideouts_total", ())]
                assert rideouts >= 1 if name == leader_id else rideouts == 0, (name, rideouts)
                assert samples[("cpn_leader_early_takeovers_total", ())] == 0
                assert not [k for k, v in samples.items() if k[0] == "cpn_leadership_changes_total"
                            and ("change", "lost") in k[1] and v], (name, samples)

            # Nothing acknowledged was lost; a 503 retried with its key makes exactly one job. At
            # another gateway the retry may first meet a 409 "retry" (its projection had not seen the
            # key's first write yet, so its compare-and-set lost): a client retries that too.
            retried, again = 0, None

            async def retried_ok() -> bool:
                nonlocal retried, again
                retried, again = await submit(hubs[2].port, "during")
                assert retried in (200, 201, 409), again
                return retried in (200, 201)

            await until(retried_ok, 10, "the retry of the key sent during the fault", interval_s=0.2)
            assert again is not None
            if status != 503:
                assert again["id"] == during["id"]
            for hub in hubs:
                c = Client(session, f"http://127.0.0.1:{hub.port}", tenant)
                for job_id in (again["id"], after["id"]):
                    got_status, job, _ = await c.call("GET", f"/v1/jobs/{job_id}")
                    assert got_status == 200, (hub.port, job)
                got_status, listing, _ = await c.call("GET", "/v1/jobs?limit=100")
                assert got_status == 200 and len(listing["data"]) == 3, listing
    finally:
        for h in hubs:
            await h.stop()
        os.environ.pop("CPN_BENCH_LOGS", None)
