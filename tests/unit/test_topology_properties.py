"""Properties of the latency model over random layouts (hypothesis + topology.synth)."""

from __future__ import annotations

import math

import networkx as nx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from topology import latency, layout, synth

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def small_layouts() -> st.SearchStrategy[layout.Layout]:
    return st.builds(
        synth.generate,
        n_sites=st.integers(min_value=1, max_value=60),
        n_origins=st.integers(min_value=1, max_value=12),
        seed=st.integers(min_value=0, max_value=2**32),
    )


def rtt_from_site_side(idx: latency.RttIndex, site: str, origin: str) -> float:
    """RTT computed the other way round, with networkx, from the site to the origin's access links."""
    lay = idx.layout
    o = lay.origin(origin)
    dist = nx.single_source_dijkstra_path_length(idx.graph, site, weight="ms")
    best = math.inf
    for pop in layout.attachments(lay)[origin]:
        if pop in dist:
            best = min(best, dist[pop] + layout.access_one_way_ms(o, lay.site(pop), lay))
    return 2 * best


@SETTINGS
@given(small_layouts())
def test_rtt_is_symmetric_and_never_below_the_light_floor(lay: layout.Layout) -> None:
    idx = latency.RttIndex.build(lay)
    for o in lay.origins:
        ranked = idx.ranked(o.id)
        assert len(ranked) == len(lay.sites)  # synth layouts are connected
        for site_id, rtt in ranked:
            s = lay.site(site_id)
            floor = layout.rtt_floor_ms(layout.great_circle_km(o.lat, o.lon, s.lat, s.lon))
            assert rtt >= floor - 1e-9
            assert rtt > 0
            assert rtt == pytest.approx(rtt_from_site_side(idx, site_id, o.id), rel=1e-12)


@SETTINGS
@given(small_layouts())
def test_triangle_inequality_and_ranking_order(lay: layout.Layout) -> None:
    idx = latency.RttIndex.build(lay)
    sites = [s.id for s in lay.sites][:15]
    for o in lay.origins:
        ranked = idx.ranked(o.id)
        assert ranked == sorted(ranked, key=lambda p: (p[1], p[0]))
        for a in sites:
            for b in sites:
                assert idx.rtt_ms(o.id, b) <= idx.rtt_ms(o.id, a) + idx.site_rtt_ms(a, b) + 1e-9
    for a in sites:
        for b in sites:
            assert idx.site_rtt_ms(a, b) == pytest.approx(idx.site_rtt_ms(b, a))
            assert idx.site_km(a, b) == pytest.approx(idx.site_km(b, a))
            s, t = lay.site(a), lay.site(b)
            assert idx.site_km(a, b) >= layout.great_circle_km(s.lat, s.lon, t.lat, t.lon) - 1e-6


@SETTINGS
@given(small_layouts(), st.floats(min_value=0.2, max_value=40))
def test_nearest_is_the_ranked_prefix_within_budget(lay: layout.Layout, budget_ms: float) -> None:
    idx = latency.RttIndex.build(lay)
    for o in lay.origins:
        within = [p for p in idx.ranked(o.id) if p[1] <= budget_ms]
        assert idx.nearest(o.id, budget_ms) == within
        odd = lambda s: int(s[1:]) % 2 == 1  # noqa: E731
        assert idx.nearest(o.id, budget_ms, accept=odd) == [p for p in within if odd(p[0])]


def snapshot(idx: latency.RttIndex) -> dict[str, dict[str, float]]:
    return {o: dict(idx.ranked(o)) for o in idx.origins}


@SETTINGS
@given(small_layouts(), st.data())
def test_incremental_updates_equal_a_full_recompute(lay: layout.Layout, data: st.DataObject) -> None:
    idx = latency.RttIndex.build(lay)
    initial = snapshot(idx)
    links = [(l.a, l.b) for l in lay.links]
    sites = [s.id for s in lay.sites]
    ops = []
    for _ in range(data.draw(st.integers(min_value=1, max_value=12))):
        if links and data.draw(st.booleans()):
            a, b = data.draw(st.sampled_from(links))
            up = data.draw(st.booleans())
            idx.set_link_up(a, b, up)
            ops.append(("link", a, b, up))
        else:
            s = data.draw(st.sampled_from(sites))
            up = data.draw(st.booleans())
            idx.set_site_up(s, up)
            ops.append(("site", s, up))
        incremental = snapshot(idx)
        for o in idx.origins:
            assert idx.ranked(o) == sorted(idx.ranked(o), key=lambda p: (p[1], p[0]))
        idx.recompute_all()
        full = snapshot(idx)
        assert incremental.keys() == full.keys()
        for o in full:
            assert incremental[o].keys() == full[o].keys(), ops
            for s, r in full[o].items():
                assert incremental[o][s] == pytest.approx(r, rel=1e-9), ops
    # everything back up: the original rankings return
    for a, b in links:
        idx.set_link_up(a, b, True)
    for s in sites:
        idx.set_site_up(s, True)
    back = snapshot(idx)
    for o in initial:
        assert back[o].keys() == initial[o].keys()
        for s, r in initial[o].items():
            assert back[o][s] == pytest.approx(r, rel=1e-9)


@SETTINGS
@given(small_layouts(), st.integers(min_value=0, max_value=10**6))
def test_add_site_matches_a_rebuild(lay: layout.Layout, salt: int) -> None:
    idx = latency.RttIndex.build(lay)
    o = lay.origins[salt % len(lay.origins)]
    tier = ("edge", "regional", "hub")[salt % 3]
    new = layout.Site(
        id="new-site", name="new", city=o.id, region=o.region, lat=o.lat + 0.05, lon=o.lon - 0.05,
        tier=tier, provider="p", accelerators={"H20": 8}, tariff=lay.sites[0].tariff, pue=1.3,
        failure_rate_per_card_hour=2e-5,
    )
    idx.add_site(new)
    idx.add_site(new)  # idempotent
    assert idx.rtt_ms(o.id, "new-site") < math.inf
    incremental = snapshot(idx)
    idx.recompute_all()
    full = snapshot(idx)
    for origin in full:
        assert incremental[origin].keys() == full[origin].keys()
        for s, r in full[origin].items():
            assert incremental[origin][s] == pytest.approx(r, rel=1e-9)


def test_synth_is_deterministic_and_sized() -> None:
    a = synth.generate(200, 20, seed=7)
    b = synth.generate(200, 20, seed=7)
    assert a == b
    assert synth.generate(200, 20, seed=8) != a
    assert len(a.sites) == 200 and len(a.origins) == 20
    tiers = [s.tier for s in a.sites]
    assert tiers.count("hub") == 1 and tiers.count("regional") == 6
    with pytest.raises(ValueError):
        synth.generate(0, 5)


def test_one_site_in_a_far_corner_still_attaches_every_origin() -> None:
    """Hypothesis found it: with one site, an origin in the far corner of the box was beyond the
    synthetic layout's access radius, so the generator made a layout its own loader refused."""
    lay = synth.generate(n_sites=1, n_origins=8, seed=396)
    assert all(layout.attachments(lay)[o.id] for o in lay.origins)
