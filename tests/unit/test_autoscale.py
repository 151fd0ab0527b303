"""autoscale.decide: known answers on a small network (no event loop, no mocks)."""

from __future__ import annotations

import random

import pytest

from controlplane.core import autoscale
from controlplane.core.replicas import Candidate

# One origin "a"; edges a1, a2 in its city and the next one; a regional pool and a hub farther away,
# all within 10 ms; a far edge beyond budget.
RTT = {"a": [("a1", 0.5), ("a2", 2.0), ("reg", 4.0), ("hub", 8.0), ("far", 30.0)]}
TIERS = {"a1": "edge", "a2": "edge", "reg": "regional", "hub": "hub", "far": "edge"}


class Rtt:
    def nearest(self, origin: str, budget_ms: float) -> list[tuple[str, float]]:
        return [(s, r) for s, r in RTT[origin] if r <= budget_ms]


def cands(**free: float) -> list[Candidate]:
    """Every site with ``free`` cards of type X (default 8 on edges, 64 elsewhere)."""
    out = []
    for site, tier in TIERS.items():
        n = free.get(site, 8.0 if tier == "edge" else 64.0)
        out.append(Candidate(id=site, city=site, tier=tier, free_cards={"X": n}))
    return out


def spec(**kw: object) -> autoscale.ScaleSpec:
    base: dict[str, object] = dict(model="m", cards_per_replica=1.0, slots_per_replica=4, max_replicas=20,
                                   scale_in_after_s=600.0)
    base.update(kw)
    return autoscale.ScaleSpec(**base)  # type: ignore[arg-type]


def demand(rate: float, service_s: float = 1.0, budget: float = 10.0) -> list[autoscale.Demand]:
    return [autoscale.Demand("a", budget, rate, service_s)]


class Deployment:
    """The replicas a run of decisions leaves, applied as the hub would (adds ready at once)."""

    def __init__(self, sp: autoscale.ScaleSpec, protected: tuple[str, ...] = ("a1",)) -> None:
        self.spec = sp
        self.replicas = {s: autoscale.Replica(site=s, tier=TIERS[s], added_at=-1e9, protected=True) for s in protected}
        self.memory = autoscale.Memory()
        self.adds = 0
        self.removes = 0
        self.plans: list[autoscale.ScalePlan] = []

    def step(self, now: float, d: list[autoscale.Demand], free: list[Candidate] | None = None) -> autoscale.ScalePlan:
        plan = autoscale.decide(now, self.spec, d, list(self.replicas.values()), free or cands(), Rtt(), self.memory)
        self.memory = plan.memory
        for a in plan.add:
            self.replicas[a.site] = autoscale.Replica(site=a.site, tier=TIERS[a.site], added_at=now)
            self.adds += 1
        for r in plan.remove:
            del self.replicas[r.site]
            self.removes += 1
        self.plans.append(plan)
        return plan


def test_square_root_staffing() -> None:
    assert autoscale.slots_needed(0.0, 3.0) == 0.0
    assert autoscale.slots_needed(4.0, 3.0) == pytest.approx(10.0)
    assert autoscale.slots_needed(100.0, 3.0) == pytest.approx(130.0)


def test_a_load_step_scales_out_edge_first_then_spills_with_reasons() -> None:
    dep = Deployment(spec())
    assert not dep.step(0.0, demand(1.0)).add  # 1 busy slot needs 4: the protected replica holds it
    # Step: 6 busy slots need 6 + 3·√6 ≈ 13.3 slots: a2 (edge), then the regional pool, then the hub.
    plan = dep.step(30.0, demand(6.0))
    assert [a.site for a in plan.add] == ["a2", "reg", "hub"]
    assert "origin a (10 ms)" in plan.add[0].reason and "+a2 (edge" in plan.add[0].reason
    assert "spill: edge sites within budget are full" in plan.add[1].reason
    assert not plan.remove
    # Loading and ready replicas count as capacity: the next decision adds nothing more.
    assert not dep.step(60.0, demand(6.0)).add


def test_tight_budget_demand_only_uses_sites_within_it() -> None:
    dep = Deployment(spec(), protected=())
    plan = dep.step(0.0, demand(2.0, budget=3.0))  # a1 and a2 only are within 3 ms
    assert {a.site for a in plan.add} == {"a1", "a2"}
    plan = dep.step(30.0, demand(8.0, budget=3.0))
    assert not plan.add and plan.short and "no site within budget" in plan.short[0]


def test_full_edges_and_max_replicas_are_reasons_not_errors() -> None:
    dep = Deployment(spec(max_replicas=2))
    plan = dep.step(0.0, demand(10.0), cands(a2=0.0))
    assert [a.site for a in plan.add] == ["reg"]  # a2 has no free card: spill
    assert any("max_replicas 2 reached" in s for s in plan.short)


def test_fixed_replicas_never_scale() -> None:
    dep = Deployment(spec(min_replicas=3, max_replicas=3))
    plan = dep.step(0.0, demand(50.0))
    assert not plan.add and not plan.remove and "no scaling" in plan.notes[0]


def test_scale_in_after_the_step_waits_for_the_cool_down_and_keeps_protected() -> None:
    dep = Deployment(spec())
    dep.step(0.0, demand(6.0))
    assert set(dep.replicas) == {"a1", "a2", "reg", "hub"}
    # Demand falls back (0.5 busy slots: even 30% more fits the protected replica's 4 slots):
    # nothing goes before the replicas are idle for scale_in_after_s.
    for k in range(1, 20):
        assert not dep.step(30.0 * k, demand(0.5)).remove
    removed: list[str] = []
    for k in range(20, 80):
        removed += [r.site for r in dep.step(30.0 * k, demand(0.5)).remove]
    # Hub first, then regional, then edge; the protected replica stays.
    assert removed == ["hub", "reg", "a2"]
    assert set(dep.replicas) == {"a1"}


def test_the_scale_in_margin_keeps_a_replica_demand_almost_needs() -> None:
    dep = Deployment(spec())
    dep.step(0.0, demand(6.0))
    for k in range(1, 80):
        dep.step(30.0 * k, demand(1.0))  # 1.0 needs 4 slots; 1.3 would need 4.7: a2 stays
    assert set(dep.replicas) == {"a1", "a2"}


def test_no_flapping_under_noise() -> None:
    # Noisy demand around a steady mean: after the first scale-out, over two hours of decisions
    # every 30 s the deployment neither adds nor removes again.
    rng = random.Random(7)
    dep = Deployment(spec())
    meter = autoscale.DemandMeter()
    now = 0.0
    for k in range(240):
        now = 30.0 * k
        count = sum(1 for _ in range(300) if rng.random() < 0.1)  # ≈ 1 request/s, binomial noise
        meter.observe(now, {("a", 10.0): count}, service_s=4.0)
        dep.step(now, meter.demand())
    first = dep.adds
    assert first >= 1
    churn = sum(len(p.add) + len(p.remove) for p in dep.plans[20:])
    assert churn == 0, [(p.add, p.remove) for p in dep.plans[20:] if p.add or p.remove]


def test_demand_meter_rises_fast_and_falls_slowly() -> None:
    meter = autoscale.DemandMeter(fast_s=60.0, slow_s=900.0)
    meter.observe(0.0, {}, service_s=1.0)
    for k in range(1, 11):
        meter.observe(30.0 * k, {("a", 10.0): 300})  # 10 requests/s for 5 minutes
    up = meter.demand()[0].rate_per_s
    assert up > 9.0
    for k in range(11, 13):
        meter.observe(30.0 * k, {})  # one minute of silence
    down = meter.demand()[0].rate_per_s
    assert 2.0 < down < up  # the slow mean holds the estimate up


def test_one_add_serves_several_short_origins_within_its_reach() -> None:
    # Two origins share the same sites; each is 1 slot short: one new replica (4 slots) covers both.
    RTT["b"] = list(RTT["a"])
    try:
        dep = Deployment(spec(), protected=())
        d = [autoscale.Demand("a", 10.0, 0.2, 1.0), autoscale.Demand("b", 10.0, 0.2, 1.0)]
        plan = dep.step(0.0, d)
        assert [a.site for a in plan.add] == ["a1"]
    finally:
        del RTT["b"]


def mixed() -> list[Candidate]:
    """Sites holding lendable L20 beside H20 that inference keeps first (lending's ``inference_first``)."""
    free = {"a1": {"L20": 16.0, "H20": 8.0}, "a2": {"L20": 8.0, "H20": 0.0}, "reg": {"L20": 64.0, "H20": 64.0},
            "hub": {"A800": 64.0, "H20": 4.0}, "far": {"H20": 8.0}}
    return [Candidate(id=s, city=s, tier=TIERS[s], free_cards=free[s]) for s in TIERS]


def test_prefer_puts_replicas_on_inference_first_cards_without_changing_the_sites() -> None:
    # 6 busy slots need 13.3: four replicas of 4 slots, edge first, then spill (as without prefer).
    plain = autoscale.decide(0.0, spec(), demand(6.0), [], mixed(), Rtt())
    kept = autoscale.decide(0.0, spec(), demand(6.0), [], mixed(), Rtt(), prefer=("H20",))
    assert [a.site for a in kept.add] == [a.site for a in plain.add] == ["a1", "a2", "reg", "hub"]
    # Before: the type with the most free cards (ties to the larger name), so lendable L20 first.
    assert [a.accelerator for a in plain.add] == ["L20", "L20", "L20", "A800"]
    # With prefer: H20 wherever it fits; a2 (no H20 free) is still picked, on its L20.
    assert [a.accelerator for a in kept.add] == ["H20", "L20", "H20", "H20"]
    # Later types of prefer rank next, unlisted types last (then the most free cards).
    second = autoscale.decide(0.0, spec(), demand(6.0), [], mixed(), Rtt(), prefer=("4090", "A800", "H20"))
    assert [a.accelerator for a in second.add] == ["H20", "L20", "H20", "A800"]
    # A deployment that lists its types keeps its own order.
    listed = autoscale.decide(0.0, spec(accelerators=["L20", "H20"]), demand(6.0), [], mixed(), Rtt(),
                              prefer=("H20",))
    assert [a.accelerator for a in listed.add] == ["L20", "L20", "L20", "H20"]


def test_prefer_holds_for_a_second_replica_at_a_site_and_a_larger_gang() -> None:
    # 4-card replicas, up to 2 a site: a1 has 8 H20 (two replicas), reg has 4 H20 free (one), then L20.
    free = [Candidate(id="a1", city="a1", tier="edge", free_cards={"L20": 16.0, "H20": 8.0}),
            Candidate(id="reg", city="reg", tier="regional", free_cards={"L20": 64.0, "H20": 2.0})]
    plan = autoscale.decide(0.0, spec(cards_per_replica=4.0, max_per_site=2), demand(6.0), [], free, Rtt(),
                            prefer=("H20",))
    assert [(a.site, a.accelerator) for a in plan.add] == [("a1", "H20"), ("a1", "H20"), ("reg", "L20"),
                                                           ("reg", "L20")]


def test_while_lending_replicas_prefer_inference_types_then_types_no_waiting_gang_accepts() -> None:
    types = ["910B", "L20", "H20", "A800", "RTX4090", "L20"]
    assert autoscale.lending_preference(("H20",), types, {"L20", "910B"}) == ("H20", "A800", "RTX4090")
    assert autoscale.lending_preference((), types, set()) == ("910B", "A800", "H20", "L20", "RTX4090")
    assert autoscale.lending_preference(("H20", "L20"), types, {"L20"}) == ("H20", "L20", "910B", "A800", "RTX4090")
