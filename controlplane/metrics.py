"""Prometheus metrics of one hub (its own registry, so several hubs can live in one test process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class HubMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("cpn_http_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.http_latency = Histogram(
            "cpn_http_request_seconds", "HTTP request latency by route", ["route"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.routes = Counter("cpn_route_decisions", "Routing decisions by reason", ["reason"], registry=r)
        self.infer = Counter("cpn_inference_requests", "Inference requests by serving site and outcome", ["site", "outcome"], registry=r)
        self.sites = Gauge("cpn_sites", "Sites by state", ["state"], registry=r)
        self.site_losses = Counter("cpn_site_losses", "Sites declared lost", registry=r)
        self.nats_errors = Gauge("cpn_nats_errors", "NATS errors seen by the hub (connection errors, timeouts, no responders)", ["kind"], registry=r)
        self.malformed = Gauge("cpn_malformed_messages", "Malformed messages from agents, dropped", registry=r)
        self.permission_violations = Gauge("cpn_nats_permission_violations", "Permission violations reported by the NATS server", registry=r)
        self.stale_events = Counter("cpn_stale_events", "Attempt events ignored because their attempt is not current", registry=r)
        self._route_children: dict[str, Counter] = {}
        self._infer_children: dict[str, Counter] = {}
        self._http_children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}

    def observe_http(self, route: str, status: int, elapsed_s: float) -> None:
        """One HTTP request (label children cached: ``labels()`` is the expensive part)."""
        key = (route, status)
        pair = self._http_children.get(key)
        if pair is None:
            pair = (self.http_requests.labels(route, str(status)), self.http_latency.labels(route))
            self._http_children[key] = pair
        pair[0].inc()
        pair[1].observe(elapsed_s)

    def infer_ok(self, site: str) -> None:
        child = self._infer_children.get(site)
        if child is None:
            child = self._infer_children[site] = self.infer.labels(site, "ok")
        child.inc()

    def route(self, reason: str) -> None:
        child = self._route_children.get(reason)
        if child is None:
            child = self.routes.labels(reason)
            self._route_children[reason] = child
        child.inc()

    def render(self, refresh: Callable[[], None] | None = None) -> bytes:
        if refresh is not None:
            refresh()
        return generate_latest(self.registry)
