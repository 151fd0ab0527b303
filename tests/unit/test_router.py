from __future__ import annotations

import random
from collections import Counter

import pytest

from controlplane.core.registry import SiteView
from controlplane.core.router import NoRoute, Route, Router, RouteRequest
from edge_agent import wire


class Table:
    """A hand-made RTT table (pure data) standing in for topology.latency.RttIndex."""

    def __init__(self, rows: dict[str, list[tuple[str, float]]]) -> None:
        self.rows = rows

    def ranked(self, origin: str) -> list[tuple[str, float]]:
        return self.rows[origin]


def site(sid: str, *, model: str = "m", slots: int = 4, busy: int = 0, state: str = "ready", **kw: object) -> SiteView:
    v = SiteView(id=sid, **kw)  # type: ignore[arg-type]
    v.replicas = {model: wire.ReplicaStatus(model=model, state=state, slots=slots, busy=busy)}  # type: ignore[arg-type]
    return v


ROWS = {"o": [("near", 1.0), ("mid", 3.0), ("far", 8.0), ("vfar", 20.0)]}


def sites(**over: SiteView) -> dict[str, SiteView]:
    base = {s: site(s) for s, _ in ROWS["o"]}
    base.update(over)
    return base


def test_idle_network_goes_to_the_nearest_site() -> None:
    r = Router(Table(ROWS))
    rng = random.Random(1)
    picks = {r.route(RouteRequest("o", "m", 10), sites(), 0, rng).site for _ in range(200)}  # type: ignore[union-attr]
    assert picks == {"near"}


def test_budget_excludes_far_sites_and_strict_says_why() -> None:
    r = Router(Table(ROWS))
    s = sites(near=site("near", state="loading"), mid=site("mid", state="loading"))
    d = r.route(RouteRequest("o", "m", 5), s, 0, random.Random(0))
    assert isinstance(d, NoRoute) and "busy, lost, draining or silent" in d.reason
    d = r.route(RouteRequest("o", "m", 0.5), sites(), 0, random.Random(0))
    assert isinstance(d, NoRoute) and "nearest is near at 1.0 ms" in d.reason


def test_nearest_policy_goes_over_budget_and_says_so() -> None:
    r = Router(Table(ROWS))
    d = r.route(RouteRequest("o", "m", 0.5, "nearest"), sites(), 0, random.Random(0))
    assert isinstance(d, Route) and d.site == "near" and d.reason == "over-budget"


def test_lost_draining_and_full_sites_are_skipped_and_fallbacks_are_in_rtt_order() -> None:
    r = Router(Table(ROWS))
    lost = site("near")
    lost.state = "lost"
    d = r.route(RouteRequest("o", "m", 10), sites(near=lost), 0, random.Random(0))
    assert isinstance(d, Route) and d.site == "mid" and [s for s, _ in d.fallbacks] == ["far"]
    drain = site("mid")
    drain.draining = True
    d = r.route(RouteRequest("o", "m", 10), sites(near=lost, mid=drain), 1, random.Random(0))
    assert isinstance(d, Route) and d.site == "far"
    d = r.route(RouteRequest("o", "m", 10), sites(near=site("near", busy=4)), 2, random.Random(0))
    assert isinstance(d, Route) and d.site != "near"
    silent = site("near")
    silent.silent = True  # did not acknowledge a request: passed over until heard again, no version bump
    d = r.route(RouteRequest("o", "m", 10), sites(near=silent), 2, random.Random(0))
    assert isinstance(d, Route) and d.site == "mid" and "near" not in [s for s, _ in d.fallbacks]
    silent.silent = False
    d = r.route(RouteRequest("o", "m", 10), sites(near=silent), 2, random.Random(0))
    assert isinstance(d, Route) and d.site == "near"


def test_load_spreads_when_the_nearest_is_busy_no_herding() -> None:
    r = Router(Table(ROWS))
    s = sites(near=site("near", busy=3))
    counts = Counter(r.route(RouteRequest("o", "m", 10), s, 0, random.Random(i)).site for i in range(300))  # type: ignore[union-attr]
    assert counts["near"] < 150 and counts["mid"] > 50 and counts["far"] > 20
    reasons = {r.route(RouteRequest("o", "m", 10), s, 0, random.Random(i)).reason for i in range(50)}  # type: ignore[union-attr]
    assert "load" in reasons


def test_same_seed_same_decisions() -> None:
    s = sites(near=site("near", busy=2), mid=site("mid", busy=1))
    a = [Router(Table(ROWS)).route(RouteRequest("o", "m", 10), s, 0, rng).site for rng in [random.Random(7)] for _ in range(50)]  # type: ignore[union-attr]
    b = [Router(Table(ROWS)).route(RouteRequest("o", "m", 10), s, 0, rng).site for rng in [random.Random(7)] for _ in range(50)]  # type: ignore[union-attr]
    assert a == b


def test_unknown_model_is_no_route() -> None:
    d = Router(Table(ROWS)).route(RouteRequest("o", "other", 10), sites(), 0, random.Random(0))
    assert isinstance(d, NoRoute) and "no site serves" in d.reason


@pytest.mark.parametrize("version_changes", [True, False])
def test_cache_follows_registry_version(version_changes: bool) -> None:
    r = Router(Table(ROWS))
    s = sites()
    r.route(RouteRequest("o", "m", 10), s, 0, random.Random(0))
    del s["near"].replicas["m"]
    d = r.route(RouteRequest("o", "m", 10), s, 1 if version_changes else 0, random.Random(0))
    if version_changes:
        assert isinstance(d, Route) and d.site == "mid"
    else:  # stale cache still lists 'near', but a site without a ready replica is never chosen
        assert isinstance(d, Route) and d.site == "mid"


def test_only_the_allowed_deployments_serve_and_each_scope_is_cached_apart() -> None:
    def owned(sid: str, deployment: str) -> SiteView:
        v = site(sid)
        v.replicas = {"m": wire.ReplicaStatus(model="m", deployment=deployment, state="ready", slots=4)}
        return v

    s = sites(near=owned("near", "dep-b"), mid=owned("mid", "dep-a"), far=owned("far", "local"),
              vfar=owned("vfar", "dep-a"))
    r = Router(Table(ROWS))
    rng = random.Random(0)
    tenant_a = frozenset({"dep-a", "local"})
    got = r.route(RouteRequest("o", "m", 10, deployments=tenant_a), s, 0, rng)
    assert isinstance(got, Route) and got.site == "mid" and {f[0] for f in got.fallbacks} <= {"far"}
    # Tenant B's deployment sits nearest: never used for A, while B (and an admin, None) get it.
    assert r.route(RouteRequest("o", "m", 10, deployments=frozenset({"dep-b"})), s, 0, rng).site == "near"  # type: ignore[union-attr]
    assert r.route(RouteRequest("o", "m", 10), s, 0, rng).site == "near"  # type: ignore[union-attr]
    assert all(r.route(RouteRequest("o", "m", 10, deployments=tenant_a), s, 0, rng).site != "near"  # type: ignore[union-attr]
               for _ in range(50))
    nothing = r.route(RouteRequest("o", "m", 10, deployments=frozenset({"dep-c"})), s, 0, rng)
    assert isinstance(nothing, NoRoute) and "deployment this tenant may use" in nothing.reason
