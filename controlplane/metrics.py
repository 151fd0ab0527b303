"""Prometheus metrics of one hub (its own registry, so several hubs can live in one test process).

Per-request figures (HTTP requests, their latency, routing decisions, inference by site) are plain
dict counts turned into Prometheus counters and histograms only when ``/metrics`` is scraped: a
prometheus_client ``inc()`` or ``observe()`` takes a lock, and the request path is the hot path.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


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


class _Latency(Collector):
    """A histogram by route kept as plain per-bucket counts and exported at scrape time.

    ``observe`` adds one to the first bucket whose upper bound is >= the value (Prometheus' ``le``),
    or to the ``+Inf`` slot; the export makes the counts cumulative.
    """

    def __init__(self, name: str, doc: str, bounds: tuple[float, ...]) -> None:
        self.name = name
        self.doc = doc
        self.bounds = bounds
        self.by_route: dict[str, list[float]] = {}
        """route -> [count per bucket..., count of +Inf, sum of values]"""

    def observe(self, route: str, value: float) -> None:
        slots = self.by_route.get(route)
        if slots is None:
            slots = self.by_route[route] = [0.0] * (len(self.bounds) + 2)
        slots[bisect_left(self.bounds, value)] += 1
        slots[-1] += value

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.doc, labels=["route"])
        for route, slots in sorted(self.by_route.items()):
            running = 0.0
            buckets = []
            for bound, n in zip([*map(floatToGoString, self.bounds), "+Inf"], slots[:-1]):
                running += n
                buckets.append((bound, running))
            family.add_metric([route], buckets, slots[-1])
        yield family


_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class HubMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = _Counts("cpn_http_requests", "HTTP requests by route and status", ["route", "status"])
        r.register(self.http_requests)
        self.http_latency = _Latency("cpn_http_request_seconds", "HTTP request latency by route", _LATENCY_BUCKETS)
        r.register(self.http_latency)
        self.routes = _Counts("cpn_route_decisions", "Routing decisions by reason", ["reason"])
        r.register(self.routes)
        self.infer = _Counts("cpn_inference_requests", "Inference requests by serving site and outcome", ["site", "outcome"])
        r.register(self.infer)
        self.sites = Gauge("cpn_sites", "Sites by state", ["state"], registry=r)
        self.site_losses = Counter("cpn_site_losses", "Sites declared lost", registry=r)
        self.nats_errors = Gauge("cpn_nats_errors", "NATS errors seen by the hub (connection errors, timeouts, no responders)", ["kind"], registry=r)
        self.malformed = Gauge("cpn_malformed_messages", "Malformed messages from agents, dropped", registry=r)
        self.nats_dropped = Gauge("cpn_nats_dropped_messages", "Messages from sites dropped before decoding, by kind and reason (rate, oversize, reply_spoof)", ["kind", "reason"], registry=r)
        self.permission_violations = Gauge("cpn_nats_permission_violations", "Permission violations reported by the NATS server", registry=r)
        self.stale_events = Counter("cpn_stale_events", "Attempt events ignored because their attempt is not current", registry=r)
        self.refused_keys = _Counts("cpn_refused_api_keys", "Requests refused for a revoked or expired API key, by reason", ["reason"])
        r.register(self.refused_keys)
        # Sites believed only within what the operator declared (docs/security.md, "Sites").
        self.site_claims_refused = _Counts(
            "cpn_site_claims_refused", "Site registrations refused, or claims replaced by declared values, by reason", ["reason"])
        r.register(self.site_claims_refused)
        self.site_figures_clamped = _Counts(
            "cpn_site_figures_clamped", "Heartbeat figures clamped to their physical range, by figure", ["figure"])
        r.register(self.site_figures_clamped)
        self.events_dropped = _Counts(
            "cpn_events_dropped", "Attempt events dropped before being recorded, by reason", ["reason"])
        r.register(self.events_dropped)
        self.heartbeat_attempts_ignored = _Counts(
            "cpn_heartbeat_attempts_ignored", "Attempts listed in heartbeats that the hub never placed there", ["site"])
        r.register(self.heartbeat_attempts_ignored)
        self.attempts_vanished = Counter(
            "cpn_attempts_vanished", "Attempts failed because their up site stopped reporting them", registry=r)
        self.gateway_refused = _Counts("cpn_gateway_connections_refused",
                                       "Gateway connections refused (503) or cut, by reason", ["reason"])
        r.register(self.gateway_refused)

    @staticmethod
    def count(counter: _Counts, *labels: str, n: int = 1) -> None:
        """Add ``n`` to a labelled count (no lock: the hub's loop is the only writer)."""
        counter.counts[labels] = counter.counts.get(labels, 0) + n

    def observe_http(self, route: str, status: int, elapsed_s: float) -> None:
        """One HTTP request: a count by (route, status) and the latency histogram."""
        key = (route, str(status))
        counts = self.http_requests.counts
        counts[key] = counts.get(key, 0) + 1
        self.http_latency.observe(route, elapsed_s)

    def infer_ok(self, site: str) -> None:
        key = (site, "ok")
        counts = self.infer.counts
        counts[key] = counts.get(key, 0) + 1

    def key_refused(self, reason: str) -> None:
        """A request presented a key that exists but was revoked or has expired."""
        key = (reason,)
        counts = self.refused_keys.counts
        counts[key] = counts.get(key, 0) + 1

    def route(self, reason: str) -> None:
        key = (reason,)
        counts = self.routes.counts
        counts[key] = counts.get(key, 0) + 1

    def render(self, refresh: Callable[[], None] | None = None) -> bytes:
        if refresh is not None:
            refresh()
        return generate_latest(self.registry)
