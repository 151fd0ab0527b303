"""Prometheus metrics of one hub (its own registry, so several hubs can live in one test process).

Per-request figures (HTTP requests, their latency, routing decisions, inference by tenant, model
and site, tokens, time to first token) are plain dict counts turned into Prometheus counters and
histograms only when ``/metrics`` is scraped: a prometheus_client ``inc()`` or ``observe()`` takes a
lock, and the request path is the hot path. The hub's state (sites, cards, replicas, jobs,
deployments, NATS counters) is read at scrape time by controlplane/scrape.py. The registry also
carries prometheus_client's process, platform and GC collectors (``process_*``, ``python_*``).

Label cardinality is bounded: a label fed by tenants or models keeps its first
:data:`MAX_LABEL_VALUES` distinct values and folds the rest into ``other``; site labels are bounded
by the layout (sites the operator declared), and are folded the same way past the limit.
docs/operations.md lists every family.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class _Counts(Collector):
    """Counters kept as ``{label values: count}`` and exported at scrape time."""

    def __init__(self, name: str, doc: str, labels: list[str], *, registry: CollectorRegistry) -> None:
        self.name = name
        self.doc = doc
        self.labels = labels
        self.counts: dict[tuple[str, ...], int] = {}
        registry.register(self)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for values, n in sorted(self.counts.items()):
            family.add_metric(list(values), n)
        yield family


class _Latency(Collector):
    """A histogram by label values kept as plain per-bucket counts and exported at scrape time.

    ``observe`` adds one to the first bucket whose upper bound is >= the value (Prometheus' ``le``),
    or to the ``+Inf`` slot; the export makes the counts cumulative. One label (``route`` unless
    told) is keyed by its value; several by a tuple of values.
    """

    def __init__(self, name: str, doc: str, bounds: tuple[float, ...], labels: tuple[str, ...] = ("route",), *,
                 registry: CollectorRegistry) -> None:
        self.name = name
        self.doc = doc
        self.bounds = bounds
        self.labels = labels
        self.by_route: dict[Any, list[float]] = {}
        """label value(s) -> [count per bucket..., count of +Inf, sum of values]"""
        registry.register(self)

    def observe(self, route: Any, value: float) -> None:
        slots = self.by_route.get(route)
        if slots is None:
            slots = self.by_route[route] = [0.0] * (len(self.bounds) + 2)
        slots[bisect_left(self.bounds, value)] += 1
        slots[-1] += value

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.doc, labels=list(self.labels))
        for key, slots in sorted(self.by_route.items()):
            running = 0.0
            buckets = []
            for bound, n in zip([*map(floatToGoString, self.bounds), "+Inf"], slots[:-1]):
                running += n
                buckets.append((bound, running))
            family.add_metric(list(key) if isinstance(key, tuple) else [key], buckets, slots[-1])
        yield family


MAX_LABEL_VALUES = 100
"""Distinct values a tenant-, model- or site-fed label keeps before new ones read ``other``."""


class Bounded:
    """Caps one label's distinct values: the first ``limit`` pass as they are, later ones read ``other``."""

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __repr__(self) -> str:
        return f"<Bounded {len(self.seen)}/{self.limit}>"

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if len(self.seen) < self.limit:
            self.seen.add(value)
            return value
        return "other"


def no_route_cause(decision: object) -> str:
    """A bounded label for a routing refusal (the router's reason is free text for people)."""
    code = getattr(decision, "code", None)
    if isinstance(code, str) and code:
        return code
    text = str(getattr(decision, "reason", ""))
    if text.startswith("no site serves model"):
        return "no_replica"
    if "are busy" in text:
        return "all_unavailable"
    if "within" in text:
        return "none_in_budget"
    return "no_route"


_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_ERROR_BUCKETS = (-5, -1, -0.5, -0.25, -0.1, -0.05, -0.025, -0.01, 0, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
_INFER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class HubMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # The standard collectors (process_*, python_info, python_gc_*) on this registry too: a
        # Grafana user's "process" panels work unchanged.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.http_requests = _Counts("cpn_http_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.http_latency = _Latency("cpn_http_request_seconds", "HTTP request latency by route", _LATENCY_BUCKETS, registry=r)
        self.routes = _Counts("cpn_route_decisions", "Routing decisions by reason", ["reason"], registry=r)
        self.infer = _Counts("cpn_inference_requests", "Inference requests by serving site and outcome",
                             ["site", "outcome"], registry=r)
        self.sites = Gauge("cpn_sites", "Sites by state", ["state"], registry=r)
        self.leading = Gauge("cpn_controller_leading", "1 while this process leads the controllers (it decides: "
                             "scheduler, deployments, commands to sites), else 0; by the process's role", ["role"],
                             registry=r)
        self.leader_epoch = Gauge("cpn_controller_epoch", "The leader epoch this process decides under (0: not "
                                  "leading, or the only hub on its own SQLite file)", registry=r)
        self.site_losses = Counter("cpn_site_losses", "Sites declared lost (silent without having announced a stop)", registry=r)
        self.site_departures = Counter("cpn_site_departures", "Sites gone silent after announcing a drain or stop", registry=r)
        # NATS errors, malformed messages and permission violations are counters read from the bus
        # at scrape time (controlplane/scrape.py): cpn_nats_errors_total, cpn_malformed_messages_total.
        self.tenants = Bounded()
        self.models = Bounded()
        self.site_labels = Bounded(1000)
        self.tenant_requests = _Counts("cpn_tenant_requests", "Inference requests served, by tenant and model",
                                       ["tenant", "model"], registry=r)
        self.tokens = _Counts("cpn_tokens", "Tokens served, by tenant, model and kind (prompt, completion)",
                              ["tenant", "model", "kind"], registry=r)
        self.site_tokens = _Counts("cpn_site_tokens", "Tokens served, by serving site and kind", ["site", "kind"], registry=r)
        self.infer_seconds = _Latency("cpn_inference_seconds",
                                      "Hub-measured time to a whole non-streamed answer, by model and site",
                                      _INFER_BUCKETS, ("model", "site"), registry=r)
        self.ttft_seconds = _Latency("cpn_inference_ttft_seconds",
                                     "Hub-measured time to the first streamed chunk, by model and site",
                                     _INFER_BUCKETS, ("model", "site"), registry=r)
        self.service_seconds = _Latency("cpn_inference_service_seconds",
                                        "Service time reported by the serving site, by model and site",
                                        _INFER_BUCKETS, ("model", "site"), registry=r)
        self.stale_events = Counter("cpn_stale_events", "Attempt events ignored because their attempt is not current", registry=r)
        self.refused_keys = _Counts("cpn_refused_api_keys",
                                    "Requests refused for a revoked or expired API key, by reason", ["reason"], registry=r)
        # Sites believed only within what the operator declared (docs/security.md, "Sites").
        self.site_claims_refused = _Counts(
            "cpn_site_claims_refused", "Site registrations refused, or claims replaced by declared values, by reason",
            ["reason"], registry=r)
        self.site_figures_clamped = _Counts(
            "cpn_site_figures_clamped", "Heartbeat figures clamped to their physical range, by figure", ["figure"], registry=r)
        self.events_dropped = _Counts(
            "cpn_events_dropped", "Attempt events dropped before being recorded, by reason", ["reason"], registry=r)
        self.heartbeat_attempts_ignored = _Counts(
            "cpn_heartbeat_attempts_ignored", "Attempts listed in heartbeats that the hub never placed there", ["site"],
            registry=r)
        self.attempts_vanished = Counter(
            "cpn_attempts_vanished", "Attempts failed because their up site stopped reporting them", registry=r)
        self.gateway_refused = _Counts("cpn_gateway_connections_refused",
                                       "Gateway connections refused (503) or cut, by reason", ["reason"], registry=r)
        # Lifecycle tables (replica_lifecycle, registry's SiteState): a refused transition is counted, never applied.
        self.illegal_transitions = _Counts(
            "cpn_illegal_transitions", "State changes a lifecycle table refused, by lifecycle", ["lifecycle"], registry=r)
        # Admission by predicted time to first token (X-CPN-SLO-TTFT-Ms): outcomes, and the
        # predictor's error (actual - predicted; "answer": time to a whole non-streamed answer).
        self.slo_admission = _Counts("cpn_ttft_slo_admission", "Requests with a TTFT SLO, by model and outcome "
                                     "(admitted, refused)", ["model", "outcome"], registry=r)
        self.ttft_error = _Latency("cpn_ttft_prediction_error_seconds", "Actual minus predicted time to first token "
                                   "of admitted SLO requests, by model and kind (stream, answer)", _ERROR_BUCKETS,
                                   ("model", "kind"), registry=r)
        # The overhead estimate (X-CPN-Overhead-Ms, core/overhead.py): samples not believed.
        self.overhead_dropped = _Counts("cpn_overhead_samples_dropped", "Relay overhead samples dropped because the "
                                        "site's claimed time was not believable, by reason", ["reason"], registry=r)
        self.ttft_predicted_seconds = _Latency("cpn_ttft_predicted_seconds", "Predicted time to first token of "
                                               "admitted SLO requests, by model", _INFER_BUCKETS, ("model",), registry=r)

    def slo_admitted(self, model: str) -> None:
        _add(self.slo_admission.counts, (self.models(model), "admitted"), 1)

    def slo_refused(self, model: str) -> None:
        _add(self.slo_admission.counts, (self.models(model), "refused"), 1)

    def ttft_predicted(self, model: str, kind: str, predicted_ms: float, actual_ms: float) -> None:
        """An admitted SLO request's prediction against the time measured at the hub."""
        model = self.models(model)
        self.ttft_predicted_seconds.observe((model,), predicted_ms / 1000.0)
        self.ttft_error.observe((model, kind), (actual_ms - predicted_ms) / 1000.0)

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

    def served(self, tenant: str, model: str, site: str, prompt_tokens: int, completion_tokens: int,
               service_ms: float) -> None:
        """One answered inference request: counts by tenant/model and site, tokens, service time."""
        # Inlined (no helper call per count): this runs for every answer.
        counts = self.infer.counts
        key: tuple[str, ...] = (site, "ok")
        counts[key] = counts.get(key, 0) + 1
        # A label value already seen passes as it is (Bounded's first step, without its call).
        tenants, models, sites = self.tenants, self.models, self.site_labels
        tenant = tenant if tenant in tenants.seen else tenants(tenant)
        model = model if model in models.seen else models(model)
        site = site if site in sites.seen else sites(site)
        counts = self.tenant_requests.counts
        key = (tenant, model)
        counts[key] = counts.get(key, 0) + 1
        counts = self.tokens.counts
        key = (tenant, model, "prompt")
        counts[key] = counts.get(key, 0) + prompt_tokens
        key = (tenant, model, "completion")
        counts[key] = counts.get(key, 0) + completion_tokens
        counts = self.site_tokens.counts
        key = (site, "prompt")
        counts[key] = counts.get(key, 0) + prompt_tokens
        key = (site, "completion")
        counts[key] = counts.get(key, 0) + completion_tokens
        if service_ms > 0:
            self.service_seconds.observe((model, site), service_ms / 1000.0)

    def answered(self, model: str, site: str, elapsed_s: float) -> None:
        """A whole non-streamed answer reached the hub ``elapsed_s`` after routing began."""
        models, sites = self.models, self.site_labels
        self.infer_seconds.observe((model if model in models.seen else models(model),
                                    site if site in sites.seen else sites(site)), elapsed_s)

    def first_token(self, model: str, site: str, elapsed_s: float) -> None:
        """A stream's first message reached the hub ``elapsed_s`` after routing began."""
        self.ttft_seconds.observe((self.models(model), self.site_labels(site)), elapsed_s)

    def route_decision(self, decision: object) -> None:
        """A routing decision: the route's reason, or ``refused:<cause>`` for no route."""
        reason = getattr(decision, "reason", "")
        if getattr(decision, "site", None) is None:
            reason = "refused:" + no_route_cause(decision)
        self.route(str(reason))

    def illegal_transition(self, lifecycle: str) -> None:
        """A lifecycle table refused a transition (``replica``, ``site``)."""
        self.count(self.illegal_transitions, lifecycle)

    def key_refused(self, reason: str) -> None:
        """A request presented a key that exists but was revoked or has expired."""
        key = (reason,)
        counts = self.refused_keys.counts
        counts[key] = counts.get(key, 0) + 1

    def route(self, reason: str) -> None:
        key = (reason,)
        counts = self.routes.counts
        counts[key] = counts.get(key, 0) + 1

    def add_collector(self, collector: Collector) -> None:
        """Export another collector's families from this registry (e.g. the hub's state at scrape time)."""
        self.registry.register(collector)

    def render(self, refresh: Callable[[], None] | None = None) -> bytes:
        if refresh is not None:
            refresh()
        return generate_latest(self.registry)


def _add(counts: dict[tuple[str, ...], int], key: tuple[str, ...], n: int) -> None:
    counts[key] = counts.get(key, 0) + n
