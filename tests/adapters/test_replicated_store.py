"""The hub's record replicated: two hub instances, each with its own SQLite file, on one real
3-node nats-server cluster (loopback, sync_interval always), ``record = "nats"``.

What these prove (each failed before this: with ``record = "sqlite"`` two hubs share nothing):
a tenant and key made at A work at B within 1 s; a key revoked at A is refused at B within 1 s;
an Idempotency-Key sent to A then B returns the same job; two concurrent writers of one row:
exactly one wins, the other's transaction is rolled back everywhere; usage from both hubs adds
up; one NATS node killed during writes: no error; two killed: writes get 503 naming the reason,
reads go on; a fresh process rebuilds its SQLite projection from the record.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from controlplane.compose import build_hub
from controlplane.core.jobspec import JobSpec
from controlplane.core.errors import RecordConflict, RecordUnavailable
from controlplane.core.usage import UsageRow
from controlplane.hub import Hub
from controlplane.replicated import kv
from controlplane.replicated.bridge import RecordBridge
from controlplane.store import jobs as store_jobs
from controlplane.store import replica
from controlplane.store import tenants as store_tenants
from controlplane.store import usage as store_usage
from controlplane.store.db import open_db, transaction
from tests.support.hubrig import Client, hub_config
from tests.support.natscluster import NatsCluster
from tests.support.recordrig import record_hub, stream_leader
from tests.support.waiting import until


def spec(cards: int) -> JobSpec:
    return JobSpec(cards=cards, accelerators=("A800",), est_hours=1.0)


JOB = {"name": "llm-7b", "cards": 4, "accelerators": ["A800", "910B"], "est_hours": 2.0, "checkpoint_cost_s": 60}


# Several hubs on a fresh 3-node cluster whose stream elections take seconds: run alone, after the
# parallel pass of `make test`, where three other workers do not stretch them past their deadlines.
pytestmark = pytest.mark.serial

async def start(tmp: Path, cluster: NatsCluster, name: str, **kw: Any) -> Hub:
    return await record_hub(tmp, ",".join(cluster.urls), name, **kw)


@pytest.fixture
async def two(tmp_path: Path, cluster: NatsCluster) -> AsyncIterator[tuple[Hub, Hub, aiohttp.ClientSession]]:
    a = await start(tmp_path, cluster, "hub-a")
    b = await start(tmp_path, cluster, "hub-b")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            yield a, b, session
    finally:
        await b.stop()
        await a.stop()


def client(session: aiohttp.ClientSession, hub: Hub, key: str) -> Client:
    return Client(session, f"http://127.0.0.1:{hub.http_port}", key)


async def first_ok(c: Client, method: str, path: str, deadline_s: float) -> float:
    """Seconds until ``c``'s request answers 200 (polling every 10 ms)."""
    started = time.monotonic()
    while True:
        status, body, _ = await c.call(method, path)
        if status == 200:
            return time.monotonic() - started
        assert status == 401, body
        assert time.monotonic() - started < deadline_s, f"{path} still {status} after {deadline_s} s: {body}"
        await asyncio.sleep(0.01)


async def test_tenant_and_key_made_at_a_work_at_b_then_revoked_at_a_is_refused_at_b(two) -> None:  # type: ignore[no-untyped-def]
    a, b, session = two
    admin_key = a.create_admin_key("test")
    admin_a = client(session, a, admin_key)
    status, made, _ = await admin_a.call("POST", "/v1/tenants", {"id": "acme"})
    assert status == 201, made
    acme_b = client(session, b, made["api_key"])
    took = await first_ok(acme_b, "GET", "/v1/usage", deadline_s=1.0)
    assert took < 1.0
    took_admin = await first_ok(client(session, b, admin_key), "GET", "/v1/tenants", deadline_s=1.0)
    assert took_admin < 1.0
    # B has the key in its in-memory ring now; A revokes it.
    status, keys, _ = await admin_a.call("GET", "/v1/tenants/acme/keys")
    [key_id] = [k["id"] for k in keys["data"]]
    status, revoked, _ = await admin_a.call("DELETE", f"/v1/tenants/acme/keys/{key_id}")
    assert status == 200 and revoked["state"] == "revoked", revoked
    started = time.monotonic()
    while True:
        status, body, _ = await acme_b.call("GET", "/v1/usage")
        if status == 401:
            break
        assert status == 200, body
        assert time.monotonic() - started < 1.0, "revoked key still accepted at B after 1 s"
        await asyncio.sleep(0.01)
    assert body["error"]["code"] == "api_key_revoked"


async def test_a_provider_key_made_at_a_works_at_b_for_its_statement_only(two) -> None:  # type: ignore[no-untyped-def]
    """A provider's key (role 'provider', migration 0034) is a record row like any key."""
    a, b, session = two
    admin_a = client(session, a, a.create_admin_key("test"))
    status, made, _ = await admin_a.call("POST", "/v1/providers/xirang-7/keys")
    assert status == 201 and made["provider_id"] == "xirang-7", made
    xirang_b = client(session, b, made["api_key"])
    await first_ok(xirang_b, "GET", "/v1/statements", deadline_s=1.0)
    status, body, _ = await xirang_b.call("GET", "/v1/statements")
    assert body["account"] == "provider:xirang-7", body
    status, body, _ = await xirang_b.call("GET", "/v1/usage")
    assert status == 403, body


async def test_idempotency_key_at_a_then_b_returns_the_same_job(two) -> None:  # type: ignore[no-untyped-def]
    a, b, session = two
    key = a.create_tenant("acme")
    header = {"Idempotency-Key": "run-1"}
    s1, first, _ = await client(session, a, key).call("POST", "/v1/jobs", JOB, headers=header)
    assert s1 == 201, first
    s2, second, h2 = await client(session, b, key).call("POST", "/v1/jobs", JOB, headers=header)
    assert (s2, second["id"]) == (201, first["id"]) and h2["Idempotent-Replayed"] == "true", second
    assert [j.id for j in store_jobs.list_jobs(b.db, "acme")] == [first["id"]]
    assert [j.id for j in store_jobs.list_jobs(a.db, "acme")] == [first["id"]]
    async with session.get(f"http://127.0.0.1:{a.http_port}/metrics") as resp:
        metrics = await resp.text()
    assert "cpn_record_quorum 1.0" in metrics and "cpn_record_conflicts_total 0.0" in metrics, metrics
    assert "cpn_record_projection_fills_total " in metrics and "cpn_record_watch_restarts_total " in metrics
    [published] = [float(line.split()[1]) for line in metrics.splitlines()
                   if line.startswith("cpn_record_rows_published_total ")]
    assert published >= 3  # the tenant, its key, the job and its idempotency key


async def test_two_concurrent_writers_of_one_row_exactly_one_wins(two) -> None:  # type: ignore[no-untyped-def]
    a, b, _ = two
    job, _ = store_jobs.create_job(a.db, "acme", spec(1), None, "h", time.time())
    await until(lambda: store_jobs.get_job(b.db, job.id) is not None, 2, "the job at B")
    both_read = threading.Barrier(2, timeout=10)

    def writer(hub: Hub, name: str) -> str:
        try:
            with transaction(hub.db):
                assert store_jobs.get_job(hub.db, job.id).name == ""  # type: ignore[union-attr]
                both_read.wait()  # both read the same revision before either commits
                store_jobs.update_job(hub.db, job.id, time.time(), name=name)
        except RecordConflict:
            return "lost"
        return "won"

    outcomes = await asyncio.gather(asyncio.to_thread(writer, a, "by-a"), asyncio.to_thread(writer, b, "by-b"))
    assert sorted(outcomes) == ["lost", "won"], outcomes
    winner = "by-a" if outcomes[0] == "won" else "by-b"
    for hub in (a, b):  # the loser's local commit was rolled back, and the winner's write reached it
        await until(lambda: store_jobs.get_job(hub.db, job.id).name == winner, 2, f"{winner} at {hub.config.hub_id}")  # type: ignore[union-attr]


async def test_usage_from_both_hubs_adds_up_and_a_fresh_process_rebuilds_everything(two, tmp_path: Path,
                                                                                  cluster: NatsCluster) -> None:  # type: ignore[no-untyped-def]
    a, b, _ = two
    a.create_tenant("acme")
    job, _ = store_jobs.create_job(b.db, "acme", spec(2), "k1", "h", time.time())
    for hub, n in ((a, 3), (b, 4), (a, 5)):
        store_usage.add_rows(hub.db, [UsageRow(tenant="acme", model="m/7b", site="s1", requests=n, prompt_tokens=10 * n)])

    def total(hub: Hub) -> Any:
        return store_usage.for_tenant(hub.db, "acme")["totals"]["requests"]

    for hub in (a, b):
        await until(lambda: total(hub) == 12, 2, f"usage 12 at {hub.config.hub_id}")
    fresh = await start(tmp_path, cluster, "hub-c")  # an empty SQLite file of its own
    try:
        assert total(fresh) == 12
        assert store_usage.for_tenant(fresh.db, "acme")["totals"]["prompt_tokens"] == 120
        assert [j.id for j in store_jobs.list_jobs(fresh.db, "acme")] == [job.id]
        assert fresh.tenant("acme") is not None
        # and it writes on: its own usage adds to the others'
        store_usage.add_rows(fresh.db, [UsageRow(tenant="acme", model="m/7b", site="s1", requests=1)])
        await until(lambda: total(a) == 13, 2, "usage 13 at A")
    finally:
        await fresh.stop()
    # A restarted process whose file is stale rebuilds from the record too (and keeps its own counts).
    store_usage.add_rows(a.db, [UsageRow(tenant="acme", model="m/7b", site="s1", requests=2)])  # C does not see it
    again = await start(tmp_path, cluster, "hub-c")
    try:
        assert total(again) == 15
        store_usage.add_rows(again.db, [UsageRow(tenant="acme", model="m/7b", site="s1", requests=1)])
        await until(lambda: total(a) == 16 and total(b) == 16, 2, "usage 16 at A and B")
    finally:
        await again.stop()


async def test_one_nats_node_killed_during_writes_no_error(two, cluster: NatsCluster) -> None:  # type: ignore[no-untyped-def]
    a, b, session = two
    key = a.create_tenant("acme")
    clients = [client(session, a, key), client(session, b, key)]
    await first_ok(clients[1], "GET", "/v1/usage", 5)  # B has applied the key (else a 401, not this test's point)
    answers: list[tuple[int, str]] = []
    stop = asyncio.Event()

    async def submit(c: Client) -> None:
        while not stop.is_set():
            status, body, _ = await c.call("POST", "/v1/jobs", JOB)
            answers.append((status, body["id"] if status == 201 else str(body)[:200]))

    writers = [asyncio.create_task(submit(c)) for c in clients]
    await until(lambda: len(answers) >= 20, 10, "20 submissions")
    await cluster.kill(await stream_leader(cluster))  # the worst node to lose: writes wait for an election
    before = len(answers)
    await until(lambda: len(answers) >= before + 40, 30, "40 submissions after the kill")
    stop.set()
    await asyncio.gather(*writers)
    assert {s for s, _ in answers} == {201}, [a for a in answers if a[0] != 201][:3]
    ids = {i for _, i in answers}
    assert len(ids) == len(answers)

    def held(hub: Hub) -> set[str]:
        return {j.id for j in store_jobs.list_jobs(hub.db, "acme", limit=10_000)}

    # A or B may have watched through the killed node: what a watch missed, its projection's
    # supervisor reads from the record within two checks (a second), so both hold every job within seconds
    await until(lambda: held(a) == ids and held(b) == ids, 5, "A and B hold every acknowledged job",
                last=lambda: (len(ids), len(held(a)), len(held(b)),
                              [h.db.write_hook.bridge.projection.filled for h in (a, b)],
                              [h.db.write_hook.bridge.projection.restarts for h in (a, b)]))


async def test_two_nats_nodes_killed_writes_refused_with_503_reads_go_on(tmp_path: Path, cluster: NatsCluster) -> None:
    a = await start(tmp_path, cluster, "hub-a", record_write_deadline_s=2.0)
    try:
        key = a.create_tenant("acme")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            acme = client(session, a, key)
            status, job, _ = await acme.call("POST", "/v1/jobs", JOB)
            assert status == 201
            store_usage.add_rows(a.db, [UsageRow(tenant="acme", model="m", site="s1", requests=1)])
            leader = await stream_leader(cluster)
            others = [n.name for n in cluster.nodes if n.name != leader]
            await cluster.kill(others[0])
            await cluster.kill(others[1])
            status, body, _ = await acme.call("POST", "/v1/jobs", JOB, headers={"Idempotency-Key": "after"})
            assert status == 503 and body["error"]["code"] == "record_unavailable", body
            assert "quorum" in body["error"]["message"]
            # Further writes are refused at once (one probe a second), not after a whole deadline each.
            started = time.monotonic()
            for _ in range(5):
                status, body, _ = await acme.call("POST", "/v1/jobs", JOB, headers={"Idempotency-Key": "after"})
                assert status == 503 and body["error"]["code"] == "record_unavailable", body
            assert time.monotonic() - started < 1.5
            assert a.db.write_hook.no_quorum == 6 and a.db.write_hook.bridge.degraded_since is not None
            # Usage metered meanwhile is kept (locally) and published once the quorum is back.
            store_usage.add_rows(a.db, [UsageRow(tenant="acme", model="m", site="s1", requests=2)])
            assert store_usage.for_tenant(a.db, "acme")["totals"]["requests"] == 3
            assert a.db.write_hook.usage_unpublished
            status, listing, _ = await acme.call("GET", "/v1/jobs")  # reads answer from the projection
            assert status == 200 and [j["id"] for j in listing["data"]] == [job["id"]], listing
            status, _, _ = await acme.call("GET", f"/v1/jobs/{job['id']}")
            assert status == 200
            # A key this process does not know cannot be called invalid while it cannot read the
            # record (it may have been issued a moment ago at another gateway): 503, not 401.
            status, body, _ = await client(session, a, "sk-not-known-here").call("GET", "/v1/jobs")
            assert status == 503 and body["error"]["code"] == "record_unavailable", body
            assert len(store_jobs.list_jobs(a.db, "acme")) == 1  # the refused write is not in the projection
            # Quorum back: the retry with the same key is accepted, or finds its own earlier write (a
            # refused write's outcome is unknown: the survivor may have stored it). While the record
            # comes back a retry may also meet that write as a conflict (409): retry again.
            await cluster.restart(others[0])
            await cluster.restart(others[1])
            started = time.monotonic()
            while True:
                status, body, _ = await acme.call("POST", "/v1/jobs", JOB, headers={"Idempotency-Key": "after"})
                if status == 201:
                    break
                assert (status, body["error"]["code"]) in {(503, "record_unavailable"), (409, "record_conflict")}, body
                assert time.monotonic() - started < 30, body
                await asyncio.sleep(0.2)
            await until(lambda: len(store_jobs.list_jobs(a.db, "acme")) == 2, 5, "the accepted job in the projection")
            assert body["id"] in {j.id for j in store_jobs.list_jobs(a.db, "acme")}
            status, again, _ = await acme.call("POST", "/v1/jobs", JOB, headers={"Idempotency-Key": "after"})
            assert (status, again["id"]) == (201, body["id"])  # exactly one job for the key
            # went with the writes after the quorum's return, or with the next change the record brought
            await until(lambda: not a.db.write_hook.usage_unpublished, 5, "usage published")
        record = await kv.Record.open(cluster.urls, create=False)
        try:
            entry = await record.get("usage.hub-a.acme.m.s1")
            assert msgspec.json.decode(entry.value)["row"]["requests"] == 3  # each flush counted once
        finally:
            await record.close()
    finally:
        await a.stop()


async def test_an_existing_sqlite_hub_moves_to_the_replicated_record(tmp_path: Path, cluster: NatsCluster) -> None:
    """An empty record is seeded from the first process's SQLite file: its tenants, keys, jobs and
    usage reach a second process that never saw that file."""
    (tmp_path / "hub-a").mkdir()
    plain = build_hub(hub_config(tmp_path / "hub-a", cluster.urls[0], hub_id="hub-a"))  # record = "sqlite"
    await plain.start()
    try:
        key = plain.create_tenant("acme")
        job, _ = store_jobs.create_job(plain.db, "acme", spec(2), "k1", "h", time.time())
        store_usage.add_rows(plain.db, [UsageRow(tenant="acme", model="m", site="s1", requests=7)])
    finally:
        await plain.stop()
    a = await start(tmp_path, cluster, "hub-a")  # the same file, now on the record
    b = await start(tmp_path, cluster, "hub-b")
    try:
        assert [j.id for j in store_jobs.list_jobs(b.db, "acme")] == [job.id]
        assert store_usage.for_tenant(b.db, "acme")["totals"]["requests"] == 7
        async with aiohttp.ClientSession() as session:
            status, _, _ = await client(session, b, key).call("GET", "/v1/usage")
            assert status == 200
    finally:
        await b.stop()
        await a.stop()


async def test_hub_processes_share_the_record_and_losing_one_loses_nothing(tmp_path: Path, cluster: NatsCluster) -> None:
    """``cpn hub --record nats`` processes: what one acknowledged survives its SIGKILL, the others
    go on writing, and a new process with an empty file answers for all of it."""
    from bench.submissions import HubProc

    urls = ",".join(cluster.urls)

    def args(name: str, *extra: str) -> list[str]:
        return ["--listen", "127.0.0.1:0", "--record", "nats", "--nats", urls, "--db", str(tmp_path / name / "hub.db"),
                "--hub-id", name, *extra]

    first = await HubProc.start(args("p1", "--create-admin-key"))
    second = await HubProc.start(args("p2"))
    third: HubProc | None = None
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            admin = Client(session, f"http://127.0.0.1:{first.port}", first.admin_key)
            status, made, _ = await admin.call("POST", "/v1/tenants", {"id": "acme"})
            assert status == 201, made
            at = {p: Client(session, f"http://127.0.0.1:{p.port}", made["api_key"]) for p in (first, second)}
            ids = []
            for i in range(10):
                status, job, _ = await at[first].call("POST", "/v1/jobs", JOB, headers={"Idempotency-Key": f"k{i}"})
                assert status == 201, job
                ids.append(job["id"])
            first.proc.send_signal(signal.SIGKILL)  # acknowledged writes of a dead process are in the record
            await first.proc.wait()
            for i in range(10, 15):
                status, job, _ = await at[second].call("POST", "/v1/jobs", JOB, headers={"Idempotency-Key": f"k{i}"})
                assert status == 201, job
                ids.append(job["id"])
            status, replay, _ = await at[second].call("POST", "/v1/jobs", JOB, headers={"Idempotency-Key": "k3"})
            assert (status, replay["id"]) == (201, ids[3])  # sent to the dead process first: the same job
            third = await HubProc.start(args("p3"))  # an empty file: everything from the record
            fresh = Client(session, f"http://127.0.0.1:{third.port}", made["api_key"])
            status, listing, _ = await fresh.call("GET", "/v1/jobs?limit=100")
            assert status == 200 and sorted(j["id"] for j in listing["data"]) == sorted(ids), listing
    finally:
        for p in (first, second, third):
            if p is not None:
                await p.stop()


async def test_a_deployment_made_at_a_gives_its_tenant_the_model_at_b(two) -> None:  # type: ignore[no-untyped-def]
    a, b, session = two
    key = a.create_tenant("acme")
    body = {"model": "qwen", "origins": ["hangzhou"], "budget_ms": 10, "cards_per_replica": 0.25, "min_cities": 2}
    status, dep, _ = await client(session, a, key).call("POST", "/v1/deployments", body)
    assert status in (201, 202), dep
    at_b = client(session, b, key)

    async def models() -> list[str]:
        status, listing, _ = await at_b.call("GET", "/v1/models")
        assert status == 200, listing
        return [m["id"] for m in listing["data"]]

    started = time.monotonic()
    while "qwen" not in await models():
        assert time.monotonic() - started < 1.0, "the deployment made at A is not among B's models after 1 s"
        await asyncio.sleep(0.01)


async def test_seeding_a_record_another_process_filled_meanwhile_is_retried_not_fatal(
        tmp_path: Path, cluster: NatsCluster) -> None:
    """A process that read the record empty seeds it from its own file with create-only writes. If
    another process filled it meanwhile (or the first read came before the record's snapshot: seen
    in ``cpn chaos --ha`` as a restarted hub that exited on a Conflict on ``tenant.demo``), the seed
    fails with RecordUnavailable, which a hub's start tries again, never with a Conflict that ends
    the process; opened again, the file takes the record's rows."""
    for name in ("hub-a", "hub-b"):
        (tmp_path / name).mkdir()
        plain = build_hub(hub_config(tmp_path / name, cluster.urls[0], hub_id=name))  # record = "sqlite"
        await plain.start()
        try:
            plain.create_tenant("acme", name=f"acme of {name}")
        finally:
            await plain.stop()
    a = await start(tmp_path, cluster, "hub-a")  # seeds the empty record from hub-a's file
    try:
        db = open_db(str(tmp_path / "hub-b" / "hub.db"), factory=replica.ReplicatedDatabase)
        assert isinstance(db, replica.ReplicatedDatabase)
        bridge = RecordBridge(cluster.urls, name="hub-b-late")
        await asyncio.to_thread(bridge.start)
        try:
            late = replica.Replica(db, bridge, "hub-b")
            late.install()
            # hub-b's first read found the record empty: it seeds, and meets hub-a's rows
            with pytest.raises(RecordUnavailable, match="another process seeded it"):
                await asyncio.to_thread(late._seed)
        finally:
            db.conn.close()
            bridge.close()
        b = await start(tmp_path, cluster, "hub-b")  # opened again: the record's rows win
        try:
            assert store_tenants.get_tenant(b.db, "acme")["name"] == "acme of hub-a"
        finally:
            await b.stop()
    finally:
        await a.stop()
