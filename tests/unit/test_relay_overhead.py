"""cpn's own measured overhead, stated next to the RTT (issue: the latency cpn reports is the latency
a user gets). Pure: the estimator."""

from __future__ import annotations

import pytest

from controlplane.core import router
from controlplane.core.overhead import RelayOverhead
from topology import ingress, latency, loader


def test_the_estimate_is_the_median_of_the_sites_recent_samples_else_of_all() -> None:
    est = RelayOverhead(window=4)
    assert est.ms("a") == 0.0  # nothing measured, nothing promised
    for ms in (1.0, 9.0, 2.0):
        est.observe("a", ms)
    assert est.ms("a") == 2.0  # the median: one slow answer does not move it
    for ms in (3.0, 3.0, 3.0):
        est.observe("a", ms)  # the window keeps the last 4: 2, 3, 3, 3
    assert est.ms("a") == 3.0
    est.observe("b", -5.0)  # a network faster than the layout's counts as 0, never as a credit
    assert est.ms("b") == 0.0
    assert est.ms("never-seen") == pytest.approx(3.0)  # all sites' recent samples: 0, 1, 2, 3, 3, 3, 9
    with pytest.raises(ValueError, match="window: 0"):
        RelayOverhead(window=0)


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
