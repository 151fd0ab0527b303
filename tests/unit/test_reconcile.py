"""Deployments decided (controlplane/core/deployments.py): each rule on plain data, no event loop, no mocks.

A builder with defaults (``snap``), a projection helper (``summary``) and asserts on plain values, in
the shape of the scheduler's tests.
"""

from __future__ import annotations

import msgspec

from collections.abc import Callable, Mapping
from typing import Any

import pytest

from controlplane.core import deployments as d
from controlplane.core import quota
from controlplane.core.registry import SiteView
from controlplane.core.replica_lifecycle import (
    HOLDING, TRANSITIONS, IllegalReplicaTransition, ReplicaEvent, ReplicaState, transition,
)
from controlplane.core.replicas import DeploymentSpec
from edge_agent import wire

R, E = ReplicaState, ReplicaEvent


class FakeRtt:
    def __init__(self, table: Mapping[str, Mapping[str, float]]) -> None:
        self.table = table

    def nearest(self, origin: str, budget_ms: float,
                accept: Callable[[str], bool] | None = None) -> list[tuple[str, float]]:
        row = self.table[origin]
        return sorted(((s, r) for s, r in row.items() if r <= budget_ms and (accept is None or accept(s))),
                      key=lambda x: (x[1], x[0]))


RTT = FakeRtt({"hz": {"hz-edge": 1.0, "sh-edge": 3.0, "nj-edge": 5.0}})
CITIES = {"hz-edge": "hz", "sh-edge": "sh", "nj-edge": "nj"}


def view(site: str, *, free: float = 4.0, state: str = "up", hb: int = 10, draining: bool = False,
         reports: list[wire.ReplicaStatus] | None = None) -> SiteView:
    return SiteView(id=site, city=CITIES[site], tier="edge", accelerators={"A800": 4}, free_cards={"A800": free},
                    state=state, heartbeats=hb, draining=draining, replicas={r.model: r for r in reports or []})


def dep(id: str = "dep-1", *, tenant: str = "acme", model: str = "qwen", state: str = "pending",
        cards: float = 1.0) -> d.Deployment:
    return d.Deployment(id=id, tenant=tenant, model=model, state=state,
                        spec=DeploymentSpec(model=model, origins=["hz"], cards_per_replica=cards, min_cities=2))


def rep(site: str, state: ReplicaState, deployment: str = "dep-1", cards: float = 1.0) -> d.Replica:
    return d.Replica(deployment=deployment, site=site, accelerator="A800", cards=cards, state=state)


def snap(deps: list[d.Deployment] | None = None, replicas: list[d.Replica] | None = None,
         views: list[SiteView] | None = None, **kw: Any) -> d.Snapshot:
    deps = [dep()] if deps is None else deps
    by_dep: dict[str, list[d.Replica]] = {}
    for r in replicas or []:
        by_dep.setdefault(r.deployment, []).append(r)
    vs = views if views is not None else [view(s) for s in CITIES]
    return d.Snapshot(deployments=deps, replicas=by_dep, sites=(), views={v.id: v for v in vs}, rtt=RTT, **kw)


def summary(plan: d.Plan) -> dict[str, Any]:
    return {
        "replicas": sorted((c.site, None if c.old is None else c.old.value, c.new.value) for c in plan.replicas),
        "loads": sorted(x.site for x in plan.loads),
        "unloads": sorted(x.site for x in plan.unloads),
        "states": {c.deployment: c.new for c in plan.deployments},
    }


def ready(model: str = "qwen", deployment: str = "dep-1", state: str = "ready") -> wire.ReplicaStatus:
    return wire.ReplicaStatus(model=model, deployment=deployment, state=state, cards=1.0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- placing and loading


def test_a_new_deployment_is_placed_in_two_cities_and_loads_keep_their_wire_shape() -> None:
    plan = d.reconcile(snap(), 100.0)
    assert summary(plan) == {
        "replicas": [("hz-edge", None, "placed"), ("sh-edge", None, "placed")],
        "loads": ["hz-edge", "sh-edge"], "unloads": [], "states": {"dep-1": "pending"},
    }
    assert plan.loads[0].command == wire.LoadModel(model="qwen", deployment="dep-1", cards=1.0, slots=4,
                                                   accelerator="A800")
    assert all(c.reason and c.event is E.PLACE for c in plan.replicas)
    assert plan.active_work


def test_readiness_comes_from_heartbeats_and_makes_the_deployment_ready() -> None:
    views = [view("hz-edge", reports=[ready()]), view("sh-edge", reports=[ready(state="loading")]), view("nj-edge")]
    plan = d.reconcile(snap(replicas=[rep("hz-edge", R.LOADING), rep("sh-edge", R.PLACED)], views=views), 100.0)
    assert summary(plan)["replicas"] == [("hz-edge", "loading", "ready"), ("sh-edge", "placed", "loading")]
    assert not plan.loads  # sh-edge reports it loading: no second LoadModel
    views[1] = view("sh-edge", reports=[ready()])
    plan = d.reconcile(snap(replicas=[rep("hz-edge", R.READY), rep("sh-edge", R.READY)], views=views), 101.0)
    assert summary(plan)["states"] == {"dep-1": "ready"}


def test_free_cards_count_replicas_placed_but_not_yet_reported() -> None:
    # hz-edge has 1.5 free cards by heartbeat; another deployment's placed replica (not reported yet) holds 1.
    other = dep("dep-2", model="llama")
    views = [view("hz-edge", free=1.5), view("sh-edge"), view("nj-edge")]
    plan = d.reconcile(snap([other, dep()], [rep("hz-edge", R.PLACED, deployment="dep-2")], views), 100.0)
    placed = {c.site for c in plan.replicas if c.deployment == "dep-1"}
    assert placed == {"sh-edge", "nj-edge"}


def test_one_model_per_site_keeps_a_second_deployment_of_the_model_off_a_site() -> None:
    views = [view("hz-edge", reports=[ready(deployment="dep-other")]), view("sh-edge"), view("nj-edge")]
    plan = d.reconcile(snap(views=views), 100.0)
    assert summary(plan)["loads"] == ["nj-edge", "sh-edge"]
    assert any("hz-edge not used: it already hosts qwen" in n for n in plan.deployments[0].report["notes"])  # type: ignore[attr-defined]


def test_start_up_grace_leaves_old_deployments_alone_but_plans_new_ones() -> None:
    old, new = dep("dep-1"), dep("dep-2", model="llama")
    plan = d.reconcile(snap([old, new], grace_until=103.0, fresh=frozenset({"dep-2"})), 100.0)
    assert plan.waiting == ["dep-1"] and {c.deployment for c in plan.replicas} == {"dep-2"}
    assert plan.active_work  # plan again soon: the grace ends
    after = d.reconcile(snap([old, new], grace_until=103.0), 103.0)
    assert not after.waiting and {c.deployment for c in after.replicas} == {"dep-1", "dep-2"}


@pytest.mark.parametrize("quota_cards, training, held, cpr, allowed", [
    (None, 0.0, 0.0, 1.0, None),
    (4, 0.0, 0.0, 1.0, 4),
    (4, 2.0, 1.0, 1.0, 1),
    (4, 3.0, 1.0, 1.0, 0),
    (1, 0.0, 0.7, 0.1, 3),   # 0.3 left: three 0.1-card replicas fit despite float sums
    (2, 5.0, 0.0, 1.0, 0),   # over quota: nothing, never negative
])
def test_quota_cap(quota_cards: int | None, training: float, held: float, cpr: float, allowed: int | None) -> None:
    n, note = d.quota_cap(dep(cards=cpr), quota_cards, held, training)
    assert n == allowed
    assert (note == "") == (quota_cards is None)


def test_quota_limits_the_replicas_a_plan_adds_and_says_why() -> None:
    plan = d.reconcile(snap(quota_cards={"acme": 2}, training_cards={"acme": 1.0}), 100.0)
    assert summary(plan)["loads"] == ["hz-edge"]
    assert any("card quota" in n for n in plan.deployments[0].report["notes"])  # type: ignore[attr-defined]


def test_one_quota_function_serves_training_and_deployments() -> None:
    # Training's view: the quota less what deployments hold, in whole cards (the scheduler counts jobs).
    assert quota.training_quota(4, 1.5) == 2 and quota.training_quota(None, 3.0) is None
    assert quota.training_quota(1, 3.0) == 0
    # Deployments' view: the quota less both.
    assert quota.cards_left(4, training_cards=2, deployment_cards=1.5) == pytest.approx(0.5)
    assert quota.replicas_within(quota.cards_left(4, training_cards=2, deployment_cards=1.5), 0.25) == 2


# --------------------------------------------------------------------------- losing, failing, forgetting


def test_a_lost_replica_is_removed_and_replaced() -> None:
    views = [view("hz-edge", reports=[ready()]), view("sh-edge", state="lost"), view("nj-edge")]
    plan = d.reconcile(snap(replicas=[rep("hz-edge", R.READY), rep("sh-edge", R.LOST)], views=views), 100.0)
    assert summary(plan)["replicas"] == [("nj-edge", None, "placed"), ("sh-edge", "lost", "removed")]
    assert summary(plan)["loads"] == ["nj-edge"]


def test_a_failed_replica_is_removed_unloaded_and_its_site_cools_down() -> None:
    views = [view("hz-edge", reports=[ready(state="failed")]), view("sh-edge", reports=[ready()]), view("nj-edge")]
    reps = [rep("hz-edge", R.LOADING), rep("sh-edge", R.READY)]
    plan = d.reconcile(snap(replicas=reps, views=views), 100.0)
    assert summary(plan)["replicas"] == [("hz-edge", "loading", "removed"), ("nj-edge", None, "placed")]
    assert summary(plan)["unloads"] == ["hz-edge"]
    assert plan.memory.cooldown == {("dep-1", "hz-edge"): 130.0}
    # Within the cool-down the site is not used again; after it, it is.
    reps = [rep("hz-edge", R.REMOVED), rep("sh-edge", R.READY)]
    views = [view("hz-edge"), view("sh-edge", reports=[ready()]), view("nj-edge", free=0.0)]
    cooling = d.reconcile(snap(replicas=reps, views=views, memory=plan.memory), 110.0)
    assert not cooling.loads and any("hz-edge not used for now" in n for n in cooling.deployments[0].report["notes"])  # type: ignore[attr-defined]
    cooled = d.reconcile(snap(replicas=reps, views=views, memory=cooling.memory), 131.0)
    assert summary(cooled)["replicas"] == [("hz-edge", "removed", "placed")]


def test_a_replica_the_agent_forgot_is_loaded_again_after_missing_heartbeats() -> None:
    reps = [rep("hz-edge", R.LOADING), rep("sh-edge", R.LOADING)]
    views = [view("hz-edge", hb=10), view("sh-edge", hb=10, reports=[ready(state="loading")]), view("nj-edge")]
    first = d.reconcile(snap(replicas=reps, views=views), 100.0)
    assert not first.replicas and first.memory.seen_hb[("dep-1", "hz-edge")] == 10
    views[0] = view("hz-edge", hb=12)
    assert not d.reconcile(snap(replicas=reps, views=views, memory=first.memory), 102.0).replicas
    views[0] = view("hz-edge", hb=13)
    plan = d.reconcile(snap(replicas=reps, views=views, memory=first.memory), 103.0)
    assert summary(plan)["replicas"] == [("hz-edge", "loading", "placed")] and summary(plan)["loads"] == ["hz-edge"]


def test_orphans_of_ours_are_unloaded_others_are_left_alone() -> None:
    views = [view("hz-edge", reports=[ready(deployment="dep-gone")]),
             view("sh-edge", reports=[ready(model="byhand", deployment="manual")]),
             view("nj-edge", reports=[ready(model="own", deployment="local")])]
    plan = d.reconcile(snap([], views=views, ours=frozenset({"dep-gone"})), 100.0)
    assert [(u.site, u.command) for u in plan.unloads] == [
        ("hz-edge", wire.UnloadModel(model="qwen", deployment="dep-gone"))]
    assert d.reconcile(snap([], views=views), 100.0).unloads == []  # not known as ours: not ours to unload


# --------------------------------------------------------------------------- sending and refusals


def test_no_second_command_while_one_is_pending_or_within_retry() -> None:
    reps = [rep("hz-edge", R.PLACED), rep("sh-edge", R.PLACED)]
    pending = frozenset({("load", "dep-1", "hz-edge")})
    plan = d.reconcile(snap(replicas=reps, pending=pending), 100.0)
    assert summary(plan)["loads"] == ["sh-edge"]
    again = d.reconcile(snap(replicas=reps, memory=plan.memory), 101.0)
    assert summary(again)["loads"] == ["hz-edge"]  # sh-edge was issued 1 s ago (retry_s = 2)
    later = d.reconcile(snap(replicas=reps, memory=again.memory), 102.5)
    assert summary(later)["loads"] == ["sh-edge"]


def test_no_load_is_issued_to_a_site_that_is_not_up() -> None:
    s = snap(views=[view("hz-edge", state="lost"), view("sh-edge")])
    assert not d.may_send(d.LOAD, "dep-1", "hz-edge", s, {}, 100.0)
    assert d.may_send(d.UNLOAD, "dep-1", "hz-edge", s, {}, 100.0)
    assert d.may_send(d.LOAD, "dep-1", "sh-edge", s, {}, 100.0)


@pytest.mark.parametrize("state, code, event", [
    (R.PLACED, "no_capacity", E.REFUSED), (R.PLACED, "draining", E.REFUSED), (R.PLACED, "bad_message", E.REFUSED),
    (R.PLACED, "unavailable", None),   # may pass: retried later as it is
    (R.LOADING, "no_capacity", None),  # already accepted: the heartbeat decides
])
def test_after_refusal(state: ReplicaState, code: str, event: ReplicaEvent | None) -> None:
    assert d.after_refusal(state, code) is event


# --------------------------------------------------------------------------- the replica table


def test_the_replica_table_refuses_what_it_does_not_hold() -> None:
    assert transition(R.PLACED, E.ACCEPTED) is R.LOADING
    assert transition("ready", E.SITE_LOST) is R.LOST
    with pytest.raises(IllegalReplicaTransition, match="cannot accepted a replica that is removed"):
        transition(R.REMOVED, E.ACCEPTED)
    with pytest.raises(IllegalReplicaTransition):
        transition(R.LOST, E.REPORTED_READY)
    # removed is only ever left by a new placement; every holding state can be lost and unplaced.
    assert set(TRANSITIONS[R.REMOVED]) == {E.PLACE}
    assert all(TRANSITIONS[s][E.SITE_LOST] is R.LOST and TRANSITIONS[s][E.UNPLACE] is R.REMOVED for s in HOLDING)


def test_a_transition_the_table_refuses_is_reported_not_applied() -> None:
    p = d._Pass(snap(), 100.0)
    assert p.change(rep("hz-edge", R.REMOVED), "dep-1", "hz-edge", E.MISSING, "test") is None
    assert p.plan.replicas == [] and p.plan.illegal == ["deployment dep-1 site hz-edge: cannot missing a replica that is removed"]


# --------------------------------------------------------------------------- what the autoscaler asks for


def asks(add: list[str] = [], remove: list[str] = []) -> Any:  # noqa: B006 (read only)
    from controlplane.core import autoscale
    return autoscale.ScalePlan(add=[autoscale.Add(s, "A800", 1.0, f"demand near {s}") for s in add],
                               remove=[autoscale.Remove(s, "idle") for s in remove])


def test_autoscaler_asks_become_the_commands_that_carry_them_out() -> None:
    loads, unloads = d.autoscaler_asks(dep(), asks(add=["nj-edge"], remove=["sh-edge"]))
    assert [(x.site, x.command, x.reason) for x in loads] == [("nj-edge", wire.LoadModel(
        model="qwen", deployment="dep-1", cards=1.0, slots=4, accelerator="A800"), "scale out: demand near nj-edge")]
    assert [(x.site, x.command) for x in unloads] == [("sh-edge", wire.UnloadModel(model="qwen", deployment="dep-1"))]


def test_a_reconcile_carries_out_scaling_within_the_other_rules() -> None:
    views = [view("hz-edge", reports=[ready()]), view("sh-edge", reports=[ready()]), view("nj-edge")]
    reps = [rep("hz-edge", R.READY), rep("sh-edge", R.READY)]
    out = d.reconcile(snap(replicas=reps, views=views, scaling={"dep-1": asks(add=["nj-edge"])}), 100.0)
    assert summary(out)["replicas"] == [("nj-edge", None, "placed")] and summary(out)["loads"] == ["nj-edge"]
    assert out.replicas[0].reason == "scale out: demand near nj-edge"
    # Not on a site holding the model for another deployment (Rule 2), nor past the quota (Rule 6).
    views[2] = view("nj-edge", reports=[ready(deployment="dep-other")])
    assert not d.reconcile(snap(replicas=reps, views=views, scaling={"dep-1": asks(add=["nj-edge"])}), 100.0).loads
    views[2] = view("nj-edge")
    capped = snap(replicas=reps, views=views, scaling={"dep-1": asks(add=["nj-edge"])}, quota_cards={"acme": 2})
    assert not d.reconcile(capped, 100.0).loads
    # A remove unplaces and unloads.
    out = d.reconcile(snap(replicas=reps, views=views, scaling={"dep-1": asks(remove=["sh-edge"])}), 100.0)
    assert ("sh-edge", "ready", "removed") in summary(out)["replicas"] and summary(out)["unloads"] == ["sh-edge"]


def test_a_scaling_deployment_says_why_in_its_status_and_keeps_it() -> None:
    scaling = d.Deployment(id="dep-1", tenant="acme", model="qwen", spec=DeploymentSpec(
        model="qwen", origins=["hz"], min_cities=2, min_replicas=2, max_replicas=3))
    views = [view("hz-edge", reports=[ready()]), view("sh-edge", reports=[ready()]), view("nj-edge")]
    reps = [rep("hz-edge", R.READY), rep("sh-edge", R.READY)]
    out = d.reconcile(snap(deps=[scaling], replicas=reps, views=views, scaling={"dep-1": asks(add=["nj-edge"])}), 100.0)
    status = out.deployments[0].report["scaling"]
    assert status == {"min_replicas": 2, "max_replicas": 3, "scale_out": ["+nj-edge: demand near nj-edge"],
                      "scale_in": [], "short": []}
    # The next decision asks nothing: the last reasons stay.
    kept = msgspec.structs.replace(scaling, report=out.deployments[0].report)
    again = d.reconcile(snap(deps=[kept], replicas=reps, views=views, scaling={"dep-1": asks()}), 101.0)
    assert all(c.report["scaling"] == status for c in again.deployments)
    # A fixed deployment has no scaling status.
    assert all("scaling" not in c.report for c in d.reconcile(snap(replicas=reps, views=views), 100.0).deployments)
