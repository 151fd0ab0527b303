"""Admission by predicted time to first token, as the inference service does it (issue #15 item 2).

A real site registry fed heartbeats, the real router over a hand-made RTT table, the service's
``admit``: a near site with a long queue loses to a farther idle one when the prediction says so,
wins when its queue is short, and a request none can serve in time is refused at once (429 with a
Retry-After). A request without an SLO never touches the predictor; every routed request is counted
as demand for the autoscaler.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from controlplane.core.errors import SloUnmeetable
from controlplane.core.registry import SiteRegistry
from controlplane.core.router import Router
from controlplane.metrics import HubMetrics
from controlplane.services.inference import InferenceService, prompt_tokens
from edge_agent import wire
from tests.support.manualclock import ManualClock


class Table:
    """A hand-made RTT table (pure data) standing in for topology.latency.RttIndex."""

    def ranked(self, origin: str) -> list[tuple[str, float]]:
        return [("near", 0.5), ("far", 8.0)]


def service(near: dict[str, Any], far: dict[str, Any]) -> tuple[InferenceService, HubMetrics]:
    reg = SiteRegistry(miss_limit=3, heartbeat_s=1.0)
    for site, fig in (("near", near), ("far", far)):
        reg.register(wire.Register(site=site, city=site, accelerators={"A800": 8}), 0.0,
                     local_model_tenants=frozenset({"*"}))
        reg.heartbeat(wire.Heartbeat(
            site=site, seq=1, queue_depth=fig.get("queue", 0), service_ms_p50=fig.get("service_ms", 200.0),
            models=[wire.ReplicaStatus(model="m", slots=4, busy=fig.get("busy", 0))]), 0.0)
    metrics = HubMetrics()
    svc = InferenceService(registry=reg, router=Router(Table()), origin_ids=frozenset({"o"}),
                           known_models=lambda: frozenset({"m"}), bus=None, accounting=None,  # type: ignore[arg-type]
                           metrics=metrics, clock=ManualClock(), rng=random.Random(1), site_timeout_s=3.0,
                           site_ack_timeout_s=1.0)
    return svc, metrics


def req(prompt: str = "hello " * 40) -> wire.InferRequest:
    return wire.InferRequest(request_id="r1", model="m", prompt=prompt, tenant="acme")


def test_a_near_site_with_a_long_queue_loses_to_a_farther_idle_one() -> None:
    svc, metrics = service(near={"busy": 4, "queue": 12}, far={})
    route, pred = svc.admit(req(), "o", 10.0, 400.0)
    assert route.site == "far" and route.reason == "slo"
    assert pred.site == "far" and pred.queue_ms == 0.0 and pred.rtt_ms == 8.0
    assert route.fallbacks == []  # near: (12 + 4 - 4 + 1) / 4 x 200 ms = 650 ms of queue, over the SLO
    assert metrics.slo_admission.counts == {("m", "admitted"): 1}
    # A free slot but a long queue: still behind 12 requests (ahead = 12 + 3 - 4 + 1 = 12).
    svc, _ = service(near={"busy": 3, "queue": 12}, far={})
    route, _ = svc.admit(req(), "o", 10.0, 400.0)
    assert route.site == "far"


def test_a_short_queue_keeps_the_near_site() -> None:
    svc, _ = service(near={"busy": 3, "queue": 0}, far={})
    route, pred = svc.admit(req(), "o", 10.0, 400.0)
    assert route.site == "near" and pred.queue_ms == 0.0
    assert route.fallbacks == [("far", 8.0)]


def test_every_site_saturated_is_refused_at_once_with_retry_after() -> None:
    svc, metrics = service(near={"busy": 4, "queue": 20, "service_ms": 900.0},
                           far={"busy": 4, "queue": 20, "service_ms": 900.0})
    with pytest.raises(SloUnmeetable) as err:
        svc.admit(req(), "o", 10.0, 300.0)
    assert err.value.status == 429 and err.value.retry_after_s >= 1
    assert "exceeds the SLO of 300 ms" in err.value.message
    assert metrics.slo_admission.counts == {("m", "refused"): 1}


def test_a_full_site_whose_service_time_is_unknown_never_meets_an_slo() -> None:
    svc, _ = service(near={"busy": 4, "service_ms": 0.0}, far={"busy": 4, "service_ms": 0.0})
    with pytest.raises(SloUnmeetable) as err:
        svc.admit(req(), "o", 10.0, 5000.0)
    assert err.value.retry_after_s == 1.0


def test_no_slo_no_predictor_and_demand_is_counted() -> None:
    svc, metrics = service(near={}, far={})
    for _ in range(3):
        svc.decide("o", "m", 10.0, "strict", tenant="acme")
    svc.admit(req(), "o", 10.0, 400.0)
    assert metrics.slo_admission.counts == {("m", "admitted"): 1}
    assert svc.drain_demand() == {("acme", "m", "o", 10.0): 4}
    assert svc.drain_demand() == {}
    assert prompt_tokens(req("x" * 400)) == 100


def test_only_long_streamed_prompts_calibrate_the_profile() -> None:
    from controlplane.services.inference import Served

    svc, metrics = service(near={}, far={})
    route, pred = svc.admit(req("x" * 40), "o", 10.0, 400.0)
    served = Served(route.site, route.rtt_ms, route.reason, predicted=pred)
    svc._predicted(served, req("x" * 40), 0.060, True)  # 10 tokens: overhead, not a prefill rate
    assert svc.profiles == {}
    long = req("x" * 4000)  # 1000 tokens in 100 ms of prefill work (+15 ms base): 10000 tokens/s
    svc._predicted(Served(route.site, route.rtt_ms, route.reason, predicted=pred), long,
                   (pred.rtt_ms + pred.queue_ms + 115.0) / 1000.0, True)
    assert svc.profiles["m"]["A800"].prefill_tokens_per_s == pytest.approx(5000 + 0.1 * (10000 - 5000))
    assert set(svc.profiles) == {"m"}  # per model: another model's prefill on the card is its own
    assert sum(n for k, v in metrics.ttft_error.by_route.items() for n in v[:-1]) == 2


def test_undrained_demand_counts_stay_bounded() -> None:
    from controlplane.services import inference

    svc, _ = service(near={}, far={})
    for i in range(inference.DEMAND_KEYS_MAX + 5):
        svc.decide("o", "m", 2.0 + i / 1e6, "strict", tenant="acme")  # budgets varied on purpose
    assert len(svc.demand) == 5 and svc.demand_overflows == 1


def test_the_models_own_service_time_from_answers_sizes_the_queue_not_the_sites_mixed_p50() -> None:
    # Both full, one place behind 4 slots. The heartbeats' p50 over all models says 200 ms a request
    # (a quarter: 50 ms of queue at either); the near site's answers for this model took 4 s each.
    svc, _ = service(near={"busy": 4}, far={"busy": 4})
    route, pred = svc.admit(req(), "o", 10.0, 400.0)
    assert route.site == "near" and pred.queue_ms == pytest.approx(50.0)
    for _ in range(3):
        svc._service_time("near", "m", 4000.0)
    svc._service_time("near", "other-model", 10.0)  # another model's answers change nothing for m
    route, pred = svc.admit(req(), "o", 10.0, 400.0)
    assert route.site == "far" and pred.queue_ms == pytest.approx(50.0)  # near: 1/4 x 4,000 = 1,000 ms
    svc._service_time("near", "m", float("nan"))  # a lying report changes nothing
    assert svc.service_ms[("near", "m")] == pytest.approx(4000.0)


def test_the_replicas_own_card_picks_the_prefill_profile_and_old_agents_fall_back() -> None:
    from controlplane.core import ttft

    reg = SiteRegistry(miss_limit=3, heartbeat_s=1.0)
    reg.register(wire.Register(site="s", city="s", accelerators={"A800": 4, "L20": 4}), 0.0,
                 local_model_tenants=frozenset({"*"}))
    # An agent that says its replica runs on the L20 cards: the L20 profile (and calibration) applies.
    reg.heartbeat(wire.Heartbeat(site="s", seq=1, models=[wire.ReplicaStatus(model="m", slots=4, accelerator="L20")]),
                  0.0)
    view = reg.get("s")
    assert view is not None and ttft.accelerator_of(view, "m") == "L20"
    cand = ttft.candidate(view, "m", 1.0)
    assert cand is not None and cand.accelerator == "L20"
    slow = {"L20": ttft.Profile(accelerator="L20", prefill_tokens_per_s=1000.0)}
    assert ttft.predict(cand, 1000, slow["L20"]).prefill_ms == pytest.approx(15.0 + 1000.0)
    # An agent from before the field sends no accelerator: the old heartbeat decodes, the site's first type stands in.
    old = b'{"type":"hb","site":"s","seq":2,"models":[{"model":"m","slots":4}]}'
    hb = wire.agent_message_decoder.decode(old)
    assert isinstance(hb, wire.Heartbeat)
    reg.heartbeat(hb, 1.0)
    assert ttft.accelerator_of(reg.get("s"), "m") == "A800"  # type: ignore[arg-type]
    # A site claiming a card it does not hold (to be predicted faster) is not believed.
    reg.heartbeat(wire.Heartbeat(site="s", seq=3, models=[wire.ReplicaStatus(model="m", slots=4, accelerator="H800")]),
                  2.0)
    lying = reg.get("s")
    assert lying is not None and ttft.accelerator_of(lying, "m") == "A800"
    assert (ttft.candidate(lying, "m", 1.0) or pytest.fail("no candidate")).accelerator == "A800"
    # ... and a hub from before the field ignores it (ReplicaStatus does not forbid unknown fields).
    assert wire.ReplicaStatus.__struct_config__.forbid_unknown_fields is False
