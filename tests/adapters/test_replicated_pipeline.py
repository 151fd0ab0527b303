"""The record's write path without a stall: hub processes on a real 3-node nats-server cluster
(loopback, sync_interval always), ``record = "nats"``, submissions through real HTTP.

What these prove (each failed before: one write transaction at a time per process, the bridge
blocking the event loop until the quorum answered):

- while the stream's leader node is paused (SIGSTOP) and submissions wait for the election, a
  gateway's event loop keeps running (no stall over 0.5 s) and reads answer; once a new leader is
  elected every submission gets its 201, and all of them were in flight at the record together
  (counted, not timed); two submissions with one Idempotency-Key at one process: the second waits
  for the first's batch and replays its job;
- a compare-and-set lost by one submission (the same Idempotency-Key at two processes at once)
  runs that submission again alone (it then replays the winner's job, or 409): the other writes in
  flight with it all land, once;
- a scheduler tick deciding more jobs than one atomic batch of the record holds commits (in
  chunks), where before it was refused at every tick.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from controlplane.compose import build
from controlplane.core.jobspec import JobSpec
from controlplane.store import jobs as store_jobs
from controlplane.store.db import transaction
from tests.support.hubrig import Client, hub_config
from tests.support.natscluster import NatsCluster
from tests.support.recordrig import LoopWatch, record_hub, replica, stream_leader
from tests.support.waiting import until

JOB = {"name": "llm-7b", "cards": 4, "accelerators": ["A800", "910B"], "est_hours": 2.0, "checkpoint_cost_s": 60}

# A fresh 3-node cluster whose stream elections take seconds: run alone, after the parallel pass.
pytestmark = pytest.mark.serial


async def test_writes_wait_out_a_paused_stream_leader_without_stalling_the_loop(tmp_path: Path,
                                                                                 cluster: NatsCluster) -> None:
    leader = await stream_leader(cluster)
    follower = next(n for n in cluster.nodes if n.name != leader)
    # A gateway (it decides nothing: the leader's decisions still commit the blocking way), connected
    # to a node that stays up.
    hub = await record_hub(tmp_path, follower.url, "gw-a", role="gateway", record_nats_urls=[follower.url])
    try:
        key = hub.create_tenant("acme")
        rep = replica(hub)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            acme = Client(session, f"http://127.0.0.1:{hub.http_port}", key)
            status, first, _ = await acme.call("POST", "/v1/jobs", JOB)
            assert status == 201
            writes_before, peak_before = rep.bridge.writes, rep.in_flight_peak
            assert peak_before == 1
            await cluster.pause(leader)
            try:
                with LoopWatch() as watch:
                    n = 12
                    posts = [asyncio.create_task(acme.call("POST", "/v1/jobs", JOB)) for _ in range(n)]
                    same = [asyncio.create_task(acme.call("POST", "/v1/jobs", JOB, headers={"Idempotency-Key": "k1"}))
                            for _ in range(2)]
                    await until(lambda: rep.in_flight >= n, 10, "the submissions in flight at the record")
                    async with session.get(f"http://127.0.0.1:{hub.http_port}/metrics") as resp:
                        metrics = await resp.text()
                    gauge = [line for line in metrics.splitlines() if line.startswith("cpn_record_writes_in_flight ")]
                    assert gauge and float(gauge[0].split()[1]) >= n, gauge
                    # Meanwhile reads answer from the projection, quickly, again and again.
                    listings: list[list[str]] = []
                    while not all(p.done() for p in posts):
                        started = time.monotonic()
                        status, listing, _ = await acme.call("GET", "/v1/jobs")
                        assert status == 200, listing
                        assert time.monotonic() - started < 0.5
                        listings.append([j["id"] for j in listing["data"]])
                        await asyncio.sleep(0.05)
                    answers = await asyncio.gather(*posts)
                    twins = await asyncio.gather(*same)
            finally:
                await cluster.resume(leader)
            assert [s for s, _, _ in answers] == [201] * n, [b for s, b, _ in answers if s != 201][:2]
            assert [s for s, _, _ in twins] == [201, 201], twins
            assert twins[0][1]["id"] == twins[1][1]["id"]  # one job for the key: the second waited, replayed
            assert len(listings) >= 5, listings  # the election took seconds and the reads went on throughout
            assert listings[0] == [first["id"]]  # nothing in flight is seen before the record has it
            assert watch.worst_s < 0.5, f"the event loop stood still for {watch.worst_s:.2f} s"
            # Counted: all n + 1 batches were in flight at the record together (one at a time before),
            # one acknowledged write each; the key's second submission ran again after the first.
            assert rep.in_flight_peak >= n + 1, rep
            assert rep.write_waits >= 1, rep
            assert rep.bridge.writes - writes_before == n + 1, rep
            ids = {b["id"] for _, b, _ in answers} | {twins[0][1]["id"], first["id"]}
            assert all(set(seen) <= ids for seen in listings)
            assert {j.id for j in store_jobs.list_jobs(hub.db, "acme", limit=1000)} == ids
    finally:
        await hub.stop()


async def test_a_lost_compare_and_set_runs_that_submission_again_alone(tmp_path: Path, cluster: NatsCluster) -> None:
    """The same Idempotency-Key at two processes at once: one write wins the key's compare-and-set;
    the other (a submission asks the record for no read barrier) catches up and runs again, and
    answers the winner's job (or 409 when the winner's batch was still being replicated at its
    second try), never a second job; the writes in flight with it all land, once."""
    url = cluster.urls[0]
    a = await record_hub(tmp_path, url, "hub-a", record_nats_urls=[url])
    b = await record_hub(tmp_path, url, "hub-b", record_nats_urls=[url])
    try:
        key = a.create_tenant("acme")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            at_a = Client(session, f"http://127.0.0.1:{a.http_port}", key)
            at_b = Client(session, f"http://127.0.0.1:{b.http_port}", key)
            await until(lambda: b.db.conn.execute("SELECT 1 FROM tenants WHERE id = 'acme'").fetchone() is not None,
                        5, "the tenant at B")
            accepted: set[str] = set()
            lost = 0
            for round_ in range(20):
                k = f"race-{round_}"
                retried = [replica(a).optimistic_retries, replica(b).optimistic_retries]
                calls = [at_a.call("POST", "/v1/jobs", JOB, headers={"Idempotency-Key": k}),
                         at_b.call("POST", "/v1/jobs", JOB, headers={"Idempotency-Key": k})]
                calls += [at_a.call("POST", "/v1/jobs", JOB) for _ in range(6)]
                answers = await asyncio.gather(*calls)
                others = answers[2:]
                assert [s for s, _, _ in others] == [201] * 6, [b for s, b, _ in others if s != 201][:2]
                accepted |= {body["id"] for _, body, _ in others}
                racers = answers[:2]
                won = {body["id"] for s, body, _ in racers if s == 201}
                assert len(won) == 1, racers  # never two jobs for one key
                for s, body, _ in racers:
                    assert s == 201 or (s, body["error"]["code"]) == (409, "record_conflict"), body
                accepted |= won
                for racer, hub, before in zip(racers, (a, b), retried):
                    if replica(hub).optimistic_retries > before:  # it lost the key: ran again, replayed
                        lost += 1
                        status, _, headers = racer
                        assert status == 409 or headers.get("Idempotent-Replayed") == "true", racers
                if lost >= 1 and round_ >= 2:
                    break
            assert lost >= 1, "no round where a racer's write lost the key's compare-and-set"
            assert replica(a).conflicts + replica(b).conflicts >= 1
            for hub in (a, b):  # every accepted job exists once, at both processes; nothing else does
                await until(lambda: {j.id for j in store_jobs.list_jobs(hub.db, "acme", limit=10_000)} == accepted,
                            5, f"{hub} holds exactly the accepted jobs")
    finally:
        await b.stop()
        await a.stop()


async def test_a_scheduler_tick_of_more_decisions_than_one_batch_holds_commits(tmp_path: Path,
                                                                               cluster: NatsCluster) -> None:
    """1,200 queued jobs, one tick: more rows than one atomic batch of the record takes (1,000).
    Before, the tick's one transaction was refused (record_batch_too_large) at every tick, forever."""
    (tmp_path / "hub-a").mkdir()
    proc = build(hub_config(tmp_path / "hub-a", cluster.urls[0], hub_id="hub-a", record="nats"))
    hub = proc.hub
    await hub.start()
    try:
        hub.create_tenant("acme")
        spec = JobSpec(cards=4, accelerators=("A800",), est_hours=1.0)
        for chunk in range(2):  # 600 rows per transaction: within one batch
            with transaction(hub.db):
                for i in range(600):
                    store_jobs.create_job(hub.db, "acme", spec, None, "", time.time(), job_id=f"job-bulk{chunk}x{i}")
        services = replica(hub)
        proc.services.training.poke()

        def decided() -> bool:
            rows = store_jobs.list_jobs(hub.db, "acme", limit=10_000)
            return len(rows) == 1200 and all(r.reason or r.state != "queued" for r in rows)

        await until(decided, 30, "every job placed or told why it waits")
        assert services.conflicts == 0
    finally:
        await hub.stop()


async def test_cancels_wait_out_a_paused_stream_leader_without_stalling_the_loop(tmp_path: Path,
                                                                                  cluster: NatsCluster) -> None:
    """A tenant's cancel is awaited like a submission (before: a blocking transaction that held
    the loop until the record answered): with the stream's leader node paused, three cancels are in
    flight at the record together while reads answer, and each lands once a new leader is elected."""
    leader = await stream_leader(cluster)
    follower = next(n for n in cluster.nodes if n.name != leader)
    hub = await record_hub(tmp_path, follower.url, "gw-c", role="gateway", record_nats_urls=[follower.url])
    try:
        key = hub.create_tenant("acme")
        rep = replica(hub)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            acme = Client(session, f"http://127.0.0.1:{hub.http_port}", key)
            ids = []
            for _ in range(3):
                status, job, _ = await acme.call("POST", "/v1/jobs", JOB)
                assert status == 201, job
                ids.append(job["id"])
            await cluster.pause(leader)
            try:
                with LoopWatch() as watch:
                    cancels = [asyncio.create_task(acme.call("DELETE", f"/v1/jobs/{i}")) for i in ids]
                    await until(lambda: rep.in_flight >= 3, 10, "the cancels in flight at the record")
                    status, listing, _ = await acme.call("GET", "/v1/jobs")
                    assert status == 200 and {j["state"] for j in listing["data"]} == {"queued"}  # none seen early
                    answers = await asyncio.gather(*cancels)
            finally:
                await cluster.resume(leader)
            assert [s for s, _, _ in answers] == [200] * 3, answers
            assert {b["state"] for _, b, _ in answers} == {"cancelled"}
            assert watch.worst_s < 0.5, f"the event loop stood still for {watch.worst_s:.2f} s"
            assert {j.state for j in store_jobs.list_jobs(hub.db, "acme")} == {"cancelled"}
    finally:
        await hub.stop()
