"""The pure rules of what a hub believes of a site (controlplane/core/declarations.py), the executor
filter of placement, and the router's site-local model rule: tables, no I/O."""

from __future__ import annotations

import math
import random

import msgspec
import pytest

from controlplane.core import declarations as dc
from controlplane.core import jobspec
from controlplane.core import placement as pl
from controlplane.core import scheduler as sc
from controlplane.core.registry import SiteView
from controlplane.core.router import NoRoute, Route, Router, RouteRequest
from edge_agent import wire
from tests.unit.test_router import Table
from tests.unit.test_scheduler import NOW, job, pool

DECL = dc.Declaration(id="hz", tier="edge", city="hangzhou", provider="op", accelerators={"910B": 4, "H20": 2})


def reg(**kw: object) -> wire.Register:
    base: dict[str, object] = {"site": "hz", "tier": "edge", "city": "hangzhou", "accelerators": {"910B": 4}}
    base.update(kw)
    return wire.Register(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(("cards", "refused"), [
    ({"910B": 4}, ""),
    ({"910B": 1, "H20": 2}, ""),
    ({}, ""),
    ({"910B": 5}, "over_declared"),
    ({"A800": 1}, "over_declared"),
    ({"910B": -1}, "negative_cards"),
    ({"910B": 1_000_000}, "absurd_cards"),
])
def test_cards_are_believed_up_to_the_declaration(cards: dict[str, int], refused: str) -> None:
    v = dc.check_register(DECL, reg(accelerators=cards), accept_undeclared=False)
    assert v.refused == refused
    if not refused:
        assert v.believed is not None and v.believed.accelerators == {a: n for a, n in cards.items() if n}


def test_declared_tier_city_provider_win_and_the_difference_is_named() -> None:
    v = dc.check_register(DECL, reg(tier="hub", city="beijing", provider="op"), accept_undeclared=False)
    assert v.believed is not None and (v.believed.tier, v.believed.city, v.believed.provider) == ("edge", "hangzhou", "op")
    assert v.ignored == ("tier", "city")


def test_an_undeclared_site_is_refused_unless_the_hub_accepts_them_within_bounds() -> None:
    assert dc.check_register(None, reg(), accept_undeclared=False).refused == "undeclared_site"
    assert dc.check_register(None, reg(), accept_undeclared=True).believed == reg()
    assert dc.check_register(None, reg(accelerators={"x": -2}), accept_undeclared=True).refused == "negative_cards"


def test_heartbeat_figures_are_clamped_to_their_physical_range() -> None:
    counted: dict[str, int] = {}
    hb = wire.Heartbeat(
        site="hz", seq=1, free_cards={"910B": 1e9, "H20": -3.0, "A800": 8.0}, queue_depth=-5, inflight=-1,
        service_ms_p50=-1.0, service_ms_p99=math.inf,
        models=[wire.ReplicaStatus(model="m", slots=10 ** 12, busy=-7, cards=-1.0),
                wire.ReplicaStatus(model="n", slots=4, busy=9, cards=100.0)],
        attempts=[wire.AttemptRef(job=f"j{i}", attempt=1, progress=5.0 if i == 0 else -1.0) for i in range(50)],
    )
    out = dc.clamp_heartbeat(hb, {"910B": 4, "H20": 2}, counted)
    assert out.free_cards == {"910B": 4.0, "H20": 0.0}
    assert (out.queue_depth, out.inflight, out.service_ms_p50, out.service_ms_p99) == (0, 0, 0.0, 3.6e6)
    m, n = out.models
    assert (m.slots, m.busy, m.cards) == (dc.MAX_SLOTS, 0, 0.0) and (n.slots, n.busy, n.cards) == (4, 4, 6.0)
    assert len(out.attempts) == 6 and [a.progress for a in out.attempts[:2]] == [1.0, 0.0]
    assert set(counted) == {"free_cards", "queue", "service_ms", "replica", "attempts", "progress"}
    honest = wire.Heartbeat(site="hz", seq=2, free_cards={"910B": 2.5}, queue_depth=3,
                            models=[wire.ReplicaStatus(model="m", slots=4, busy=2, cards=1.0)])
    counted.clear()
    assert dc.clamp_heartbeat(honest, {"910B": 4}, counted) == honest and counted == {}


def test_a_site_own_replica_serves_only_tenants_the_operator_allowed_there() -> None:
    def view(sid: str, allowed: frozenset[str], deployment: str = "") -> SiteView:
        v = SiteView(id=sid, local_model_tenants=allowed)
        v.replicas = {"m": wire.ReplicaStatus(model="m", slots=4, deployment=deployment)}
        return v

    sites = {"near": view("near", frozenset()), "far": view("far", frozenset({"acme"}))}
    r = Router(Table({"o": [("near", 1.0), ("far", 5.0)]}))
    rng = random.Random(0)
    d = r.route(RouteRequest("o", "m", 10, tenant="acme"), sites, 0, rng)
    assert isinstance(d, Route) and d.site == "far" and d.fallbacks == []
    assert isinstance(r.route(RouteRequest("o", "m", 10, tenant="bob"), sites, 0, rng), NoRoute)
    assert r.route(RouteRequest("o", "m", 10), sites, 0, rng).site == "near"  # type: ignore[union-attr]  # an operator
    sites["near"] = view("near", frozenset({"*"}))
    assert r.route(RouteRequest("o", "m", 10, tenant="bob"), sites, 1, rng).site == "near"  # type: ignore[union-attr]
    # A replica a deployment placed is governed by the deployment's scope, not by this rule.
    sites["near"] = view("near", frozenset(), deployment="dep-1")
    d = r.route(RouteRequest("o", "m", 10, deployments=frozenset({"dep-1", ""}), tenant="bob"), sites, 2, rng)
    assert isinstance(d, Route) and d.site == "near"


@pytest.mark.parametrize(("workload", "executors", "ok"), [
    ("sim", frozenset({"sim"}), True),
    ("sim", frozenset({"process"}), False),
    ("process", frozenset({"slurm"}), True),
    ("process", frozenset({"sim", "container"}), False),
    ("container", frozenset({"container"}), True),
    ("container", frozenset(), False),
    ("container", None, True),
])
def test_placement_chooses_only_sites_whose_executors_run_the_workload(
        workload: str, executors: frozenset[str] | None, ok: bool) -> None:
    j = job("j1", workload=workload)
    p = pool("p1", executors=executors)
    reason = pl.filter_reason(j, p, "A800")
    assert (reason is None) == ok
    planned = sc.plan(sc.Snapshot(pools=[p], queued=[j]), NOW)
    assert [s.pool for s in planned.start] == (["p1"] if ok else [])
    if not ok:
        (inf,) = planned.infeasible
        assert f"runs no {workload} workloads" in "; ".join(inf.reasons)


def test_a_workload_goes_to_the_site_that_can_run_it_even_when_dearer() -> None:
    cheap = pool("cheap", price=0.1, executors=frozenset({"sim"}))
    dear = pool("dear", price=0.9, executors=frozenset({"container", "sim"}))
    planned = sc.plan(sc.Snapshot(pools=[cheap, dear], queued=[job("c", workload="container"), job("s")]), NOW)
    assert {s.job_id: s.pool for s in planned.start} == {"c": "dear", "s": "cheap"}


def test_workload_of_a_stored_spec() -> None:
    stored = ({}, {"command": ["x"]}, {"image": "busybox"}, {"image": "b", "command": ["x"]})
    specs = [jobspec.decode(msgspec.json.encode({"cards": 1, "accelerators": ["A800"], "est_hours": 1, **s}))
             for s in stored]
    assert [s.workload for s in specs] == ["sim", "process", "container", "container"]
