"""The training service built from its typed parts alone (no hub object), on a real SQLite file:
a typed spec goes in, is stored, read back typed and planned."""

from __future__ import annotations

from pathlib import Path

from controlplane.config import HubConfig
from controlplane.core import jobspec
from controlplane.core.lifecycle import JobState
from controlplane.core.registry import SiteRegistry
from controlplane.metrics import HubMetrics
from controlplane.runtime import WallClock
from controlplane.services import training
from controlplane.services.outbox import CommandOutbox
from controlplane.store import db as store_db
from topology import loader

T0 = 1_800_000_000.0


def test_the_service_runs_on_its_typed_parts_and_plans_the_stored_spec(tmp_path: Path) -> None:
    db = store_db.open_db(tmp_path / "cpn.db")
    layout = loader.load_default()
    clock = WallClock()
    asked: list[str] = []

    def tenant(tid: str) -> dict[str, object] | None:
        asked.append(tid)
        return {"id": tid, "quota_cards": 8}

    service = training.TrainingService(
        db=lambda: db, bus=None, registry=SiteRegistry(), layout=lambda: layout,  # type: ignore[arg-type]
        clock=clock, metrics=HubMetrics(), config=HubConfig(), tenant=tenant)
    service.outbox = CommandOutbox(db, None, clock=clock.time)  # what start() builds (no sends here)
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
