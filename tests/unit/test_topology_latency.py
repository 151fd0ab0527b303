"""RttIndex on the demo and hand-made layouts: ordering, budgets, symmetry, floors, recompute."""

from __future__ import annotations

import math

import pytest

from topology import latency, layout, loader


@pytest.fixture(scope="module")
def demo() -> layout.Layout:
    return loader.load(loader.data_path("demo-3"))


def test_demo_ranks_own_city_first_with_metro_rtt(demo: layout.Layout) -> None:
    idx = latency.RttIndex.build(demo)
    for origin, own in (("shanghai", "sh-edge"), ("hangzhou", "hz-edge"), ("nanjing", "nj-edge")):
        ranked = idx.ranked(origin)
        assert ranked[0][0] == own
        # 30 km metro fibre x 4.9 us/km + one 0.1 ms hop, both ways
        assert ranked[0][1] == pytest.approx(2 * (30 * 0.0049 + 0.1))
        rtts = [r for _, r in ranked]
        assert rtts == sorted(rtts)
        assert {s for s, _ in ranked} == set(idx.sites)


def test_nearest_filters_by_budget_and_accept(demo: layout.Layout) -> None:
    idx = latency.RttIndex.build(demo)
    ranked = idx.ranked("shanghai")
    budget = ranked[2][1]  # exactly the third site's RTT: included
    assert idx.nearest("shanghai", budget) == ranked[:3]
    assert idx.nearest("shanghai", budget - 1e-6) == ranked[:2]
    assert idx.nearest("shanghai", budget, accept=lambda s: s != "sh-edge") == ranked[1:3]
    assert idx.nearest("shanghai", 100, limit=1) == ranked[:1]
    assert idx.nearest("shanghai", 0.1) == []
    with pytest.raises(KeyError):
        idx.nearest("nowhere", 10)


def test_site_down_removes_it_and_what_hangs_off_it(demo: layout.Layout) -> None:
    idx = latency.RttIndex.build(demo)
    before = idx.ranked("hangzhou")
    idx.set_site_up("sh-hub", False)
    assert [s for s, _ in idx.ranked("hangzhou")] == ["hz-edge"]  # hz-edge hangs off sh-hub
    assert math.isinf(idx.rtt_ms("hangzhou", "sh-edge"))
    idx.set_site_up("sh-hub", True)
    assert idx.ranked("hangzhou") == before


def test_link_down_cuts_its_edge_pool_and_comes_back(demo: layout.Layout) -> None:
    idx = latency.RttIndex.build(demo)
    before = {o: idx.ranked(o) for o in idx.origins}
    idx.set_link_up("nj-edge", "sh-hub", False)
    assert [s for s, _ in idx.ranked("nanjing")] == ["nj-edge"]
    assert "nj-edge" not in dict(idx.ranked("shanghai"))
    idx.set_link_up("sh-hub", "nj-edge", True)
    assert {o: idx.ranked(o) for o in idx.origins} == before
    with pytest.raises(KeyError):
        idx.set_link_up("nj-edge", "hz-edge", False)
