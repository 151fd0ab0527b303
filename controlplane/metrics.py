"""Prometheus metrics of one hub (its own registry, so several hubs can live in one test process).

Per-request counters (HTTP requests, routing decisions, inference by site) are plain dict counts
turned into Prometheus counters only when ``/metrics`` is scraped: a prometheus_client ``inc()``
takes a lock, and the request path is the hot path. The latency histogram stays a real Histogram.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector


class _Counts(Collector):
    """Counters kept as ``{label values: count}`` and exported at scrape time."""

    def __init__(self, name: str, doc: str, labels: list[str]) -> None:
        self.name = name
        self.doc = doc
        self.labels = labels
        self.counts: dict[tuple[str, ...], int] = {}

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for values, n in sorted(self.counts.items()):
            family.add_metric(list(values), n)
        yield family

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class HubMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = _Counts("cpn_http_requests", "HTTP requests by route and status", ["route", "status"])
        r.register(self.http_requests)
        self.http_latency = Histogram(
            "cpn_http_request_seconds", "HTTP request latency by route", ["route"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.routes = _Counts("cpn_route_decisions", "Routing decisions by reason", ["reason"])
        r.register(self.routes)
        self.infer = _Counts("cpn_inference_requests", "Inference requests by serving site and outcome", ["site", "outcome"])
        r.register(self.infer)
        self.sites = Gauge("cpn_sites", "Sites by state", ["state"], registry=r)
        self.site_losses = Counter("cpn_site_losses", "Sites declared lost", registry=r)
        self.nats_errors = Gauge("cpn_nats_errors", "NATS errors seen by the hub (connection errors, timeouts, no responders)", ["kind"], registry=r)
        self.malformed = Gauge("cpn_malformed_messages", "Malformed messages from agents, dropped", registry=r)
        self.permission_violations = Gauge("cpn_nats_permission_violations", "Permission violations reported by the NATS server", registry=r)
        self.stale_events = Counter("cpn_stale_events", "Attempt events ignored because their attempt is not current", registry=r)
        self._latency_children: dict[str, Histogram] = {}

    def observe_http(self, route: str, status: int, elapsed_s: float) -> None:
        """One HTTP request: a count by (route, status) and the latency histogram."""
        key = (route, str(status))
        counts = self.http_requests.counts
        counts[key] = counts.get(key, 0) + 1
        child = self._latency_children.get(route)
        if child is None:
            child = self._latency_children[route] = self.http_latency.labels(route)
        child.observe(elapsed_s)

    def infer_ok(self, site: str) -> None:
        key = (site, "ok")
        counts = self.infer.counts
        counts[key] = counts.get(key, 0) + 1

    def route(self, reason: str) -> None:
        key = (reason,)
        counts = self.routes.counts
        counts[key] = counts.get(key, 0) + 1

    def render(self, refresh: Callable[[], None] | None = None) -> bytes:
        if refresh is not None:
            refresh()
        return generate_latest(self.registry)
