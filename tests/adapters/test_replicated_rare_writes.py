"""The leader's rare decisions without a stall: a controller on a real 3-node nats-server cluster
(loopback, sync_interval always), ``record = "nats"``, a real agent, real HTTP.

What this proves (each failed before: these paths committed with a blocking ``transaction()``,
which waits for the record's quorum with the event loop held, so every tenant of the process
waited for the whole stream election, 4-9 s, or here for as long as the quorum is gone):

- a site lost while the record has no quorum (the stream's leader node and the agent's node
  paused): the training service fails the site's live attempt and the deployments service marks
  its replica lost and reconciles, each written awaited; meanwhile the hub's loop keeps answering
  ``/healthz`` promptly and nothing of those decisions is in SQLite before the record has it
  (decide, then do); once a quorum is back they land (the attempt restarts, the replica is lost);
- a start refused by its site while the record has no quorum: the attempt's failure and its
  event wait for the quorum awaited, the loop goes on, and they land once the quorum is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import pytest

from controlplane.compose import build
from controlplane.core import jobspec
from controlplane.core.registry import Transition
from controlplane.core.replicas import DeploymentSpec
from controlplane.replicated.lease_rules import LeaseConfig
from controlplane.store import deployments as store_deployments
from controlplane.store import jobs as store_jobs
from controlplane.store import outbox as store_outbox
from controlplane.store.jobs import JobRow
from controlplane.store.replica import Replica
from edge_agent import wire
from edge_agent.agent import Agent
from edge_agent.config import AgentConfig
from tests.support.fakehub import agent_config, running
from tests.support.hubrig import Client, hub_config
from tests.support.natscluster import NatsCluster
from tests.support.recordrig import Probes, assert_answered, holds_for, pausing, stream_leader
from tests.support.waiting import until

SPEC = jobspec.JobSpec(name="rare", cards=1, accelerators=("H20",), est_hours=1.0, checkpoint_cost_s=60)

pytestmark = pytest.mark.serial  # a fresh 3-node cluster whose quorum is taken away for seconds


async def _controller(tmp_path: Path, cluster: NatsCluster) -> tuple[object, str, str, str]:
    """A controller on a node that stays up; the stream's leader node; the node left for the agent."""
    leader_node = await stream_leader(cluster)
    ctl_node = next(n for n in cluster.nodes if n.name != leader_node)
    agent_node = next(n for n in cluster.nodes if n.name not in (leader_node, ctl_node.name))
    (tmp_path / "ctl").mkdir()
    proc = build(hub_config(tmp_path / "ctl", ctl_node.url, hub_id="ctl", record="nats",
                            record_nats_urls=[ctl_node.url]))
    # a renew deadline longer than the quorum's absence: what is tested is the loop, not the lease
    proc.services.leadership.lease = LeaseConfig(lease_duration_s=40.0, renew_deadline_s=30.0, retry_period_s=0.4)
    return proc, leader_node, agent_node.name, agent_node.url


class Leading(NamedTuple):
    hub: Any
    services: Any
    db: Any
    rep: Replica
    job: JobRow
    leader_node: str
    agent_node: str
    cfg: AgentConfig


@contextlib.asynccontextmanager
async def _leading(tmp_path: Path, cluster: NatsCluster) -> AsyncIterator[Leading]:
    """:func:`_controller` started and leading, tenant ``acme`` (origin Shanghai) with one job
    submitted, and the config of an agent (``sh-edge``) on the node left for it; stopped after."""
    proc, leader_node, agent_node, _ = await _controller(tmp_path, cluster)
    hub = proc.hub  # type: ignore[attr-defined]
    services = proc.services  # type: ignore[attr-defined]
    await hub.start()
    try:
        await until(lambda: services.leadership.leading, 10, "the controller leads")
        rep = hub.db.write_hook
        assert isinstance(rep, Replica)
        hub.create_tenant("acme", default_origin="shanghai")
        job, _ = await services.training.submit_async("acme", SPEC, None, "h1", time.time())
        ctl_url = next(n.url for n in cluster.nodes if n.name not in (leader_node, agent_node))
        cfg = agent_config(ctl_url, site="sh-edge", data_dir=str(tmp_path / "agent"))
        yield Leading(hub, services, hub.db, rep, job, leader_node, agent_node, cfg)
    finally:
        await hub.stop()


async def test_a_site_lost_without_quorum_is_written_awaited_and_the_loop_answers(
        tmp_path: Path, cluster: NatsCluster) -> None:
    async with _leading(tmp_path, cluster) as (hub, services, db, rep, job, leader_node, agent_node, cfg):
        agent = Agent(cfg)
        await asyncio.wait_for(agent.start(), 10)
        stopped = False
        try:
            await until(lambda: job.id in agent.training.attempts, 20, "the attempt runs at the site")
            await until(lambda: (store_jobs.get_job(db, job.id) or job).state == "running", 20, "the job running")
            view, _ = services.deployments.create("acme", DeploymentSpec(
                model="demo-chat", origins=["shanghai"], cards_per_replica=0.5, min_cities=1, budget_ms=50.0))
            dep_id = view["id"]
            await until(lambda: [r.state for r in store_deployments.replicas_of(db, dep_id)] == ["ready"], 20,
                        "the replica ready", last=lambda: (store_deployments.replicas_of(db, dep_id), store_deployments.get(db, dep_id)))
            fallbacks = rep.write_fallbacks
            # No quorum: the stream's leader node and the other follower paused. Then the site
            # stops: the controller declares it lost after its detection time.
            registry = services.training.registry

            def unacknowledged() -> None:  # they wait for a quorum that is not there
                assert rep.in_flight >= 1
                # decided, not acknowledged: nothing of it in SQLite, nothing in the outbox
                assert store_jobs.get_job(db, job.id).state == "running"  # type: ignore[union-attr]
                assert [r.state for r in store_deployments.replicas_of(db, dep_id)] == ["ready"]

            async with pausing(cluster, leader_node, agent_node, db=db):
                with Probes(hub.http_port) as probes:
                    await asyncio.wait_for(agent.stop(), 15)
                    stopped = True
                    await until(lambda: registry.get("sh-edge").state == "lost", 15,  # type: ignore[union-attr]
                                "the site declared lost")
                    await until(lambda: rep.in_flight >= 2, 10, "the lost site's writes in flight at the record",
                                last=lambda: rep)
                    await holds_for(2.0, unacknowledged)
                    waited = list(probes.times_s)
                    await cluster.resume(agent_node)  # a quorum again (a stream leader once elected)
                    await until(lambda: (store_jobs.get_job(db, job.id) or job).attempt >= 2
                                or (store_jobs.get_job(db, job.id) or job).state in ("queued", "restarting"), 30,
                                "the lost attempt failed", last=lambda: store_jobs.get_job(db, job.id))
                    await until(lambda: any(r.state != "ready" for r in
                                            store_deployments.replicas_of(db, dep_id, include_removed=True)), 30,
                                "the replica marked lost")
        finally:
            if not stopped:
                await asyncio.wait_for(agent.stop(), 15)
        first = store_jobs.attempts(db, job.id)[0]  # (the job's own reason moves on with its next plan)
        assert first.ended_at is not None and first.exit_reason == "site_lost" and "sh-edge" in first.detail, first
        assert services.training.counters["site_failures"] == 1
        # /healthz answered through the whole wait; held, each probe took the quorum's absence (2 s and more)
        assert_answered(waited, "the lost site's writes waited")
        assert rep.write_fallbacks == fallbacks, rep  # every one of them went the awaited way


async def test_a_refused_start_without_quorum_is_written_awaited_and_the_loop_answers(
        tmp_path: Path, cluster: NatsCluster) -> None:
    async with _leading(tmp_path, cluster) as (hub, services, db, rep, job, leader_node, agent_node, cfg):
        async with running(cfg):
            await until(lambda: (store_jobs.get_job(db, job.id) or job).state in ("placed", "starting", "running"),
                        20, "the job placed")
            placed = store_jobs.get_job(db, job.id)
            assert placed is not None
            [entry] = [e for e in store_outbox.for_job(db, job.id) if e.kind == "start_attempt"]
            cmd = wire.command_decoder.decode(entry.body)
            fallbacks = rep.write_fallbacks

            def unacknowledged() -> None:  # decided, not acknowledged: nothing of it in SQLite
                assert not refused.done()
                assert store_jobs.get_job(db, job.id).attempt == placed.attempt  # type: ignore[union-attr]
                assert "start_refused" not in [e.kind for e in store_jobs.events(db, job.id)]

            async with pausing(cluster, leader_node, agent_node, db=db):
                with Probes(hub.http_port) as probes:
                    # the outbox's report of a refusal (what its sender calls when a site answers
                    # a start with an error), without quorum
                    refused = asyncio.create_task(
                        services.training._on_refused(entry, cmd, "no_capacity: test", time.time()))
                    await until(lambda: rep.in_flight >= 1 or refused.done(), 10, "the refusal in flight at the record")
                    await holds_for(2.0, unacknowledged)
                    waited = list(probes.times_s)
                    await cluster.resume(agent_node)
                    await asyncio.wait_for(refused, 30)
        # the refusal landed: its event, and the attempt failed (the job is placed again after it)
        assert "start_refused" in [e.kind for e in store_jobs.events(db, job.id)]
        row = store_jobs.get_job(db, job.id)
        assert row is not None and (row.attempt > placed.attempt or "dispatch to sh-edge failed" in row.reason), row
        assert services.training.counters["dispatch_failures"] == 1
        assert_answered(waited, "the refusal's write waited", median_s=None)
        assert rep.write_fallbacks == fallbacks, rep


async def test_a_gateway_that_sees_a_site_lost_fails_none_of_its_attempts(tmp_path: Path, cluster: NatsCluster) -> None:
    """Only the deciding process fails a lost site's attempts. A gateway cut off from a site sees
    it "lost" too; before, its training service wrote the failure with no fence (a gateway holds
    none), so a partition between one gateway and a site restarted that site's healthy attempts."""
    urls = ",".join(cluster.urls)
    made = []
    for name, role in (("ctl", "hub"), ("gw", "gateway")):
        (tmp_path / name).mkdir()
        made.append(build(hub_config(tmp_path / name, urls, hub_id=name, role=role, record="nats")))
    ctl, gw = made
    for p in made:
        await p.hub.start()
    try:
        await until(lambda: ctl.services.leadership.leading, 10, "the hub leads")
        ctl.hub.create_tenant("acme")
        job, _ = await ctl.services.training.submit_async("acme", SPEC, None, "h1", time.time())
        cfg = agent_config(cluster.urls[0], site="sh-edge", data_dir=str(tmp_path / "agent"))
        async with running(cfg) as agent:
            await until(lambda: job.id in agent.training.attempts, 20, "the attempt runs at the site")
            await until(lambda: (store_jobs.get_job(gw.hub.db, job.id) or job).state == "running", 20,
                        "the gateway's projection has it running")
            assert not gw.services.leadership.leading and not gw.services.training.running
            gw.services.training.on_site(Transition(site="sh-edge", old="up", new="lost", at=time.time()))
            await asyncio.sleep(1.0)  # what a write would take (it is not awaited by on_site)
            for p in made:
                row = store_jobs.get_job(p.hub.db, job.id)
                assert row is not None and row.state == "running" and row.attempt == 1, row
            assert gw.services.training.counters["site_failures"] == 0
    finally:
        for p in made:
            await p.hub.stop()



async def test_a_vanished_attempt_without_quorum_is_written_awaited_and_the_loop_answers(
        tmp_path: Path, cluster: NatsCluster) -> None:
    """A site that leaves a running attempt out of its heartbeats (it restarted without it: here
    its heartbeats are told to list nothing) while the record has no quorum: the tick's vanished
    decision waits for the quorum awaited (before: a blocking transaction in the tick, the loop
    held for as long as the quorum was gone), and lands once it is back."""
    async with _leading(tmp_path, cluster) as (hub, services, db, rep, job, leader_node, agent_node, cfg):
        async with running(cfg) as agent:
            await until(lambda: (store_jobs.get_job(db, job.id) or job).state == "running", 20, "the job running")
            fallbacks = rep.write_fallbacks

            def unacknowledged() -> None:  # decided, not acknowledged: nothing of it in SQLite
                assert rep.in_flight >= 1
                assert store_jobs.get_job(db, job.id).state == "running"  # type: ignore[union-attr]

            async with pausing(cluster, leader_node, agent_node, db=db):
                with Probes(hub.http_port) as probes:
                    agent.training.refs = lambda: []  # its heartbeats now leave the attempt out
                    await until(lambda: rep.in_flight >= 1, 15, "the vanished decision in flight at the record",
                                last=lambda: (rep, services.training._missing))
                    await holds_for(2.0, unacknowledged)
                    waited = list(probes.times_s)
                    await cluster.resume(agent_node)
                    await until(lambda: services.training.counters["vanished"] == 1, 30, "the attempt failed as vanished")
        assert "vanished" in [e.kind for e in store_jobs.events(db, job.id)]
        assert_answered(waited, "the vanished decision waited", median_s=None)
        assert rep.write_fallbacks == fallbacks, rep


async def test_tenant_writes_without_quorum_are_awaited_and_answered_201_or_503_never_a_stall(
        tmp_path: Path, cluster: NatsCluster) -> None:
    """A tenant's deployment create and delete and a market quote, sent through real HTTP while the
    record has no quorum (the stream's leader node and another paused): each waits for the quorum
    awaited, so ``/healthz`` keeps answering at once, nothing of them is in SQLite meanwhile, and
    each is answered once the quorum is back: 201/200 (or 503 ``record_unavailable``, never a 2xx
    for a write that is not on a quorum). Before, each committed with a blocking ``transaction()``:
    every other request of the process waited for the whole absence."""
    async with _leading(tmp_path, cluster) as (hub, services, db, rep, job, leader_node, agent_node, cfg):
        key = hub.create_tenant("beta", default_origin="shanghai")
        async with aiohttp.ClientSession() as session:
            beta = Client(session, f"http://127.0.0.1:{hub.http_port}", key)
            body = {"model": "demo-chat", "origins": ["shanghai"], "min_cities": 1, "budget_ms": 50.0}
            status, first, _ = await beta.call("POST", "/v1/deployments", body)
            assert status == 201, first
            fallbacks = rep.write_fallbacks

            def unacknowledged() -> None:  # decided, not acknowledged: nothing of it in SQLite
                assert not any(c.done() for c in calls), [c.result() for c in calls if c.done()]
                assert [d.model for d in store_deployments.list_for_tenant(db, "beta")] == ["demo-chat"]
                assert store_deployments.get(db, first["id"]) is not None

            async with pausing(cluster, leader_node, agent_node, db=db):
                with Probes(hub.http_port) as probes:
                    calls = [
                        asyncio.create_task(beta.call("POST", "/v1/deployments", {**body, "model": "demo-2"},
                                                      headers={"Idempotency-Key": "k-2"})),
                        asyncio.create_task(beta.call("DELETE", f"/v1/deployments/{first['id']}")),
                        asyncio.create_task(beta.call("POST", "/v1/quotes", {
                            "name": "q", "cards": 1, "accelerators": ["H20"], "est_hours": 1.0})),
                    ]
                    await until(lambda: rep.in_flight >= 3, 10, "the three writes in flight at the record",
                                last=lambda: rep)
                    await holds_for(2.0, unacknowledged)
                    waited = list(probes.times_s)
                    await cluster.resume(agent_node)  # a quorum again
                    answers = await asyncio.wait_for(asyncio.gather(*calls), 30)
            (made, made_body, _), (deleted, _, _), (quoted, quote_body, _) = answers
            assert made in (201, 503) and deleted in (200, 503) and quoted in (201, 503), answers
            for status, payload, _ in answers:
                if status == 503:
                    assert payload["error"]["code"] == "record_unavailable", payload
            if made == 201:  # a 2xx only for what the record holds: in this process's projection too
                assert store_deployments.get(db, made_body["id"]) is not None
                status, again, headers = await beta.call("POST", "/v1/deployments", {**body, "model": "demo-2"},
                                                         headers={"Idempotency-Key": "k-2"})
                assert status == 201 and again["id"] == made_body["id"] and headers.get("Idempotent-Replayed") == "true"
            if deleted == 200:
                assert store_deployments.get(db, first["id"]) is None
            if quoted == 201:
                assert quote_body["id"].startswith("q-")
        print(f"answers after the quorum came back: {[a[0] for a in answers]}")
        assert_answered(waited, "the tenant writes waited")
        assert rep.write_fallbacks == fallbacks, rep  # every one of them went the awaited way


async def test_a_refused_start_whose_write_outlives_the_deadline_lands_once_the_quorum_is_back(
        tmp_path: Path, cluster: NatsCluster) -> None:
    """A start refused while the record has no quorum for longer than the write deadline: its
    write fails (503-like ``RecordNoQuorum``, outcome unknown), and the outbox entry is already
    gone (dropped as refused). Before, that refusal was lost for good: the job stayed at its
    attempt, ``placed`` in the record with nothing left to send it (until another leader took
    over). Now the report is written again until it lands, and lands once: one ``start_refused``
    event, one dispatch failure, the attempt failed once."""
    async with _leading(tmp_path, cluster) as (hub, services, db, rep, job, leader_node, agent_node, cfg):
        async with running(cfg):
            await until(lambda: (store_jobs.get_job(db, job.id) or job).state in ("placed", "starting", "running"),
                        20, "the job placed")
            placed = store_jobs.get_job(db, job.id)
            assert placed is not None
            [entry] = [e for e in store_outbox.for_job(db, job.id) if e.kind == "start_attempt"]
            cmd = wire.command_decoder.decode(entry.body)
            rep.bridge.write_deadline_s = 1.0  # type: ignore[attr-defined]  # outlived within the test's time
            async with pausing(cluster, leader_node, agent_node, db=db):
                refused = asyncio.create_task(
                    services.training._on_refused(entry, cmd, "no_capacity: test", time.time()))
                await until(lambda: rep.no_quorum >= 1, 15, "the refusal's write out of time", last=lambda: rep)
                assert store_jobs.get_job(db, job.id).attempt == placed.attempt  # type: ignore[union-attr]
                await cluster.resume(agent_node)
                await until(lambda: "start_refused" in [e.kind for e in store_jobs.events(db, job.id)], 20,
                            "the refusal written once the quorum is back", last=lambda: (rep, refused))
                await asyncio.wait_for(refused, 10)
            await asyncio.sleep(1.0)  # a second write of it would land within this
        assert [e.kind for e in store_jobs.events(db, job.id)].count("start_refused") == 1
        assert services.training.counters["dispatch_failures"] == 1
        first = store_jobs.attempts(db, job.id)[placed.attempt - 1]
        assert first.exit_reason == "dispatch_failed", first


class Loads:
    """What a real agent's command handler does with ``LoadModel``, for the tests: each one counted,
    held until ``release`` is set, and answered ``no_capacity`` while ``refusing`` (a site whose
    cards went elsewhere meanwhile); every other command goes through as it would."""

    def __init__(self, agent: Agent, *, hold: bool = False) -> None:
        self.agent = agent
        self.received: list[wire.LoadModel] = []
        self.release = asyncio.Event()
        if not hold:
            self.release.set()
        self.refusing = False
        dispatch = agent._dispatch

        async def gated(cmd: Any) -> Any:
            if isinstance(cmd, wire.LoadModel):
                self.received.append(cmd)
                await self.release.wait()
                if self.refusing:
                    return wire.ErrorReply(code="no_capacity", message=f"test: no room at {agent.site}")
            return await dispatch(cmd)

        agent._dispatch = gated  # type: ignore[method-assign]

    def loaded(self, dep_id: str) -> list[str]:
        """The states of the agent's replicas of ``dep_id`` (one at most, or it was loaded twice)."""
        return [str(r.state) for (_, dep), r in self.agent.inventory.replicas.items() if dep == dep_id]


DEMO_SPEC = DeploymentSpec(model="demo-chat", origins=["shanghai"], cards_per_replica=0.5, min_cities=1, budget_ms=50.0)


def _replicas(db: Any, dep_id: str) -> dict[str, str]:
    return {r.site: r.state for r in store_deployments.replicas_of(db, dep_id)}


async def test_a_load_acknowledged_whose_write_outlives_the_deadline_converges_and_is_sent_once(
        tmp_path: Path, cluster: NatsCluster) -> None:
    """A site acknowledges a ``LoadModel`` while the record has no quorum for longer than the write
    deadline: the acknowledgement's write (placed -> loading) fails, the outbox entry is already
    marked sent. Once the quorum is back the replica converges from the site's heartbeats (placed
    -> ready in the record), the load is not sent again (the heartbeat shows it: no second
    ``LoadModel``, one replica at the site) and the deployment is ready."""
    async with _leading(tmp_path, cluster) as lead:
        services, db, rep = lead.services, lead.db, lead.rep
        async with running(lead.cfg) as agent:
            loads = Loads(agent, hold=True)
            await until(lambda: lead.hub.registry.get("sh-edge") is not None, 10, "the site registered")
            view, _ = await services.deployments.create_async("acme", DEMO_SPEC)
            dep_id = view["id"]
            await until(lambda: len(loads.received) == 1, 10, "the load at the site (held)")
            assert _replicas(db, dep_id) == {"sh-edge": "placed"}
            rep.bridge.write_deadline_s = 1.0  # type: ignore[attr-defined]  # outlived within the test's time
            async with pausing(cluster, lead.leader_node, lead.agent_node, db=db) as quorum:
                before = rep.no_quorum
                loads.release.set()  # the site loads and acknowledges; its write finds no quorum
                await until(lambda: services.deployments.counters["loads_sent"] == 1, 10, "the acknowledgement")
                await until(lambda: rep.no_quorum > before, 15, "the acknowledgement's write out of time",
                            last=lambda: rep)
                await asyncio.sleep(1.5)  # passes that would decide a load again (retry_s 2 since the first)
                assert _replicas(db, dep_id) == {"sh-edge": "placed"}  # nothing of it in SQLite
                await quorum.back()
                await until(lambda: _replicas(db, dep_id) == {"sh-edge": "ready"}, 30,
                            "the replica ready from the heartbeats", last=lambda: (_replicas(db, dep_id), rep))
            await until(lambda: (store_deployments.get(db, dep_id) or view).state == "ready", 20,  # type: ignore[union-attr]
                        "the deployment ready", last=lambda: store_deployments.get(db, dep_id))
            await asyncio.sleep(2.5)  # past retry_s: a load decided again would be sent within this
            assert len(loads.received) == 1, loads.received  # sent once
            assert loads.loaded(dep_id) == ["ready"]
            entries = [e for e in store_outbox.for_job(db, dep_id) if e.kind == "load_model"]
            assert len(entries) == 1, entries  # one entry, decided once (model commands key on the deployment)
            assert services.deployments.counters["loads_queued"] == 1, services.deployments.counters


async def test_a_load_refused_whose_write_outlives_the_deadline_is_sent_again_and_refused_once_more(
        tmp_path: Path, cluster: NatsCluster) -> None:
    """A site refuses a ``LoadModel`` (``no_capacity``) while the record has no quorum for longer
    than the write deadline: the refusal's write (placed -> removed) fails and the outbox entry is
    already dropped. The replica stays ``placed`` with nothing pending, so its load is sent again
    (after ``retry_s``; a load of a replica the record already holds placed writes only the local
    outbox, so it may go out before the quorum is back) and refused again; then a refusal lands: the
    replica removed, the site cooling for the deployment, nothing loaded there, and no load after
    it. Before, the cool-down set by that refusal was forgotten when a pass decided before it
    finished its own write (its memory replaced the service's): the site was planned, loaded and
    refused again at once, over and over (seen here: a third load right after the removal)."""
    async with _leading(tmp_path, cluster) as lead:
        services, db, rep = lead.services, lead.db, lead.rep
        async with running(lead.cfg) as agent:
            loads = Loads(agent, hold=True)
            loads.refusing = True
            await until(lambda: lead.hub.registry.get("sh-edge") is not None, 10, "the site registered")
            view, _ = await services.deployments.create_async("acme", DEMO_SPEC)
            dep_id = view["id"]
            await until(lambda: len(loads.received) == 1, 10, "the load at the site (held)")
            rep.bridge.write_deadline_s = 1.0  # type: ignore[attr-defined]
            async with pausing(cluster, lead.leader_node, lead.agent_node, db=db) as quorum:
                before = rep.no_quorum
                loads.release.set()  # refused; the refusal's write finds no quorum
                await until(lambda: services.deployments.counters["loads_refused"] == 1, 10, "the refusal")
                await until(lambda: rep.no_quorum > before, 15, "the refusal's write out of time", last=lambda: rep)
                await asyncio.sleep(2.5)  # past retry_s (a load sent again meanwhile is refused again)
                assert _replicas(db, dep_id) == {"sh-edge": "placed"}  # no refusal of it in SQLite
                await quorum.back()
                await until(lambda: "sh-edge" not in _replicas(db, dep_id), 30, "the refused replica removed",
                            last=lambda: (_replicas(db, dep_id), loads.received, rep))
            sent = len(loads.received)
            await asyncio.sleep(3.0)  # past retry_s: the site cools for the deployment, no load after the removal
            assert len(loads.received) == sent, loads.received
            assert loads.loaded(dep_id) == [] and "sh-edge" not in _replicas(db, dep_id)
            assert any(d == dep_id and s == "sh-edge" for d, s in services.deployments.memory.cooldown)


async def test_a_deployments_plan_outdated_while_it_waited_is_decided_again(tmp_path: Path, cluster: NatsCluster) -> None:
    """With the record's quorum gone, the site holding a deployment's replica is lost (its replica
    marked lost: a write that waits), the reconcile that follows decides to replace it at the
    other site (a plan that waits behind it), and the tenant deletes the deployment (a third write
    waiting). Once the quorum is back, the plan finds what it was decided from changed (the site's
    replica marked lost) and is decided again (``plans_outdated``) instead of written as it was:
    no replica is left for the deleted deployment, none is loaded at the other site (or, if a
    load went out before the delete, it is unloaded), no site got its load twice."""
    async with _leading(tmp_path, cluster) as lead:
        services, db, rep = lead.services, lead.db, lead.rep
        cfg_b = agent_config(lead.cfg.nats, site="hz-edge", data_dir=str(tmp_path / "agent-b"),
                             accelerators={"H20": 0, "910B": 4})
        agents = {"sh-edge": Agent(lead.cfg), "hz-edge": Agent(cfg_b)}
        loads = {}
        for site, agent in agents.items():
            await asyncio.wait_for(agent.start(), 10)
            loads[site] = Loads(agent)
        stopped: set[str] = set()
        try:
            await until(lambda: all(lead.hub.registry.get(s) is not None for s in agents), 10, "both sites registered")
            view, _ = await services.deployments.create_async("acme", DEMO_SPEC)
            dep_id = view["id"]
            await until(lambda: list(_replicas(db, dep_id).values()) == ["ready"], 20, "one replica ready",
                        last=lambda: _replicas(db, dep_id))
            [held] = _replicas(db, dep_id)
            other = next(s for s in agents if s != held)
            outdated = services.deployments.counters["plans_outdated"]
            async with pausing(cluster, lead.leader_node, lead.agent_node, db=db) as quorum:
                await asyncio.wait_for(agents[held].stop(), 15)
                stopped.add(held)
                await until(lambda: lead.hub.registry.get(held).state == "lost", 15, "the site lost")  # type: ignore[union-attr]
                await until(lambda: rep.in_flight >= 1, 10, "the lost replica's write in flight", last=lambda: rep)
                deleted = asyncio.create_task(services.deployments.delete_async("acme", dep_id))
                await asyncio.sleep(1.5)  # the plan to replace it decided meanwhile (it waits too)
                assert _replicas(db, dep_id) == {held: "ready"}  # nothing of it in SQLite
                assert loads[other].received == []  # nothing sent from an unacknowledged decision
                await quorum.back()
                await asyncio.wait_for(deleted, 30)
            assert store_deployments.get(db, dep_id) is None
            await until(lambda: _replicas(db, dep_id) == {} and loads[other].loaded(dep_id) == [], 20,
                        "nothing left of the deleted deployment", last=lambda: (_replicas(db, dep_id), loads[other].loaded(dep_id)))
            await asyncio.sleep(2.5)  # past retry_s: a load decided from the outdated plan would go out within this
            assert loads[other].loaded(dep_id) == [] and len(loads[other].received) <= 1, loads[other].received
            assert len(loads[held].received) == 1, loads[held].received
            print(f"plans outdated: {services.deployments.counters['plans_outdated'] - outdated}; loads at {other}: "
                  f"{len(loads[other].received)}")
            assert services.deployments.counters["plans_outdated"] > outdated, services.deployments.counters
        finally:
            for site, agent in agents.items():
                if site not in stopped:
                    await asyncio.wait_for(agent.stop(), 15)
