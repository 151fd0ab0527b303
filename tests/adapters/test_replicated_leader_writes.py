"""The leader's own writes without a stall: a controller on a real 3-node nats-server cluster
(loopback, sync_interval always), ``record = "nats"``, a real agent.

What this proves (it failed before: the scheduler tick committed its decisions with a blocking
``transaction()``, so a tick that met a stream election held the controller's event loop for the
whole election, 4-9 s, and with it the lease's renewals and every heartbeat):

- while the record's stream leader node and another are paused (SIGSTOP) and the tick's decisions
  wait for a quorum, the controller's loop keeps running (no gap over 1 s; the whole wait before), the site's heartbeats are
  handled, and the tick's start is neither in the outbox nor sent: the outbox entry is written with
  the acknowledged batch (decide, then do), and the agent runs the attempt once the record has it;
- the lease (given a renew deadline longer than the election, so that what is tested here is the
  loop and not the lease's own stream) is renewed again after the election by the same leader,
  same epoch: a controller whose loop goes on keeps leading;
- a gateway's usage flush waits out the election the same way (it held every hub's loop 5-6 s
  before, all at once), and its usage is counted only once the record has it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from controlplane.compose import build
from controlplane.core import jobspec
from controlplane.replicated.lease_rules import LeaseConfig
from controlplane.store import jobs as store_jobs
from controlplane.store import outbox as store_outbox
from controlplane.store.replica import Replica
from tests.support.fakehub import agent_config, running
from tests.support.hubrig import hub_config
from tests.support.natscluster import NatsCluster
from tests.support.recordrig import LoopWatch, holds_for, pausing, stream_leader
from tests.support.waiting import until

SPEC = jobspec.JobSpec(name="tick", cards=1, accelerators=("H20",), est_hours=1.0, checkpoint_cost_s=60)

pytestmark = pytest.mark.serial  # a fresh 3-node cluster whose stream elects for seconds


async def test_the_leaders_tick_waits_out_a_paused_stream_leader_without_stalling_its_loop(
        tmp_path: Path, cluster: NatsCluster) -> None:
    leader_node = await stream_leader(cluster)
    url = next(n.url for n in cluster.nodes if n.name != leader_node)  # the controller's node stays up
    (tmp_path / "ctl").mkdir()
    proc = build(hub_config(tmp_path / "ctl", url, hub_id="ctl", record="nats", record_nats_urls=[url]))
    leadership = proc.services.leadership
    leadership.lease = LeaseConfig(lease_duration_s=30.0, renew_deadline_s=20.0, retry_period_s=0.4)
    await proc.hub.start()
    try:
        await until(lambda: leadership.leading, 10, "the controller leads")
        epoch = leadership.epoch
        db = proc.hub.db
        rep = db.write_hook
        assert isinstance(rep, Replica)
        proc.hub.create_tenant("acme")
        job, _ = await proc.services.training.submit_async("acme", SPEC, None, "h1", time.time())
        await until(lambda: (store_jobs.get_job(db, job.id) or job).reason != "", 10, "the job told why it waits")
        assert store_jobs.get_job(db, job.id).state == "queued"  # type: ignore[union-attr]  # no site yet
        elector = leadership.elector
        assert elector is not None and elector._held is not None
        # The stream's leader node and the other follower paused: no quorum until one comes back,
        # so the tick's batch waits as long as this test says (an election's length varies).
        other = next(n.name for n in cluster.nodes if n.name != leader_node and n.url != url)
        async with pausing(cluster, leader_node, other, db=db):  # the first barrier times out (awaited)
            with LoopWatch() as watch:
                cfg = agent_config(url, site="sh-edge", data_dir=str(tmp_path / "agent"))
                async with running(cfg) as agent:
                    await agent.registered.wait()
                    registry = proc.services.training.registry
                    await until(lambda: registry.get("sh-edge") is not None, 5, "the site registered")
                    proc.services.training.poke()
                    await until(lambda: rep.in_flight >= 1, 10, "the tick's decisions in flight at the record")
                    beats = registry.get("sh-edge").heartbeats  # type: ignore[union-attr]
                    renewals = elector._held.renewals if elector._held else -1

                    def unacknowledged() -> None:  # the tick's batch waits for a quorum
                        # decided, not acknowledged: nothing in the outbox, nothing sent
                        assert rep.in_flight >= 1
                        assert not store_outbox.for_job(db, job.id)
                        assert job.id not in agent.training.attempts

                    await holds_for(2.0, unacknowledged)
                    # the loop went on: the site's heartbeats were handled while the tick waited
                    assert registry.get("sh-edge").heartbeats - beats >= 2  # type: ignore[union-attr]
                    await cluster.resume(other)  # a quorum again (a stream leader once elected)
                    await until(lambda: job.id in agent.training.attempts, 30, "the attempt runs at the site")
                    assert agent.training.attempts[job.id].attempt == 1
                    # the site holds the attempt before its acknowledgement reaches the hub: wait for that
                    await until(lambda: [(e.kind, e.attempt, e.state) for e in store_outbox.for_job(db, job.id)]
                                == [("start_attempt", 1, "sent")], 10, "the start acknowledged",
                                last=lambda: store_outbox.for_job(db, job.id))
                    assert rep.local_replayed >= 1, rep
                    # the same leader renews its lease again once the stream has a leader
                    await until(lambda: elector._held is not None and elector._held.renewals > renewals, 20,
                                "a renewal after the election")
                    assert leadership.leading and leadership.epoch == epoch
        # Held for 2 s and more before (the whole wait); what is left is at most one blocking read
        # barrier's timeout (0.5 s) when the quorum comes back and the projection still lags.
        assert watch.worst_s < 1.0, f"the controller's event loop stood still for {watch.worst_s:.2f} s"
        assert rep.write_fallbacks == 0, rep  # the tick's commits went the awaited way
    finally:
        await proc.hub.stop()


async def test_the_usage_flush_waits_out_a_paused_stream_leader_without_stalling_the_loop(
        tmp_path: Path, cluster: NatsCluster) -> None:
    """Every gateway flushes the usage it served once a second. Blocking, one flush that met a
    stream election held each gateway's loop for the election (5-6 s, seen on the HA rig at every
    hub at once, the leader's lease lost with it). Awaited, the loop goes on and the usage lands
    once a quorum has it: its local sums and this process's kept counters with it, not before."""
    leader_node = await stream_leader(cluster)
    url = next(n.url for n in cluster.nodes if n.name != leader_node)
    (tmp_path / "gw").mkdir()
    proc = build(hub_config(tmp_path / "gw", url, hub_id="gw", role="gateway", record="nats", record_nats_urls=[url]))
    await proc.hub.start()
    try:
        db = proc.hub.db
        rep = db.write_hook
        assert isinstance(rep, Replica)
        proc.hub.create_tenant("acme")
        accounts = proc.services.accounting
        async with pausing(cluster, leader_node, db=db):  # the election's first barrier times out (awaited)
            with LoopWatch() as watch:
                accounts.buffer.add("acme", "m", "s1", 10, 5)
                flush = asyncio.create_task(accounts.flush_async())
                await until(lambda: rep.in_flight >= 1 or flush.done(), 10, "the flush in flight at the record")
                assert not flush.done()
                while not flush.done():  # counted nowhere yet: neither summed nor kept as this process's
                    assert db.conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0] == 0
                    assert db.conn.execute("SELECT COUNT(*) FROM record_usage_own").fetchone()[0] == 0
                    await asyncio.sleep(0.05)
                await flush
        assert watch.worst_s < 0.5, f"the gateway's event loop stood still for {watch.worst_s:.2f} s"
        assert db.conn.execute("SELECT requests, prompt_tokens FROM usage").fetchall() == [(1, 10)]
        assert db.conn.execute("SELECT requests FROM record_usage_own").fetchall() == [(1,)]
        assert rep.write_fallbacks == 0, rep
        await until(lambda: not rep.usage_unpublished, 10, "this process's counters in the record")
    finally:
        await proc.hub.stop()
