"""Handover: a new leader sends what its predecessor decided but never sent (issue: no single hub).

Real parts: a 3-node nats-server cluster on loopback, two hub processes (in this test process) on
the replicated record with their own SQLite projections, a real agent. The outbox is local to each
process; the record is not, and the new leader rebuilds the commands from it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from controlplane.compose import HubProcess, build
from controlplane.core import jobspec, lifecycle
from controlplane.store import jobs as store_jobs
from controlplane.store import outbox as store_outbox
from controlplane.store.db import transaction
from tests.support.fakehub import agent_config, running
from tests.support.hubrig import hub_config
from tests.support.natscluster import NatsCluster
from tests.support.waiting import until

SPEC = jobspec.JobSpec(name="handover", cards=1, accelerators=("H20",), est_hours=1.0, checkpoint_cost_s=60)


async def started(tmp: Path, cluster: NatsCluster, name: str, **kw: Any) -> HubProcess:
    (tmp / name).mkdir(exist_ok=True)
    proc = build(hub_config(tmp / name, ",".join(cluster.urls), hub_id=name, record="nats", **kw))
    await proc.hub.start()
    return proc


def placed_without_sending(proc: HubProcess, job_id: str) -> None:
    """What a leader that dies between its commit and its send leaves: the job ``placed`` in the
    record (written with the leader's fence), no command in any outbox."""
    db = proc.hub.db
    now = time.time()
    with transaction(db):
        row = store_jobs.get_job(db, job_id)
        assert row is not None and row.state == "queued"
        rec = lifecycle.place(row.record(), "sh-edge", "H20", now)
        store_jobs.record_placements(db, [(rec, store_jobs.Placed(
            attempt=rec.attempt, pool="sh-edge", accelerator="H20", decided_at=now, start_at=now,
            executor="sim", time_scale=1.0, checkpoint_interval_s=600.0))], now)


async def test_a_new_leader_sends_the_start_its_predecessor_decided_but_never_sent(
        tmp_path: Path, cluster: NatsCluster) -> None:
    a = await started(tmp_path, cluster, "hub-a")
    b: HubProcess | None = None
    try:
        await until(lambda: a.services.leadership.leading, 10, "a leads")
        b = await started(tmp_path, cluster, "hub-b")
        a.hub.create_tenant("acme")
        job, _ = a.services.training.submit("acme", SPEC, None, "h1", time.time())
        job_id = job.id
        placed_without_sending(a, job_id)
        assert not store_outbox.for_job(a.hub.db, job_id)

        cfg = agent_config(cluster.urls[0], site="sh-edge", data_dir=str(tmp_path / "agent"))
        async with running(cfg) as agent:
            await agent.registered.wait()
            await until(lambda: store_jobs.get_job(b.hub.db, job_id) is not None, 5, "the job at b")
            # a "dies" (steps down; its outbox never held the start): b takes over and sends it.
            await a.services.leadership.stop()
            await until(lambda: b.services.leadership.leading, 8, "b leads")
            # The deposed process takes no more site events (the shared durable goes on at b).
            assert not a.hub.bus._event_tasks and b.hub.bus._event_tasks
            await until(lambda: job_id in agent.training.attempts, 10, "the attempt runs at the site")
            assert agent.training.attempts[job_id].attempt == 1  # the decided attempt, not a new one
            await until(lambda: (store_jobs.get_job(b.hub.db, job_id) or job).state in ("starting", "running"), 10,
                        "the job started in the record")
            row = store_jobs.get_job(b.hub.db, job_id)
            assert row is not None and row.attempt == 1
            assert b.services.training.counters["handover_starts"] == 1
            sent = [e for e in store_outbox.for_job(b.hub.db, job_id) if e.kind == "start_attempt"]
            assert [(e.attempt, e.state) for e in sent] == [(1, "sent")]
            assert agent.counters.get("stale_epoch", 0) == 0
    finally:
        if b is not None:
            await b.hub.stop()
        await a.hub.stop()


async def test_a_leader_whose_lease_ran_out_sends_nothing_before_its_elector_notices(
        tmp_path: Path, cluster: NatsCluster) -> None:
    """A leader frozen past its lease wakes with ``leading`` still set (its elector has not run);
    its clock already says no, and neither its outbox nor its bus sends a leader's command."""
    from controlplane.core.errors import BusUnavailable
    from edge_agent import wire

    a = await started(tmp_path, cluster, "hub-a")
    try:
        await until(lambda: a.services.leadership.leading, 10, "a leads")
        a.hub.create_tenant("acme")
        job, _ = a.services.training.submit("acme", SPEC, None, "h1", time.time())
        placed_without_sending(a, job.id)
        cfg = agent_config(cluster.urls[0], site="sh-edge", data_dir=str(tmp_path / "agent"))
        async with running(cfg) as agent:
            await agent.registered.wait()
            elector = a.services.leadership.elector
            assert elector is not None and a.services.leadership.deciding()
            # the clock read on waking: past holder_silent_s since its last renewal, another may lead
            elector.may_decide = lambda: False  # type: ignore[method-assign]
            assert a.services.leadership.leading and not a.services.leadership.deciding()
            outbox = a.services.training.outbox
            assert outbox is not None
            row = store_jobs.get_job(a.hub.db, job.id)
            assert row is not None
            from controlplane.services import handover
            cmd = handover.start_command(a.services.training, row)
            assert cmd is not None
            with pytest.raises(BusUnavailable, match="does not lead"):
                await a.hub.bus.command("sh-edge", cmd)
            with transaction(a.hub.db):
                entry_id = outbox.add("sh-edge", cmd, time.time())
            (entry,) = [e for e in store_outbox.for_job(a.hub.db, job.id) if e.id == entry_id]
            assert await outbox._send(entry) is False  # nothing sent, nothing given up
            (entry,) = [e for e in store_outbox.for_job(a.hub.db, job.id) if e.id == entry_id]
            assert entry.state == "pending" and entry.tries == 0
            assert job.id not in agent.training.attempts
            # A Drain (an operator's, through any gateway) still goes.
            assert isinstance(await a.hub.bus.command("sh-edge", wire.Drain(on=False)), wire.Ack)
    finally:
        await a.hub.stop()
