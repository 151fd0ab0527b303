"""The training service built from its typed parts alone (no hub object), on a real SQLite file:
a typed spec goes in, is stored, read back typed and planned."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import msgspec

from controlplane.config import HubConfig
from controlplane.core import jobspec
from controlplane.core.lifecycle import JobState
from controlplane.core.registry import SiteRegistry
from controlplane.metrics import HubMetrics
from controlplane.runtime import WallClock
from controlplane.services import training
from controlplane.services.outbox import CommandOutbox
from controlplane.store import db as store_db
from controlplane.store import jobs as store_jobs
from topology import loader

T0 = 1_800_000_000.0


def standalone(db: Any, tenant: Any = lambda tid: {"id": tid, "quota_cards": 8}) -> training.TrainingService:
    """The training service on ``db`` alone, as ``start()`` builds it but with no NATS (no sends)."""
    layout = loader.load_default()
    clock = WallClock()
    service = training.TrainingService(
        db=lambda: db, bus=None, registry=SiteRegistry(), layout=lambda: layout,  # type: ignore[arg-type]
        clock=clock, metrics=HubMetrics(), config=HubConfig(), tenant=tenant)
    service.outbox = CommandOutbox(db, None, clock=clock.time)
    return service


def test_the_service_runs_on_its_typed_parts_and_plans_the_stored_spec(tmp_path: Path) -> None:
    db = store_db.open_db(tmp_path / "cpn.db")
    asked: list[str] = []

    def tenant(tid: str) -> dict[str, object] | None:
        asked.append(tid)
        return {"id": tid, "quota_cards": 8}

    service = standalone(db, tenant=tenant)
    try:
        spec = jobspec.JobSpec(name="ft", cards=16, accelerators=("A800",), est_hours=2.0, regions=("north",))
        row, replayed = service.submit("acme", spec, None, "h", T0)
        assert not replayed and row.spec == spec and row.state is JobState.QUEUED
        plan = service.tick(T0 + 1)
        assert plan is not None and [w.job_id for w in plan.wait] == [row.id]
        got = service.job(row.id, tenant="acme")
        assert got is not None and got.spec == spec and got.state is JobState.QUEUED
        assert got.reason == "quota: tenant acme holds 0 of 8 cards, job needs 16" and asked == ["acme"]
    finally:
        db.conn.close()


def test_a_tick_over_an_unchanged_queue_opens_no_write_transaction(tmp_path: Path) -> None:
    """The second of two ticks over 450 queued jobs that wait as they did writes nothing: no
    transaction at all (before, one per 200 waits: on the replicated record each is a read barrier
    and a batch), and the plan is the same."""
    db = store_db.open_db(tmp_path / "cpn.db")
    service = standalone(db)
    begins: list[str] = []
    try:
        spec = jobspec.JobSpec(name="ft", cards=16, accelerators=("A800",), est_hours=2.0)
        with store_db.transaction(db):
            ids = [service.submit("acme", spec, None, "h", T0)[0].id for _ in range(450)]
        first = service.tick(T0 + 1)
        assert first is not None and sorted(w.job_id for w in first.wait) == sorted(ids)
        assert {r.reason for r in service.jobs("acme", state=JobState.QUEUED, limit=1000)} == {
            "quota: tenant acme holds 0 of 8 cards, job needs 16"}
        db.conn.set_trace_callback(lambda sql: begins.append(sql) if sql.startswith("BEGIN") else None)
        second = service.tick(T0 + 2)
        db.conn.set_trace_callback(None)
        assert second is not None and [(w.job_id, w.reason) for w in second.wait] == \
            [(w.job_id, w.reason) for w in first.wait]
        assert begins == []
    finally:
        db.conn.close()


async def test_a_tick_over_a_long_queue_lets_the_loop_run_between_its_steps(tmp_path: Path) -> None:
    """The awaited tick reads and plans 1,000 queued jobs in steps of ``TICK_STEP``: other work on
    the loop (a gateway's requests) runs between them (before, not once until the plan was made),
    and the plan is the one the synchronous tick makes."""
    db = store_db.open_db(tmp_path / "cpn.db")
    service = standalone(db)
    try:
        spec = jobspec.JobSpec(name="ft", cards=16, accelerators=("A800",), est_hours=2.0)
        with store_db.transaction(db):
            for _ in range(1000):
                service.submit("acme", spec, None, "h", T0)
        turns = 0
        planning = True

        async def other_work() -> None:
            nonlocal turns
            while planning:
                turns += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(other_work())
        await asyncio.sleep(0)
        turns = 0
        stepped = await service.tick_async(T0 + 1)
        planning = False
        await task
        assert turns >= 3 * (1000 // training.TICK_STEP), turns  # decode, specs, plan: each in steps
        whole = service.tick(T0 + 1)
        assert stepped is not None and whole is not None
        assert msgspec.json.encode(stepped) == msgspec.json.encode(whole)
        assert 0 < service.last_tick_busy_s
    finally:
        db.conn.close()


def test_a_tick_after_one_submission_to_a_long_unchanged_queue_plans_that_job_alone(tmp_path: Path) -> None:
    """1,000 jobs wait (their tenant's quota); after one more submission the tick loop's round
    decides 1 job, not 1,001 (before: the whole queue, every tick), writes the reason a full plan
    writes, and finds a job another process created (no poke here). Anything else plans the whole
    queue again: a cancellation's poke, a job leaving the queue unseen, a tenant's new quota."""
    db = store_db.open_db(tmp_path / "cpn.db")
    quota = {"acme": 8}
    service = standalone(db, tenant=lambda tid: {"id": tid, "quota_cards": quota.get(tid)})
    c = service.counters
    try:
        spec = jobspec.JobSpec(name="ft", cards=16, accelerators=("A800",), est_hours=2.0)
        with store_db.transaction(db):
            ids = [service.submit("acme", spec, None, "h", T0)[0].id for _ in range(1000)]
        reads: list[str] = []
        db.conn.set_trace_callback(lambda sql: reads.append(sql) if "FROM jobs WHERE state" in sql else None)
        service.tick(T0 + 1, incremental=True)
        db.conn.set_trace_callback(None)
        assert (c["jobs_planned"], c["ticks_incremental"]) == (1000, 0)  # the first tick plans the queue
        assert sum("LIMIT" in sql for sql in reads) >= 1000 // training.TICK_STEP  # read a page at a time
        late, _ = service.submit("acme", spec, None, "h", T0 + 2)
        plan = service.tick(T0 + 2, incremental=True)
        assert (c["jobs_planned"], c["ticks_incremental"]) == (1001, 1)
        assert plan is not None and [w.job_id for w in plan.wait] == [late.id]
        got = service.job(late.id)
        assert got is not None and got.reason == "quota: tenant acme holds 0 of 8 cards, job needs 16"
        other, _ = store_jobs.create_job(db, "beta", spec, None, "h", T0 + 3)  # a gateway elsewhere
        plan = service.tick(T0 + 3, incremental=True)
        assert (c["jobs_planned"], c["ticks_incremental"]) == (1002, 2)
        assert plan is not None and [i.job_id for i in plan.infeasible] == [other.id]  # no pools here
        service.tick(T0 + 3.5, incremental=True)  # nothing new: nothing planned
        assert (c["jobs_planned"], c["ticks_incremental"]) == (1002, 3)
        service.cancel(ids[0], "acme", T0 + 4)  # pokes for a full plan
        service.tick(T0 + 4, incremental=True)
        assert (c["jobs_planned"], c["ticks_incremental"]) == (1002 + 1001, 3)  # the whole queue: 1,001 jobs
        store_jobs.update_job(db, ids[1], T0 + 5, state="cancelled")  # unseen: the count tells
        service.tick(T0 + 5, incremental=True)
        assert (c["jobs_planned"], c["ticks_incremental"]) == (2003 + 1000, 3)
        quota["acme"] = 64  # a tenant changed: a full plan
        service.submit("acme", spec, None, "h", T0 + 6)
        plan = service.tick(T0 + 6, incremental=True)
        assert (c["jobs_planned"], c["ticks_incremental"]) == (3003 + 1001, 3)
        assert plan is not None and {i.job_id for i in plan.infeasible} >= set(ids[2:])  # acme's quota passes now
        service.submit("acme", spec, None, "h", T0 + 6 + HubConfig().scheduler_full_plan_s)  # too old a plan
        service.tick(T0 + 6 + HubConfig().scheduler_full_plan_s, incremental=True)
        assert (c["jobs_planned"], c["ticks_incremental"]) == (4004 + 1002, 3)
    finally:
        db.conn.close()


def test_a_full_tick_decodes_only_the_rows_that_changed_since_the_last(tmp_path: Path) -> None:
    """A full tick over 600 queued jobs after another reads the rows again but decodes only the
    ones that changed (decoding the specs was half of a long queue's full tick), and a row changed
    without a new ``updated_at`` (a simulated clock that stands still) is decoded afresh: the
    reuse is keyed on the whole stored row, never on a timestamp."""
    db = store_db.open_db(tmp_path / "cpn.db")
    service = standalone(db)
    try:
        spec = jobspec.JobSpec(name="ft", cards=16, accelerators=("A800",), est_hours=2.0)
        with store_db.transaction(db):
            ids = [service.submit("acme", spec, None, "h", T0)[0].id for _ in range(600)]
        service.tick(T0 + 1)  # writes every job's reason: every row changed
        service.tick(T0 + 2)  # reads them as changed
        hits = service._decoded.hits
        updated_at = db.conn.execute("SELECT updated_at FROM jobs WHERE id = ?", (ids[7],)).fetchone()[0]
        small = msgspec.json.encode(msgspec.structs.replace(spec, cards=4)).decode()
        with store_db.transaction(db):  # fits the quota now; the same updated_at
            db.conn.execute("UPDATE jobs SET spec = ?, cards = 4 WHERE id = ?", (small, ids[7]))
        plan = service.tick(T0 + 3)
        assert service._decoded.hits == hits + 599
        assert plan is not None and [i.job_id for i in plan.infeasible] == [ids[7]]  # no pools here: infeasible
        assert {w.job_id for w in plan.wait} == set(ids) - {ids[7]}  # the others wait for the quota as they did
        # its new reason is said, as derived state: not a change of the job, so updated_at stays
        reason, at = db.conn.execute("SELECT reason, updated_at FROM jobs WHERE id = ?", (ids[7],)).fetchone()
        assert reason.startswith("infeasible: ") and at == updated_at
    finally:
        db.conn.close()
