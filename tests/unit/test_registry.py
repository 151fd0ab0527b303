from __future__ import annotations

from controlplane.core.registry import SiteRegistry, StaticSite
from edge_agent import wire


def reg(site: str = "a", **kw: object) -> wire.Register:
    return wire.Register(site=site, tier="edge", city="c", accelerators={"H20": 8}, **kw)  # type: ignore[arg-type]


def hb(site: str = "a", seq: int = 1, **kw: object) -> wire.Heartbeat:
    return wire.Heartbeat(site=site, seq=seq, **kw)  # type: ignore[arg-type]


def test_site_is_lost_after_missing_three_heartbeats_and_back_when_heard() -> None:
    r = SiteRegistry(heartbeat_s=1.0, miss_limit=3)
    r.register(reg(), now=100.0)
    assert r.sweep(102.9) == []
    lost = r.sweep(103.1)
    assert [(t.site, t.new) for t in lost] == [("a", "lost")]
    assert r.get("a").state == "lost" and not r.get("a").routable  # type: ignore[union-attr]
    view, back = r.heartbeat(hb(), now=104.0)
    assert back and view is not None and view.state == "up"


def test_heartbeat_from_unknown_site_is_reported_not_applied() -> None:
    r = SiteRegistry()
    view, back = r.heartbeat(hb("ghost"), now=1.0)
    assert view is None and not back and r.unknown_heartbeats == 1 and len(r) == 0


def test_known_site_from_store_counts_after_hub_restart_but_is_not_registered() -> None:
    r = SiteRegistry()
    r.remember([StaticSite(id="a", tier="hub", city="bj", accelerators={"A800": 16})])
    view, _ = r.heartbeat(hb("a", free_cards={"A800": 16.0}), now=5.0)
    assert view is not None and view.tier == "hub" and view.state == "up" and not view.registered


def test_no_site_is_lost_while_the_hub_is_cut_off_and_each_gets_a_full_period_after() -> None:
    r = SiteRegistry(heartbeat_s=1.0, miss_limit=3)
    r.register(reg("a"), now=0.0)
    r.register(reg("b"), now=0.0)
    r.bus_down(now=1.0)
    assert r.sweep(50.0) == []
    r.bus_up(now=60.0)
    assert r.sweep(62.9) == []
    assert {t.site for t in r.sweep(63.1)} == {"a", "b"}


def test_version_moves_when_replicas_change_not_on_plain_heartbeats() -> None:
    r = SiteRegistry()
    r.register(reg(), now=0.0)
    v0 = r.version
    r.heartbeat(hb(), now=0.5)
    assert r.version == v0
    r.heartbeat(hb(models=[wire.ReplicaStatus(model="m", state="loading")]), now=1.0)
    v1 = r.version
    assert v1 > v0
    r.heartbeat(hb(models=[wire.ReplicaStatus(model="m", state="ready")]), now=1.5)
    assert r.version > v1


def test_repr_has_counts() -> None:
    r = SiteRegistry()
    r.register(reg("a"), now=0.0)
    assert "up=1" in repr(r) and "lost=0" in repr(r)


def test_a_silent_site_is_routable_again_once_heard_from() -> None:
    r = SiteRegistry(heartbeat_s=1.0, miss_limit=3)
    view, _ = r.register(reg(infer_acks=True), now=0.0)
    assert view.infer_acks and view.routable
    view.silent = True  # the gateway saw it leave a request unacknowledged
    assert not view.routable and view.state == "up" and view.as_dict(0.5)["silent"] is True
    r.heartbeat(hb(seq=2), now=1.0)
    assert view.routable
    view.silent = True
    r.register(reg(infer_acks=True), now=2.0)  # e.g. reconnected after the partition
    assert view.routable
