"""cpn's own measured overhead, stated next to the RTT (issue: the latency cpn reports is the latency
a user gets). Pure: the estimator."""

from __future__ import annotations

import random

import pytest

from controlplane.core import router
from controlplane.core.overhead import RelayOverhead
from topology import ingress, latency, loader


def test_the_estimate_is_a_high_quantile_of_the_sites_recent_samples_else_of_all_else_the_floor() -> None:
    est = RelayOverhead(window=10, floor_ms=1.5)
    assert est.ms("a") == 1.5  # nothing measured: the declared floor, not 0 (nothing measured is not nothing spent)
    for ms in (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 9.0):
        est.observe("a", ms)
    assert est.ms("a") == 2.0  # the 90th percentile: what 9 in 10 relays stayed within, not the median's 1.0
    for ms in (3.0,) * 10:
        est.observe("a", ms)  # the window keeps the last 10
    assert est.ms("a") == 3.0
    est.observe("b", -5.0)  # a network faster than the layout's counts as 0, never as a credit
    assert est.ms("b") == 0.0
    assert est.ms("never-seen") == 3.0  # every site's recent samples
    with pytest.raises(ValueError, match="window: 0"):
        RelayOverhead(window=0)
    with pytest.raises(ValueError, match="floor_ms"):
        RelayOverhead(floor_ms=float("nan"))


def test_old_samples_are_forgotten_so_a_gateway_refusing_on_a_high_estimate_learns_it_can_serve_again() -> None:
    """The estimate is measured only on answers: without forgetting, a gateway whose estimate grew
    under load would refuse every strict request to that site and never measure it again."""
    est = RelayOverhead(window=8, floor_ms=1.0, horizon_s=10.0)
    for t in range(8):
        est.observe("slow", 12.0, now=float(t))
    est.observe("quick", 0.5, now=10.0)
    est.expire(9.0)
    assert est.ms("slow") == 12.0
    est.expire(15.0)  # "slow"'s samples at 0..4 s are gone, those at 5..7 s stay
    assert est.ms("slow") == 12.0
    est.expire(18.5)  # all of "slow"'s are older than 10 s: it takes every site's recent figure
    assert est.ms("slow") == 0.5
    est.expire(30.0)  # nothing recent anywhere: the floor, and requests flow to be measured again
    assert est.ms("slow") == 1.0 and est.ms("quick") == 1.0


def test_a_site_within_budget_by_rtt_but_not_with_cpns_own_time_is_no_candidate() -> None:
    """The budget is on what the user gets: RTT + the overhead the gateway measured (issue 14).
    Before, the RTT alone was checked: 8 ms fit 10 ms whatever cpn added."""
    from tests.unit.test_router import Table, site

    r = router.Router(Table({"o": [("near", 1.0), ("far", 8.0)]}))
    views = {"near": site("near"), "far": site("far")}
    views["near"].state = "lost"  # only the far site is up
    over = {"far": 2.5}.get
    d = r.route(router.RouteRequest("o", "m", 10), views, 0, random.Random(0), lambda s: over(s, 0.0))
    assert isinstance(d, router.NoRoute) and d.nearest == ("far", 8.0)
    assert "within 10 ms of o counting cpn's own time: nearest is far at 8.0 ms RTT + 2.5 ms of cpn's own time" in d.reason
    assert r.within_budget(router.RouteRequest("o", "m", 10), views, 0, overhead=lambda s: 2.5) == []
    # Nearest policy: served beyond the budget, and says so.
    d = r.route(router.RouteRequest("o", "m", 10, "nearest"), views, 0, random.Random(0), lambda s: 2.5)
    assert isinstance(d, router.Route) and d.site == "far" and d.reason == "over-budget"
    # Within it, with less of cpn's own time: served as before; and the RTT alone without an estimate.
    for overhead in (lambda s: 1.5, None):
        d = r.route(router.RouteRequest("o", "m", 10), views, 0, random.Random(0), overhead)
        assert isinstance(d, router.Route) and (d.site, d.rtt_ms, d.reason) == ("far", 8.0, "nearest")
    assert r.within_budget(router.RouteRequest("o", "m", 10), views, 0, overhead=lambda s: 1.5) == [("far", 8.0)]


def test_a_nearer_site_slow_in_cpns_own_time_is_passed_for_a_farther_one_that_keeps_the_promise() -> None:
    from tests.unit.test_router import Table, site

    r = router.Router(Table({"o": [("a", 3.0), ("b", 6.0), ("c", 12.0)]}), window=1)
    views = {s: site(s) for s in "abc"}
    over = {"a": 9.0, "b": 1.0, "c": 0.0}
    d = r.route(router.RouteRequest("o", "m", 10), views, 0, random.Random(0), over.__getitem__)
    assert isinstance(d, router.Route) and d.site == "b" and d.fallbacks == []
    d = r.route(router.RouteRequest("o", "m", 10, "nearest"), views, 0, random.Random(0), over.__getitem__)
    assert isinstance(d, router.Route) and d.site == "b" and d.reason == "nearest"


def test_the_network_share_of_a_route_is_the_leg_gateway_to_site() -> None:
    """What the gateway subtracts from its relay time as the network's: the RTT less the origin's leg
    to the gateway (a placed gateway), the whole RTT (an unplaced one: the model has none of its own)."""
    layout = loader.load_default()
    index = latency.RttIndex.build(layout)
    placed = router.for_gateway(layout, index, "beijing")
    rtt = dict(placed.rtt.ranked("guangzhou"))["bj-edge"]
    leg = ingress.city_rtt_ms(index, "guangzhou", "beijing")
    assert leg > 10 and placed.network_leg_ms("guangzhou", rtt) == pytest.approx(rtt - leg)
    assert placed.network_leg_ms("beijing", dict(placed.rtt.ranked("beijing"))["bj-edge"]) == pytest.approx(
        index.rtt_ms("beijing", "bj-edge"))
    assert router.for_gateway(layout, index, None).network_leg_ms("guangzhou", 7.5) == 7.5


def test_the_service_counts_a_whole_relayed_answer_less_service_time_and_the_network_leg_not_a_failover() -> None:
    from controlplane.services.inference import Served
    from edge_agent import wire
    from tests.unit.test_slo_admission import service

    svc, _ = service(near={}, far={})  # an unplaced gateway over a table: near at 0.5 ms, far at 8 ms
    answer = wire.InferResult(request_id="r", site="far", model="m", output="x", service_ms=20.0)
    svc.relayed(Served("far", 8.0, "nearest", tried=["far"], result=answer), "o", 30.0)
    assert svc.overhead.ms("far") == pytest.approx(2.0)  # 30 - 20 of service - 8 of network
    svc.relayed(Served("far", 8.0, "failover", tried=["near", "far"], result=answer), "o", 3000.0)
    svc.relayed(Served("far", 8.0, "nearest", tried=["far"]), "o", 3000.0)  # no answer (a stream)
    assert svc.overhead.ms("far") == pytest.approx(2.0) and svc.overhead.samples == 1


def test_a_site_is_believed_only_within_the_relay_and_its_declared_service_times() -> None:
    """A site claiming a long service time would make cpn's own time look small (0, clamped): such
    a claim is counted and dropped, not observed."""
    from controlplane.services.inference import Served
    from edge_agent import wire
    from tests.unit.test_slo_admission import service

    svc, metrics = service(near={}, far={})
    view = svc.registry.get("far")
    assert view is not None
    view.service_ms_p99 = 25.0  # what the site's heartbeats declare

    def answer(service_ms: float) -> Served:
        res = wire.InferResult(request_id="r", site="far", model="m", output="x", service_ms=service_ms)
        return Served("far", 8.0, "nearest", tried=["far"], result=res)

    svc.relayed(answer(90.0), "o", 100.0)  # within 4 x its declared 25 ms and within the relay: kept
    assert svc.overhead.samples == 1 and svc.overhead.ms("far") == pytest.approx(2.0)  # 100 - 90 - 8
    svc.relayed(answer(55.0), "o", 50.0)  # longer than the whole relay: impossible
    view.service_ms_p99 = 5.0
    svc.relayed(answer(30.0), "o", 60.0)  # 6x what it declares
    assert svc.overhead.samples == 1 and svc.overhead.dropped == 2
    assert metrics.overhead_dropped.counts == {("longer_than_relay",): 1, ("beyond_declared",): 1}
    svc.relayed(answer(-1.0), "o", 60.0)
    assert metrics.overhead_dropped.counts[("longer_than_relay",)] == 2


def test_a_streams_first_chunk_feeds_the_estimate_when_the_site_states_its_time_to_it() -> None:
    from controlplane.services.inference import Served
    from tests.unit.test_slo_admission import service

    svc, _ = service(near={}, far={})
    svc.relayed(Served("far", 8.0, "nearest", tried=["far"], first_site_ms=30.0), "o", 41.0)
    assert svc.overhead.samples == 1 and svc.overhead.ms("far") == pytest.approx(3.0)  # 41 - 30 - 8
    svc.relayed(Served("far", 8.0, "nearest", tried=["far"]), "o", 400.0)  # an older agent: not stated
    assert svc.overhead.samples == 1


def test_the_estimate_kept_sorted_as_samples_come_and_go_equals_the_quantile_of_the_recent_samples() -> None:
    """The estimator keeps each window sorted as it goes (no sort per request): after any mix of
    samples, window overflows and expiry its figure is exactly the nearest-rank quantile of the
    samples a plain list of the recent ones would hold, for every site and for all together."""
    from controlplane.core.overhead import QUANTILE, quantile

    rng = random.Random(7)
    est = RelayOverhead(window=5, floor_ms=1.25, horizon_s=3.0)
    kept: list[tuple[float, str, float]] = []  # the reference: every sample still recent, in order
    now = 0.0
    for _ in range(3000):
        now += rng.choice((0.0, 0.01, 0.3, 1.2))
        if rng.random() < 0.2:
            est.expire(now)
            if est._expired_at == now:  # it did the work (at most once a second)
                kept = [k for k in kept if k[0] >= now - 3.0]
        site = rng.choice("abc")
        ms = rng.choice((0.0, 0.5, 0.5, 1.0, 2.0, rng.uniform(0, 9)))
        est.observe(site, ms, now)
        kept.append((now, site, ms))
        per_site = {s: [m for _, x, m in kept if x == s][-5:] for s in "abcd"}
        every = [m for _, _, m in kept][-20:]
        for s in "abcd":
            want = quantile(per_site[s], QUANTILE) if per_site[s] else (
                quantile(every, QUANTILE) if every else 1.25)
            assert est.ms(s) == want, (s, per_site[s], every)
