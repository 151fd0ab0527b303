"""Tidal lending in the training service, on a real SQLite file with an injected time: a gang starts
on an edge pool's idle cards at night ("lent until ..."), is told to checkpoint and stop through the
outbox before the forecast ramp ("reclaimed for inference"), and resumes elsewhere; by day the edge
is not lent. Without ``[lending]`` the scheduler would take the edge's cards by day as well."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from controlplane.config import HubConfig, LendingConfig
from controlplane.core import jobspec
from controlplane.core.lifecycle import JobState
from controlplane.core.registry import SiteRegistry
from controlplane.metrics import HubMetrics
from controlplane.runtime import WallClock
from controlplane.services import training
from controlplane.services.outbox import CommandOutbox
from controlplane.store import db as store_db
from controlplane.store import outbox as store_outbox
from edge_agent import wire
from topology import loader

from tests.unit.test_sim_known import ACCELS, origin, site

MIDNIGHT = 1795363200.0  # 2026-11-23 00:00 China local time
H = 3600.0


def layout():
    return loader.loads('name = "lend"\n' + ACCELS + site("e1", "pa", 30.0, 110.1, "edge", 8, rate=1e-5)
                        + site("h1", "pa", 30.0, 110.0, "hub", 8, rate=1e-5) + origin("pa", 30.0, 110.0))


def bring_up(reg: SiteRegistry, sid: str, tier: str, now: float) -> None:
    reg.register(wire.Register(site=sid, tier=tier, city="pa", accelerators={"A800": 8}, executors=["sim"]), now)
    reg.heartbeat(wire.Heartbeat(site=sid, seq=1, free_cards={"A800": 8.0}), now)


def service(tmp_path: Path, *, lending: bool):
    db = store_db.open_db(tmp_path / "cpn.db")
    reg = SiteRegistry()
    lay = layout()
    svc = training.TrainingService(
        db=lambda: db, bus=None, registry=reg, layout=lambda: lay,  # type: ignore[arg-type]
        clock=WallClock(), metrics=HubMetrics(), config=HubConfig(lending=LendingConfig(enabled=lending)),
        tenant=lambda tid: {"id": tid})
    svc.outbox = CommandOutbox(db, None, clock=lambda: 0.0)  # what start() builds (no sends here)
    return svc, reg, db


SPEC = jobspec.JobSpec(name="ft", cards=4, accelerators=("A800",), est_hours=10.0, checkpoint_cost_s=300.0)


def kinds(svc: training.TrainingService, job: str) -> list[str]:
    return [e.body.get("type", "") for e in svc.events(job)]


def test_a_gang_on_lent_cards_is_stopped_checkpoint_first_before_the_ramp_and_resumes_elsewhere(tmp_path: Path) -> None:
    svc, reg, db = service(tmp_path, lending=True)
    try:
        bring_up(reg, "e1", "edge", MIDNIGHT)
        row, _ = svc.submit("acme", SPEC, None, "h", MIDNIGHT + 0.5 * H)
        plan = svc.tick(MIDNIGHT + 0.5 * H)
        assert plan is not None and [(p.job_id, p.pool) for p in plan.start] == [(row.id, "e1")]
        lent = [e.body for e in svc.events(row.id) if e.body.get("type") == "lent"]
        # 00:30 needs 2.3 of 8 cards: 5 idle cards last until 07:00 needs 3.3 (less the 15 min margin)
        assert lent and lent[0]["until"] == MIDNIGHT + 6.75 * H and "lent until 2026-11-22T22:45:00Z" in lent[0]["reason"]
        # The 4 cards lent leave 4 with inference: 08:00 needs 5.3, so they are back by 07:45, the stop
        # leaving the checkpoint's 300 s and a minute.
        stop_at = MIDNIGHT + 7.75 * H - 300.0 - 60.0
        svc.tick(stop_at - 5.0)
        assert not [e for e in store_outbox.pending(db) if e.kind == "stop_attempt"]
        svc.tick(stop_at)
        stops = [e for e in store_outbox.pending(db) if e.kind == "stop_attempt"]
        assert [(e.site, e.job_id, e.attempt) for e in stops] == [("e1", row.id, 1)]
        cmd = msgspec.json.decode(stops[0].body, type=wire.StopAttempt)
        assert cmd.checkpoint and cmd.reason.startswith("reclaimed for inference")
        assert "reclaimed" in kinds(svc, row.id)
        svc.tick(stop_at + 30.0)  # asked once, not again while the attempt is stopping
        assert len([e for e in store_outbox.pending(db) if e.kind == "stop_attempt"]) == 1
        # The agent checkpoints and exits "stopped"; the job requeues and restarts on the hub.
        svc.apply_event(wire.AttemptStarted(job=row.id, attempt=1, seq=1, site="e1", at=MIDNIGHT + 0.6 * H),
                        MIDNIGHT + 0.6 * H)
        svc.apply_event(wire.Checkpointed(job=row.id, attempt=1, seq=2, site="e1", at=stop_at + 290.0, progress=0.7,
                                          checkpoint="ckpt/1"), stop_at + 290.0)
        svc.apply_event(wire.AttemptExited(job=row.id, attempt=1, seq=3, site="e1", at=stop_at + 300.0,
                                           reason="stopped", progress=0.7), stop_at + 300.0)
        got = svc.job(row.id)
        assert got is not None and got.state in (JobState.QUEUED, JobState.RESTARTING) and got.progress == pytest.approx(0.7)
        svc.tick(stop_at + 400.0)  # by day the edge lends nothing that fits: the job waits
        got = svc.job(row.id)
        assert got is not None and got.state in (JobState.QUEUED, JobState.RESTARTING)
        bring_up(reg, "h1", "hub", stop_at + 500.0)
        plan = svc.tick(stop_at + 600.0)
        assert plan is not None and [(p.job_id, p.pool) for p in plan.start] == [(row.id, "h1")]
    finally:
        db.conn.close()


@pytest.mark.parametrize("lending, pool", [(True, None), (False, "e1")])
def test_by_day_the_edge_keeps_its_cards_for_inference(tmp_path: Path, lending: bool, pool: str | None) -> None:
    svc, reg, db = service(tmp_path, lending=lending)
    try:
        bring_up(reg, "e1", "edge", MIDNIGHT + 12 * H)
        row, _ = svc.submit("acme", SPEC, None, "h", MIDNIGHT + 12 * H)
        plan = svc.tick(MIDNIGHT + 12 * H)  # 12:00 needs 6 of 8: 2 cards to lend, the gang needs 4
        assert plan is not None
        assert [p.pool for p in plan.start] == ([pool] if pool else [])
    finally:
        db.conn.close()


def test_cards_a_deployment_holds_at_the_edge_are_kept_for_inference(tmp_path: Path) -> None:
    from controlplane.store import deployments as store_deployments

    svc, reg, db = service(tmp_path, lending=True)
    try:
        bring_up(reg, "e1", "edge", MIDNIGHT)
        store_deployments.create(db, deployment_id="dep-1", tenant="acme", model="qwen", spec={}, now=MIDNIGHT)
        store_deployments.upsert_replicas(db, "dep-1", [("e1", "A800", 4.0)], state="ready", now=MIDNIGHT)
        row, _ = svc.submit("acme", SPEC, None, "h", MIDNIGHT + 0.5 * H)
        # 4 held, grown along the profile with 1.5 headroom: 6 needed through the night, 2 to lend.
        plan = svc.tick(MIDNIGHT + 0.5 * H)
        assert plan is not None and not plan.start
        got = svc.job(row.id)
        assert got is not None and got.state is JobState.QUEUED
    finally:
        db.conn.close()


def test_a_ramp_an_hour_earlier_than_declared_is_learnt_from_demand_and_reclaims_an_hour_earlier(tmp_path: Path) -> None:
    from controlplane.services.demand_share import LearntDemand
    from tests.support.manualclock import ManualClock

    svc, reg, db = service(tmp_path, lending=True)
    declared = list(svc.config.lending.profile)
    actual = declared[1:] + declared[:1]  # every hour's demand comes an hour early
    clock = ManualClock()
    learnt = LearntDemand(region_of_origin={"pa": "r"}.get, region_of_site={"e1": "r", "h1": "r"}.get, clock=clock)
    counts: dict[tuple[str, str, str, float], int] = {}
    drain = learnt.tap(lambda: dict(counts))
    for k in range(2 * 24 * 12):  # the two days before, drained every 5 min as the autoscaler does
        clock.now = MIDNIGHT - 2 * 24 * H + k * 300.0
        counts[("acme", "qwen", "pa", 10.0)] = round(1000 * actual[(k // 12) % 24] / 12)
        drain()
    svc.lending_profiles = learnt.site_profiles
    try:
        bring_up(reg, "e1", "edge", MIDNIGHT)
        row, _ = svc.submit("acme", SPEC, None, "h", MIDNIGHT + 0.5 * H)
        plan = svc.tick(MIDNIGHT + 0.5 * H)
        assert plan is not None and [(p.job_id, p.pool) for p in plan.start] == [(row.id, "e1")]
        lent = [e.body for e in svc.events(row.id) if e.body.get("type") == "lent"]
        # Learnt: 06:00 needs 3.3 of 8 cards (an hour before the declared 07:00): 6 idle cards last until 05:45.
        assert lent and lent[0]["until"] == MIDNIGHT + 5.75 * H
        # The 4 lent are back by 06:45 (07:00 needs 5.3), not 07:45: the stop an hour earlier.
        stop_at = MIDNIGHT + 6.75 * H - 300.0 - 60.0
        svc.tick(stop_at - 5.0)
        assert not [e for e in store_outbox.pending(db) if e.kind == "stop_attempt"]
        svc.tick(stop_at)
        assert [(e.site, e.job_id) for e in store_outbox.pending(db) if e.kind == "stop_attempt"] == [("e1", row.id)]
    finally:
        db.conn.close()


@pytest.mark.parametrize("first, pool", [((), None), (("H20",), "e1")])
def test_an_edge_lends_all_its_training_cards_while_the_types_inference_keeps_first_cover_the_night(
        tmp_path: Path, first: tuple[str, ...], pool: str | None) -> None:
    """Rule 6 live, as in ``cpn sim``: an edge of 8 A800 and 8 H20, a replica holding 4 H20. Each type
    alone keeps its share of the night's forecast, so 5 A800 are lent and an 8-card gang waits; with
    H20 kept for inference first (``[lending] inference_first``) the H20 cover the site's night and
    all 8 A800 are lent until 05:45 (from 06:00 the replica, grown towards the 07:00 ramp with
    headroom, needs more than the 8 H20)."""
    from controlplane.store import deployments as store_deployments

    text = ('name = "lend"\n' + ACCELS + '[accelerators.H20]\nvendor = "nvidia"\nunits = 0.47\nkw_per_card = 0.4\nmemory_gb = 96\n'
            + site("e1", "pa", 30.0, 110.1, "edge", 8, rate=1e-5).replace("{ A800 = 8 }", "{ A800 = 8, H20 = 8 }")
            + origin("pa", 30.0, 110.0))
    lay = loader.loads(text)
    db = store_db.open_db(tmp_path / "cpn.db")
    reg = SiteRegistry()
    cfg = HubConfig(lending=LendingConfig(enabled=True, inference_first=first))
    svc = training.TrainingService(db=lambda: db, bus=None, registry=reg, layout=lambda: lay,  # type: ignore[arg-type]
                                   clock=WallClock(), metrics=HubMetrics(), config=cfg, tenant=lambda tid: {"id": tid})
    svc.outbox = CommandOutbox(db, None, clock=lambda: 0.0)
    try:
        reg.register(wire.Register(site="e1", tier="edge", city="pa", accelerators={"A800": 8, "H20": 8},
                                   executors=["sim"]), MIDNIGHT)
        reg.heartbeat(wire.Heartbeat(site="e1", seq=1, free_cards={"A800": 8.0, "H20": 4.0}), MIDNIGHT)
        store_deployments.create(db, deployment_id="dep-1", tenant="acme", model="qwen", spec={}, now=MIDNIGHT)
        store_deployments.upsert_replicas(db, "dep-1", [("e1", "H20", 4.0)], state="ready", now=MIDNIGHT)
        row, _ = svc.submit("acme", msgspec.structs.replace(SPEC, cards=8), None, "h", MIDNIGHT + 0.5 * H)
        plan = svc.tick(MIDNIGHT + 0.5 * H)
        assert plan is not None and [p.pool for p in plan.start] == ([pool] if pool else [])
        if pool:
            lent = [e.body for e in svc.events(row.id) if e.body.get("type") == "lent"]
            assert lent and lent[0]["until"] == MIDNIGHT + 5.75 * H
    finally:
        db.conn.close()
