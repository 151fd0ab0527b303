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
