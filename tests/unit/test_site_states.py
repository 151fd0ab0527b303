"""Site states move by the registry's transition table (controlplane/core/registry.py Rule 5)."""

from __future__ import annotations

from controlplane.core.registry import SITE_TRANSITIONS, SiteEvent, SiteRegistry, SiteState, site_transition
from edge_agent import wire


def test_the_site_table() -> None:
    assert site_transition(SiteState.UP, SiteEvent.SILENT) is SiteState.LOST
    assert site_transition("lost", SiteEvent.HEARD) is SiteState.UP
    assert site_transition(SiteState.LOST, SiteEvent.SILENT) is None      # already lost: no edge
    assert site_transition(SiteState.LOST, SiteEvent.MARK_LOST) is None
    assert site_transition("gone", SiteEvent.HEARD) is None               # not a state at all
    assert all(SITE_TRANSITIONS[s][SiteEvent.REGISTER] is SiteState.UP for s in SiteState)


def test_a_refused_site_transition_is_counted_and_not_applied() -> None:
    r = SiteRegistry(heartbeat_s=1.0, miss_limit=3)
    view, _ = r.register(wire.Register(site="a", tier="edge", city="c", accelerators={"H20": 8}), now=100.0)
    view.state = "retired"  # type: ignore[assignment]  # a state no table holds (a bug elsewhere)
    assert r.sweep(200.0) == [] and r.mark_lost("a", 200.0) is None
    assert view.state == "retired" and r.illegal_transitions == 1
    view.state = SiteState.UP
    assert [t.new for t in r.sweep(200.0)] == ["lost"] and view.state is SiteState.LOST
    assert r.illegal_transitions == 1
