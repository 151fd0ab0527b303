"""Replica placement and deployment state (controlplane/core/replicas.py): tables, scenarios, properties."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.core import replicas
from controlplane.core.errors import RequestError, Unprocessable
from controlplane.core.replicas import Candidate, DeploymentSpec, Placement, plan_replicas


class FakeRtt:
    """RTT lookup over a plain dict {origin: {site: rtt_ms}} (the RttIndex.nearest contract)."""

    def __init__(self, table: Mapping[str, Mapping[str, float]]) -> None:
        self.table = table

    def nearest(
        self, origin: str, budget_ms: float, accept: Callable[[str], bool] | None = None
    ) -> list[tuple[str, float]]:
        row = self.table[origin]  # KeyError for an unknown origin, like RttIndex
        out = [(s, r) for s, r in row.items() if r <= budget_ms and (accept is None or accept(s))]
        return sorted(out, key=lambda x: (x[1], x[0]))


def site(
    id: str, city: str, *, tier: str = "edge", free: float = 1.0, acc: str = "A800",
    healthy: bool = True, draining: bool = False, extra: dict[str, float] | None = None,
) -> Candidate:
    return Candidate(
        id=id, city=city, region="r", tier=tier, healthy=healthy, draining=draining,
        free_cards={acc: free, **(extra or {})},
    )


def spec(**kw: object) -> DeploymentSpec:
    kw.setdefault("model", "qwen2-7b")
    kw.setdefault("origins", ["hz"])
    return DeploymentSpec(**kw)  # type: ignore[arg-type]


def sites_added(plan: replicas.ReplicaPlan) -> list[str]:
    return [p.site for p in plan.add]


# --------------------------------------------------------------------------- basic placement

HZ = {"hz": {"hz-edge": 1.0, "bj-hub": 0.5, "sh-edge": 3.0, "sh-edge2": 4.0, "nj-reg": 6.0, "far-edge": 30.0}}
HZ_SITES = [
    site("hz-edge", "hz"), site("bj-hub", "bj", tier="hub", free=100), site("sh-edge", "sh"),
    site("sh-edge2", "sh", free=4), site("nj-reg", "nj", tier="regional"), site("far-edge", "far"),
]


def test_two_cities_within_budget_never_on_a_hub() -> None:
    plan = plan_replicas(spec(), HZ_SITES, FakeRtt(HZ), {})
    assert sites_added(plan) == ["hz-edge", "sh-edge"]
    assert plan.coverage == {"hz": ["hz", "sh"]}
    assert plan.uncovered == []
    assert plan.targets == {"hz": 2}
    assert all(p.accelerator == "A800" and p.cards == 1.0 for p in plan.add)


def test_three_cities_when_asked() -> None:
    plan = plan_replicas(spec(min_cities=3), HZ_SITES, FakeRtt(HZ), {})
    assert sites_added(plan) == ["hz-edge", "sh-edge", "nj-reg"]
    assert plan.coverage["hz"] == ["hz", "sh", "nj"]


def test_greedy_prefers_a_site_that_serves_two_origins() -> None:
    rtt = FakeRtt({
        "a": {"ya": 1.0, "x": 4.0, "za": 5.0},
        "b": {"yb": 1.0, "x": 4.0, "zb": 5.0},
    })
    cands = [site("ya", "ca"), site("yb", "cb"), site("x", "cx"), site("za", "cza"), site("zb", "czb")]
    plan = plan_replicas(spec(origins=["a", "b"]), cands, rtt, {})
    # x covers one unit of demand for each origin, so it goes first and saves a replica.
    assert sites_added(plan)[0] == "x"
    assert sorted(sites_added(plan)) == ["x", "ya", "yb"]
    assert plan.coverage == {"a": ["ca", "cx"], "b": ["cb", "cx"]}


def test_ties_go_to_lower_rtt_then_more_free_cards() -> None:
    rtt = FakeRtt({"o": {"near": 2.0, "far": 3.0, "roomy": 2.0, "c2": 9.0}})
    cands = [site("near", "c1", free=1.0), site("roomy", "c1b", free=8.0), site("far", "c1c", free=8.0), site("c2", "c2")]
    plan = plan_replicas(spec(origins=["o"]), cands, rtt, {})
    assert sites_added(plan) == ["roomy", "near"]


def test_origin_weights_steer_the_cover() -> None:
    # Two origins want one city each; the only site with room covers one of them.
    rtt = FakeRtt({"big": {"s1": 1.0, "s2": 2.0}, "small": {"s2": 1.0}})
    cands = [site("s1", "c1", free=0.0), site("s2", "c2")]
    plan = plan_replicas(spec(origins=["small", "big"], min_cities=1), cands, rtt, {}, origin_weights={"big": 5})
    assert sites_added(plan) == ["s2"]
    assert plan.coverage == {"small": ["c2"], "big": ["c2"]}


def test_plan_is_deterministic_whatever_the_candidate_order() -> None:
    rng = random.Random(7)
    first = plan_replicas(spec(min_cities=3), HZ_SITES, FakeRtt(HZ), {})
    for _ in range(5):
        shuffled = list(HZ_SITES)
        rng.shuffle(shuffled)
        assert plan_replicas(spec(min_cities=3), shuffled, FakeRtt(HZ), {}) == first


# --------------------------------------------------------------------------- cards


def test_fractional_cards_fit_and_debit_across_deployments() -> None:
    rtt = FakeRtt({"o": {"a": 1.0, "b": 2.0}})
    cands = [site("a", "ca", free=0.5), site("b", "cb", free=0.3)]
    s = spec(origins=["o"], cards_per_replica=0.25)
    plan = plan_replicas(s, cands, rtt, {})
    assert plan.add == [Placement("a", "A800", 0.25), Placement("b", "A800", 0.25)]
    left = replicas.apply_debits(cands, plan)
    assert [c.free_cards["A800"] for c in left] == pytest.approx([0.25, 0.05])
    # A second deployment fits once more at a, not at b.
    plan2 = plan_replicas(spec(model="other", origins=["o"], cards_per_replica=0.25), left, rtt, {})
    assert sites_added(plan2) == ["a"]
    assert plan2.uncovered == [
        ("o", "origin o: 1 of 2 cities covered within 10 ms; no free capacity for 0.25 cards in 1 city within budget (cb)")
    ]


def test_float_sums_do_not_refuse_an_exact_fit() -> None:
    rtt = FakeRtt({"o": {"a": 1.0, "b": 1.0}})
    plan = plan_replicas(spec(origins=["o"], cards_per_replica=0.3), [site("a", "ca", free=0.1 + 0.2), site("b", "cb", free=0.3)], rtt, {})
    assert sorted(sites_added(plan)) == ["a", "b"]


def test_accelerator_preference_and_filter() -> None:
    rtt = FakeRtt({"o": {"both": 1.0, "a800only": 1.5, "h20": 2.0}})
    cands = [
        site("both", "c1", acc="910B", free=4, extra={"H20": 1.0}),
        site("a800only", "c2", acc="A800", free=8),
        site("h20", "c3", acc="H20", free=1),
    ]
    plan = plan_replicas(spec(origins=["o"], accelerators=["H20", "910B"]), cands, rtt, {})
    assert plan.add == [Placement("both", "H20", 1.0), Placement("h20", "H20", 1.0)]
    # Without a preference the type with the most free cards is used.
    plan = plan_replicas(spec(origins=["o"], min_cities=1), cands, rtt, {})
    assert plan.add == [Placement("both", "910B", 1.0)]


def test_prefer_takes_inference_first_cards_and_keeps_the_sites() -> None:
    # Lending's inference_first (H20) beside lendable L20: the same sites as without it (ties on the
    # free cards of the type chosen before), each replica on H20 where it fits.
    rtt = FakeRtt({"o": {"a": 1.0, "b": 1.0, "c": 2.0}})
    cands = [site("a", "c1", acc="L20", free=8, extra={"H20": 1.0}), site("b", "c2", acc="L20", free=4, extra={"H20": 4.0}),
             site("c", "c3", acc="L20", free=8, extra={"H20": 0.0})]
    plain = plan_replicas(spec(origins=["o"], min_cities=3), cands, rtt, {})
    assert plain.add == [Placement("a", "L20", 1.0), Placement("b", "L20", 1.0), Placement("c", "L20", 1.0)]
    kept = plan_replicas(spec(origins=["o"], min_cities=3), cands, rtt, {}, prefer=("H20",))
    assert kept.add == [Placement("a", "H20", 1.0), Placement("b", "H20", 1.0), Placement("c", "L20", 1.0)]
    one = plan_replicas(spec(origins=["o"], min_cities=1), cands, rtt, {}, prefer=("H20",))
    assert one.add == [Placement("a", "H20", 1.0)]  # a (8 free L20) before b (4), as without prefer
    # A deployment that lists its types keeps its own order.
    listed = plan_replicas(spec(origins=["o"], min_cities=1, accelerators=["L20", "H20"]), cands, rtt, {},
                           prefer=("H20",))
    assert listed.add == [Placement("a", "L20", 1.0)]


# --------------------------------------------------------------------------- reasons


def test_layout_reason_names_sites_in_reach_and_the_next_city() -> None:
    rtt = FakeRtt({"lhasa": {"lhasa-edge": 1.0, "chengdu-edge": 23.4, "chengdu-hub": 22.0}})
    cands = [site("lhasa-edge", "lhasa"), site("chengdu-edge", "chengdu"), site("chengdu-hub", "chengdu", tier="hub")]
    plan = plan_replicas(spec(origins=["lhasa"], budget_ms=5), cands, rtt, {})
    assert sites_added(plan) == ["lhasa-edge"]
    assert plan.targets == {"lhasa": 1}
    assert plan.uncovered == [
        ("lhasa", "origin lhasa: 1 city within 5 ms (lhasa-edge); 2nd nearest city chengdu at 23.4 ms (chengdu-edge)")
    ]


def test_layout_reason_when_nothing_is_in_reach() -> None:
    rtt = FakeRtt({"o": {"hub": 1.0}})
    plan = plan_replicas(spec(origins=["o"]), [site("hub", "c", tier="hub")], rtt, {})
    assert plan.add == []
    assert plan.targets == {"o": 0}
    assert plan.uncovered == [
        ("o", "origin o: no edge or regional site within 10 ms; no other city has an edge or regional site")
    ]


def test_health_and_capacity_reasons() -> None:
    rtt = FakeRtt({"o": {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}})
    cands = [site("a", "ca"), site("b", "cb", healthy=False), site("c", "cc", draining=True), site("d", "cd", free=0.5)]
    plan = plan_replicas(spec(origins=["o"], min_cities=3), cands, rtt, {})
    assert sites_added(plan) == ["a"]
    (reason,) = [r for _, r in plan.uncovered]
    assert reason.startswith("origin o: 1 of 3 cities covered within 10 ms; ")
    assert "no free capacity for 1 cards in 1 city within budget (cd)" in reason
    assert "unhealthy in 1 city within budget (cb)" in reason
    assert "draining in 1 city within budget (cc)" in reason


def test_unknown_origin_and_region() -> None:
    rtt = FakeRtt({"hz": HZ["hz"]})
    plan = plan_replicas(
        spec(origins=["nowhere", "hz"], regions=["zhejiang", "atlantis"]), HZ_SITES, rtt, {},
        {"zhejiang": ["hz"]},
    )
    assert plan.coverage["hz"] == ["hz", "sh"]
    assert ("nowhere", "origin nowhere: not in the layout") in plan.uncovered
    assert ("region:atlantis", "region atlantis: no demand origins in the layout") in plan.uncovered
    assert "nowhere" not in plan.targets


# --------------------------------------------------------------------------- existing replicas


def test_healthy_replicas_are_kept_and_nothing_is_added_when_covered() -> None:
    plan = plan_replicas(spec(), HZ_SITES, FakeRtt(HZ), {"hz-edge": "ready", "sh-edge2": "loading"})
    assert plan.add == []
    assert plan.keep == ["hz-edge", "sh-edge2"]
    assert plan.remove == []
    assert plan.coverage == {"hz": ["hz", "sh"]}


def test_lost_replica_is_replaced_in_another_city_and_not_reused_at_once() -> None:
    sites = [c if c.id != "sh-edge" else site("sh-edge", "sh") for c in HZ_SITES]
    existing = {"hz-edge": "ready", "sh-edge": "lost", "old": "removed"}
    plan = plan_replicas(spec(), sites, FakeRtt(HZ), existing)
    assert plan.remove == ["sh-edge"]
    assert plan.keep == ["hz-edge"]
    # sh-edge is healthy again but holds a lost replica: the replacement goes elsewhere in sh.
    assert sites_added(plan) == ["sh-edge2"]
    assert any("sh-edge lost" in n for n in plan.notes)


def test_replica_on_unhealthy_site_is_removed_and_replaced() -> None:
    sites = [c if c.id != "hz-edge" else site("hz-edge", "hz", healthy=False) for c in HZ_SITES]
    plan = plan_replicas(spec(), sites, FakeRtt(HZ), {"hz-edge": "ready", "sh-edge": "ready"})
    assert plan.remove == ["hz-edge"]
    assert sites_added(plan) == ["nj-reg"]
    assert plan.coverage == {"hz": ["sh", "nj"]}


def test_draining_replica_stays_until_replacement_is_ready() -> None:
    sites = [c if c.id != "hz-edge" else site("hz-edge", "hz", draining=True) for c in HZ_SITES]
    plan = plan_replicas(spec(), sites, FakeRtt(HZ), {"hz-edge": "ready", "sh-edge": "ready"})
    assert sites_added(plan) == ["nj-reg"]
    assert plan.keep == ["sh-edge", "hz-edge"]
    assert plan.remove == []
    assert plan.coverage == {"hz": ["sh", "nj"]}
    # Next round: the replacement is still loading -> keep; once ready -> remove the draining one.
    again = plan_replicas(spec(), sites, FakeRtt(HZ), {"hz-edge": "ready", "sh-edge": "ready", "nj-reg": "loading"})
    assert again.add == [] and "hz-edge" in again.keep
    done = plan_replicas(spec(), sites, FakeRtt(HZ), {"hz-edge": "ready", "sh-edge": "ready", "nj-reg": "ready"})
    assert done.add == [] and done.remove == ["hz-edge"]


def test_replica_floor_adds_nearest_to_most_origins() -> None:
    plan = plan_replicas(spec(min_cities=1, replicas=3), HZ_SITES, FakeRtt(HZ), {})
    assert sites_added(plan) == ["hz-edge", "sh-edge", "sh-edge2"]
    plan = plan_replicas(spec(min_cities=1, replicas=9), HZ_SITES, FakeRtt(HZ), {})
    assert len(plan.add) == 4  # far-edge is beyond budget, bj-hub is a hub
    assert any("replica floor 9 not reached: 4 placed" in n for n in plan.notes)


# --------------------------------------------------------------------------- state


def test_state_pending_ready_degraded() -> None:
    s = spec()
    rtt = FakeRtt(HZ)
    targets = plan_replicas(s, HZ_SITES, rtt, {}).targets
    assert replicas.deployment_state(s, {}, targets, rtt) == ("pending", ["origin hz: 0 of 2 cities ready"])
    # One ready, the other still loading: still pending.
    state, details = replicas.deployment_state(s, {"hz-edge": "hz"}, targets, rtt, in_progress=True)
    assert (state, details) == ("pending", ["origin hz: 1 of 2 cities ready (hz)"])
    state, _ = replicas.deployment_state(s, {"hz-edge": "hz", "sh-edge": "sh"}, targets, rtt, previous="pending")
    assert state == "ready"
    # It was ready and lost a city: degraded until the replacement is ready.
    state, details = replicas.deployment_state(s, {"sh-edge": "sh"}, targets, rtt, previous="ready", in_progress=True)
    assert (state, details) == ("degraded", ["origin hz: 1 of 2 cities ready (sh)"])
    # The rollout ended short of what the layout allows: degraded, not pending forever.
    assert replicas.deployment_state(s, {"hz-edge": "hz"}, targets, rtt, previous="pending")[0] == "degraded"
    # A ready replica beyond budget does not count.
    assert replicas.deployment_state(s, {"hz-edge": "hz", "far-edge": "far"}, targets, rtt, previous="ready")[0] == "degraded"


def test_state_is_ready_when_the_layout_allows_one_city() -> None:
    rtt = FakeRtt({"lhasa": {"lhasa-edge": 1.0, "chengdu-edge": 23.4}})
    cands = [site("lhasa-edge", "lhasa"), site("chengdu-edge", "chengdu")]
    s = spec(origins=["lhasa"], budget_ms=5)
    plan = plan_replicas(s, cands, rtt, {})
    assert replicas.deployment_state(s, {"lhasa-edge": "lhasa"}, plan, rtt)[0] == "ready"


def test_state_with_no_coverable_origin_is_degraded() -> None:
    rtt = FakeRtt({"o": {"hub": 1.0}})
    s = spec(origins=["o"])
    plan = plan_replicas(s, [site("hub", "c", tier="hub")], rtt, {})
    assert replicas.deployment_state(s, {}, plan, rtt)[0] == "degraded"


# --------------------------------------------------------------------------- the spec body


@pytest.mark.parametrize(
    ("body", "field", "status"),
    [
        (b'{"model": "m", "origins": ["hz"], "gpus": 2}', "gpus", 422),
        (b'{"model": "m", "origins": ["hz", "Bad Id"]}', "origins[1]", 400),
        (b'{"model": "m", "origins": ["hz"], "cards_per_replica": 0}', "cards_per_replica", 400),
        (b'{"model": "m", "origins": ["hz"], "min_cities": 0}', "min_cities", 400),
        (b'{"model": "m"}', "origins", 400),
        (b'{"origins": ["hz"]}', "model", 400),
        (b'{"model": "m", "origins": ["hz"], "accelerators": []}', "accelerators", 400),
    ],
)
def test_spec_errors_name_the_field(body: bytes, field: str, status: int) -> None:
    with pytest.raises(RequestError) as info:
        replicas.decode_spec(body)
    assert (info.value.field, info.value.status) == (field, status)
    assert info.value.message.startswith(field)


def test_spec_decodes_with_defaults_and_fractions() -> None:
    s = replicas.decode_spec(b'{"model": "Qwen/Qwen2.5-7B", "regions": ["zhejiang"], "cards_per_replica": 0.25}')
    assert (s.min_cities, s.budget_ms, s.cards_per_replica, s.replicas, s.accelerators) == (2, 10.0, 0.25, None, None)


# --------------------------------------------------------------------------- properties

CITIES = ["c0", "c1", "c2", "c3", "c4"]
STATES = ["placed", "loading", "ready", "lost", "removed"]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[DeploymentSpec, list[Candidate], FakeRtt, dict[str, str]]:
    n_sites = draw(st.integers(1, 12))
    n_origins = draw(st.integers(1, 4))
    quarter = st.integers(0, 12).map(lambda q: q * 0.25)
    cands = []
    for i in range(n_sites):
        free = {"A": draw(quarter)}
        if draw(st.booleans()):
            free["B"] = draw(quarter)
        cands.append(Candidate(
            id=f"s{i}", city=draw(st.sampled_from(CITIES)), tier=draw(st.sampled_from(["edge", "regional", "hub"])),
            healthy=draw(st.booleans().map(lambda b: b or draw(st.booleans()))), draining=draw(st.integers(0, 5)) == 0,
            free_cards=free,
        ))
    table = {
        f"o{j}": {c.id: draw(st.floats(0.1, 20.0)) for c in cands if draw(st.integers(0, 3)) > 0}
        for j in range(n_origins)
    }
    existing = {c.id: draw(st.sampled_from(STATES)) for c in cands if draw(st.integers(0, 3)) == 0}
    s = DeploymentSpec(
        model="m", origins=list(table), budget_ms=draw(st.sampled_from([2.0, 5.0, 10.0])),
        cards_per_replica=draw(st.sampled_from([0.25, 0.5, 1.0, 1.5])), min_cities=draw(st.integers(1, 3)),
        replicas=draw(st.none() | st.integers(1, 6)),
        accelerators=draw(st.sampled_from([None, ["A"], ["B", "A"]])),
    )
    return s, cands, FakeRtt(table), existing


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_plan_properties(case: tuple[DeploymentSpec, list[Candidate], FakeRtt, dict[str, str]]) -> None:
    s, cands, rtt, existing = case
    plan = plan_replicas(s, cands, rtt, existing)
    by_id = {c.id: c for c in cands}
    holding = {site for site, st_ in existing.items() if st_ != "removed"}

    # No site twice: adds are distinct and never where this deployment already has a replica.
    added = [p.site for p in plan.add]
    assert len(added) == len(set(added))
    assert not set(added) & holding
    assert set(plan.keep) | set(plan.remove) == holding
    assert not set(plan.keep) & set(plan.remove)

    # Never over-commit: each add fits the site's free cards of an accepted type, on a usable site.
    for p in plan.add:
        c = by_id[p.site]
        assert c.tier in ("edge", "regional") and c.healthy and not c.draining
        assert s.accelerators is None or p.accelerator in s.accelerators
        assert p.cards == s.cards_per_replica <= c.free_cards[p.accelerator] + 1e-9
    for c in replicas.apply_debits(cands, plan):
        assert all(v >= 0 for v in c.free_cards.values())

    # Coverage claims are true: each listed city holds a serving replica within budget.
    serving = set(added) | {x for x in plan.keep if not by_id[x].draining}
    for origin, cities in plan.coverage.items():
        in_reach = {site for site, _ in rtt.nearest(origin, s.budget_ms)}
        for city in cities:
            assert any(by_id[x].city == city for x in serving & in_reach)
        assert len(cities) == len(set(cities))
    uncovered = {o for o, _ in plan.uncovered}
    for origin, cities in plan.coverage.items():
        assert (len(cities) < s.min_cities) == (origin in uncovered)

    # Nothing left undone: no usable site could still add a city an origin lacks.
    for origin, cities in plan.coverage.items():
        if len(cities) >= plan.targets[origin]:
            continue
        for x, _ in rtt.nearest(origin, s.budget_ms):
            c = by_id[x]
            if c.city in cities or x in holding or x in added or c.tier == "hub" or not c.healthy or c.draining:
                continue
            accepted = s.accelerators if s.accelerators is not None else list(c.free_cards)
            assert all(c.free_cards.get(a, 0.0) + 1e-9 < s.cards_per_replica for a in accepted)


def test_a_card_quota_caps_new_replicas_and_says_so() -> None:
    assert len(plan_replicas(spec(), HZ_SITES, FakeRtt(HZ), {}).add) == 2
    one = plan_replicas(spec(), HZ_SITES, FakeRtt(HZ), {}, max_new=1, quota_note="quota: acme holds 3 of 4 cards")
    assert sites_added(one) == ["hz-edge"] and "quota: acme holds 3 of 4 cards" in one.notes
    [why] = one.uncovered
    assert why.origin == "hz" and "1 of 2 cities" in why.reason and "acme holds 3 of 4" in why.reason
    none = plan_replicas(spec(), HZ_SITES, FakeRtt(HZ), {}, max_new=0)
    assert none.add == [] and none.uncovered and any("quota" in n for n in none.notes)
    # A floor of replicas is capped too.
    floor = plan_replicas(spec(replicas=4), HZ_SITES, FakeRtt(HZ), {}, max_new=3)
    assert len(floor.add) == 3
