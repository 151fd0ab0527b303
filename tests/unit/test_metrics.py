"""The hub's scrape-time metrics: plain counts on the hot path, standard Prometheus text when scraped."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from controlplane.metrics import HubMetrics


def samples(m: HubMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(m.render().decode())
        for s in family.samples
    }


def test_latency_histogram_is_cumulative_with_count_and_sum() -> None:
    m = HubMetrics()
    for seconds in (0.0004, 0.0005, 0.0007, 0.003, 99.0):  # 0.0005 lands in its own bucket (le)
        m.observe_http("/v1/infer", 200, seconds)
    m.observe_http("/healthz", 200, 0.002)
    got = samples(m)

    def bucket(route: str, le: str) -> float:
        return got[("cpn_http_request_seconds_bucket", (("le", le), ("route", route)))]

    assert bucket("/v1/infer", "0.0005") == 2
    assert bucket("/v1/infer", "0.001") == 3
    assert bucket("/v1/infer", "0.005") == 4
    assert bucket("/v1/infer", "30.0") == 4
    assert bucket("/v1/infer", "+Inf") == 5
    assert got[("cpn_http_request_seconds_count", (("route", "/v1/infer"),))] == 5
    assert abs(got[("cpn_http_request_seconds_sum", (("route", "/v1/infer"),))] - 99.0046) < 1e-9
    assert bucket("/healthz", "0.001") == 0 and bucket("/healthz", "0.0025") == 1


def test_request_counts_by_route_and_status() -> None:
    m = HubMetrics()
    m.observe_http("/v1/infer", 200, 0.001)
    m.observe_http("/v1/infer", 200, 0.001)
    m.observe_http("/v1/infer", 503, 0.001)
    got = samples(m)
    assert got[("cpn_http_requests_total", (("route", "/v1/infer"), ("status", "200")))] == 2
    assert got[("cpn_http_requests_total", (("route", "/v1/infer"), ("status", "503")))] == 1


def test_tenant_and_model_labels_are_bounded_and_fold_into_other() -> None:
    m = HubMetrics()
    m.tenants.limit = 2
    for tenant in ("a", "b", "c", "d", "a"):
        m.served(tenant, "llama", "sh-edge", prompt_tokens=3, completion_tokens=5, service_ms=40.0)
    got = samples(m)
    by_tenant = {dict(ls)["tenant"]: v for (n, ls), v in got.items() if n == "cpn_tenant_requests_total"}
    assert by_tenant == {"a": 2, "b": 1, "other": 2}
    assert got[("cpn_tokens_total", (("kind", "completion"), ("model", "llama"), ("tenant", "other")))] == 10
    assert got[("cpn_site_tokens_total", (("kind", "prompt"), ("site", "sh-edge")))] == 15
    assert got[("cpn_inference_service_seconds_count", (("model", "llama"), ("site", "sh-edge")))] == 5


def test_a_refused_route_is_counted_with_its_cause_never_none() -> None:
    from controlplane.core.router import NoRoute, Route

    m = HubMetrics()
    m.route_decision(NoRoute("no site serves model 'x'"))
    m.route_decision(NoRoute("no site serving 'x' within 5 ms of wuhan; nearest is sh-edge at 9.1 ms"))
    m.route_decision(Route(site="sh-edge", rtt_ms=1.0, reason="nearest"))
    reasons = {dict(ls)["reason"]: v for (n, ls), v in samples(m).items() if n == "cpn_route_decisions_total"}
    assert reasons == {"refused:no_replica": 1, "refused:none_in_budget": 1, "nearest": 1}


def test_process_and_platform_collectors_are_exported() -> None:
    got = samples(HubMetrics())
    assert got[("process_resident_memory_bytes", ())] > 0
    assert any(n == "python_info" for n, _ in got)
