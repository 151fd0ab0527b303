"""The inference path of the hub: route (pure), send over the bus, fail over, account.

Decide, then do the I/O (CONVENTIONS example 2): the router returns the chosen site and its
fallbacks; this module sends and, when a site fails (no responders, timeout, a retryable error, or
the site being declared lost while the request is in flight), tries the next fallback within the
request's RTT budget. Only when every candidate failed does the caller see an error.

Admission by predicted time to first token (``core/ttft.py``): a request with an SLO
(``slo_ttft_ms``) is routed to the candidate within budget with the best prediction (RTT on the
full path + queue wait from the site's heartbeat and the hub's in-flight count + prefill from the
accelerator's profile), or refused at once (:class:`SloUnmeetable`, a 429 with ``Retry-After``)
when none meets it. A request without an SLO never touches the predictor. Predicted and actual
times are recorded (``cpn_ttft_prediction_error_seconds``); a stream's measured first token
calibrates the accelerator's prefill profile.

Demand: every routed request adds one to a count per (tenant, model, origin, budget) that the
deployments service drains (:meth:`InferenceService.drain_demand`) for the autoscaler.

A site is not trusted with what tenants read: an ``ErrorReply``'s free text (which could name a
site's internal URLs or hosts, or say anything at all) is logged here and never passed on. A tenant
sees the site id and the reply's code, and only a code from :data:`PUBLIC_CODES` (else ``error``).
"""

from __future__ import annotations

import logging
import math
import random
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from controlplane.core import router, ttft
from controlplane.core.overhead import RelayOverhead
from controlplane.core.errors import (
    NoCapacity, PeerError, RequestError, SiteRefused, SiteSilent, SiteUnreachable, SloUnmeetable,
)
from edge_agent import wire

_forks = [0]
"""Times this process was forked into (a child's pool of random bits must not be its parent's)."""
os.register_at_fork(after_in_child=lambda: _forks.__setitem__(0, _forks[0] + 1))

if TYPE_CHECKING:
    from controlplane.core.clock import Clock
    from controlplane.core.registry import SiteRegistry, SiteView
    from controlplane.core.router import Router
    from controlplane.metrics import HubMetrics
    from controlplane.nats.bus import HubBus
    from controlplane.services.accounting import UsageAccounts

log = logging.getLogger("cpn.inference")


@dataclass(slots=True)
class Served:
    """Where and how a request was served (goes into X-CPN-* headers)."""

    site: str
    rtt_ms: float
    route: str
    tried: list[str] = field(default_factory=list)
    result: wire.InferResult | None = None
    ingress: str = ""
    """The gateway city the RTT was measured from ("" when the gateway is not placed)."""
    nearer_gateway: str = ""
    """A gateway city nearer to the request's origin than this one ("" when none is)."""
    predicted: ttft.Prediction | None = None
    """The TTFT prediction the request was admitted on (requests with an SLO only)."""
    overhead_ms: float = 0.0
    """cpn's own expected time on the request beyond ``rtt_ms`` and the site's work (the gateway's
    measured relay overhead to the serving site, before this request; the figure the router added to
    the RTT for the budget, unless other answers moved it meanwhile: ``X-CPN-Overhead-Ms``)."""
    first_site_ms: float | None = None
    """A stream's first message: the site's own time to it (its ``site_ms``, or the ``service_ms`` of
    a whole answer); None: not stated."""

    @property
    def promise_ms(self) -> float:
        """What the tenant should get beyond the site's work: ``X-CPN-Promise-Ms``."""
        return self.rtt_ms + self.overhead_ms


PUBLIC_CODES = frozenset({
    "bad_message", "unknown_model", "busy", "backend", "backend_unavailable", "backend_error", "timeout",
    "cancelled", "shutting_down", "internal", "draining", "no_capacity", "stream_broken",
})
"""``ErrorReply`` codes a tenant may see as they are; any other code reads ``error``."""


def public_refusal(site: str, exc: SiteRefused) -> SiteRefused:
    """``exc`` with its text replaced by what a tenant may read: the site id and a known code."""
    code = exc.code if exc.code in PUBLIC_CODES else "error"
    return SiteRefused(code, f"site {site} could not serve the request", exc.retryable)


def _public(site: str, exc: PeerError) -> str:
    # SiteUnreachable texts are the hub's own (site id, timings); a refusal carries the site's text.
    return str(public_refusal(site, exc)) if isinstance(exc, SiteRefused) else str(exc)


ACK_AFTER_SHARE = 0.25
"""Share of the hub's acknowledgement timeout a site may wait before acknowledging a request whose
answer has not gone out yet: the rest is margin for the network and a busy hub."""


HEARD_POLL_S = 0.05
"""How often a request waiting for a silent site (:meth:`InferenceService._heard_again`) looks again."""

DEMAND_KEYS_MAX = 10_000
"""Distinct (tenant, model, origin, budget) demand counts kept between two drains."""

SERVICE_CLAIM_SLACK = 4.0
"""A site's claimed time on one answer is believed up to this many times the p99 service time it
declares in its heartbeats (:meth:`InferenceService.relayed`)."""

CALIBRATE_MIN_TOKENS = ttft.CALIBRATE_MIN_TOKENS
"""Prompts shorter than this do not calibrate a prefill profile: their first token is mostly fixed
overhead (the backend's own, the hops), which would be read as a slow prefill rate."""


class AllSitesFailed(PeerError):
    def __init__(self, tried: list[str], last: str) -> None:
        super().__init__(f"every candidate site failed ({', '.join(tried)}); last error: {last}")
        self.tried = tried


class InferenceService:
    """Routes and sends inference requests for the gateway.

    Built with exactly what it uses: the site registry (soft state), the router over the layout's
    RTT index, the origins of the layout, the models some site serves, the bus, the accounting of
    usage, the metrics, the clock (durations) and the seeded choice of the router; from the config
    only the per-site timeouts.
    """

    def __init__(self, *, registry: SiteRegistry, router: Router, origin_ids: frozenset[str],
                 known_models: Callable[[], frozenset[str]], bus: HubBus, accounting: UsageAccounts,
                 metrics: HubMetrics, clock: Clock, rng: random.Random, site_timeout_s: float,
                 site_ack_timeout_s: float, budget_counts_overhead: bool = True) -> None:
        self.registry = registry
        self.overhead = RelayOverhead()
        """cpn's own measured time per relayed answer, stated next to the RTT (docs/topology.md, "The
        latency a tenant gets")."""
        allowance = self.overhead.floor_ms
        self._budgeted: Callable[[str], float] | None = (lambda _site: allowance) if budget_counts_overhead else None
        """What the router adds to the RTT for the budget (``HubConfig.budget_counts_overhead``): the
        declared allowance for cpn's own time (``overhead.FLOOR_MS``, as ``cpn sim`` and replica
        placement count it), not the measured figure, which grows with the gateway's own queue:
        with it a loaded gateway refused nearly every strict request (3,511 of 3,544 at 32
        connections in flight), then served again once its samples aged out, in waves."""
        self.router = router
        self.origin_ids = origin_ids
        self.known_models = known_models
        self.bus = bus
        self.accounting = accounting
        self.metrics = metrics
        self.clock = clock
        self.rng = rng
        self.site_timeout_s = site_timeout_s
        self.site_ack_timeout_s = site_ack_timeout_s
        self.served = 0
        self.failovers = 0
        self.profiles: dict[str, dict[str, ttft.Profile]] = {}
        """Prefill profiles per model and accelerator (models prefill at different rates on one card)."""
        self.service_ms: dict[tuple[str, str], float] = {}
        """Mean service time per (site, model) from the answers (``ttft.service_update``): the queue
        term of an SLO request's prediction."""
        """Accelerator -> its prefill profile, calibrated from measured first tokens."""
        self.demand: dict[tuple[str, str, str, float], int] = {}
        """(tenant, model, origin, budget_ms) -> requests routed since the last drain."""
        self.demand_overflows = 0
        """Times the demand counts were dropped for holding :data:`DEMAND_KEYS_MAX` keys."""
        self.waited_for_silent = 0
        """Requests routed once more after a silent site was heard from again (:meth:`_heard_again`)."""

    def _count_new(self, key: tuple[str, str, str, float]) -> None:
        """A first request for ``key`` since the last drain; the counts are bounded (a process
        whose counts nobody drains, a gateway, or budgets varied on purpose, cannot grow them)."""
        if len(self.demand) >= DEMAND_KEYS_MAX:
            self.demand.clear()
            self.demand_overflows += 1
        self.demand[key] = 1

    def drain_demand(self) -> dict[tuple[str, str, str, float], int]:
        """The request counts since the last call (the deployments service feeds its autoscaler)."""
        out, self.demand = self.demand, {}
        return out

    def __repr__(self) -> str:
        return f"<InferenceService served={self.served} failovers={self.failovers}>"

    def decide(self, origin: str, model: str, budget_ms: float, policy: str,
               deployments: frozenset[str] | None = None, tenant: str = "") -> router.Route:
        """Route decision or NoCapacity (503) with the router's reason."""
        if origin not in self.origin_ids:
            raise RequestError(f"unknown origin {origin!r}", field="origin", status=400, code="unknown_origin")
        if model not in self.known_models():
            raise RequestError(f"model {model!r} is not served by any site", field="model", status=404, code="model_not_found")
        key = (tenant, model, origin, budget_ms)
        demand = self.demand
        n = demand.get(key)
        if n is None:
            self._count_new(key)
        else:
            demand[key] = n + 1
        return self._route(origin, model, budget_ms, policy, deployments, tenant)

    def _route(self, origin: str, model: str, budget_ms: float, policy: str,
               deployments: frozenset[str] | None, tenant: str) -> router.Route:
        self.overhead.expire(self.clock.monotonic())
        decision = self.router.route(
            router.RouteRequest(origin=origin, model=model, budget_ms=budget_ms, policy=policy, deployments=deployments,
                                tenant=tenant),
            self.registry.views,
            self.registry.version,
            self.rng,
            self._budgeted,
        )
        self.metrics.route_decision(decision)
        if isinstance(decision, router.NoRoute):
            raise NoCapacity(decision.reason)
        return decision

    def admit(self, req: wire.InferRequest, origin: str, budget_ms: float, slo_ms: float,
              deployments: frozenset[str] | None = None) -> tuple[router.Route, ttft.Prediction]:
        """Admission by predicted TTFT: the route to the candidate within budget with the best
        prediction (fallbacks: the others that also meet the SLO, best first).

        Raises:
            SloUnmeetable: (429, ``Retry-After``) no candidate's prediction meets ``slo_ms``.
            RequestError, NoCapacity: as :meth:`decide`.
        """
        if origin not in self.origin_ids:
            raise RequestError(f"unknown origin {origin!r}", field="origin", status=400, code="unknown_origin")
        if req.model not in self.known_models():
            raise RequestError(f"model {req.model!r} is not served by any site", field="model", status=404,
                               code="model_not_found")
        key = (req.tenant, req.model, origin, budget_ms)
        n = self.demand.get(key)
        if n is None:
            self._count_new(key)
        else:
            self.demand[key] = n + 1
        views = self.registry.views
        self.overhead.expire(self.clock.monotonic())
        near = self.router.within_budget(
            router.RouteRequest(origin=origin, model=req.model, budget_ms=budget_ms, deployments=deployments,
                                tenant=req.tenant), views, self.registry.version, overhead=self._budgeted)
        service = self.service_ms
        cands = [c for site, rtt_ms in near
                 if (c := ttft_candidate(views[site], req.model, rtt_ms, service.get((site, req.model), 0.0)))
                 is not None]
        if not cands:  # nothing within budget at all: the router's 503 and its reason, as without an SLO
            self._route(origin, req.model, budget_ms, "strict", deployments, req.tenant)
        tokens = prompt_tokens(req)
        profiles = self.profiles.get(req.model, {})
        verdict = ttft.admit(cands, tokens, slo_ms, profiles)
        if isinstance(verdict, ttft.Refuse):
            self.metrics.slo_refused(req.model)
            log.info("event=slo_refused request_id=%s model=%s slo_ms=%g reason=%r", req.request_id, req.model,
                     slo_ms, verdict.reason)
            raise SloUnmeetable(verdict.reason, retry_after_s=verdict.retry_after_s)
        best = verdict.prediction
        others = []
        for c in cands:
            if c.site != best.site:
                p = ttft.predict(c, tokens, profiles.get(c.accelerator) or ttft.Profile(accelerator=c.accelerator))
                if p.ttft_ms <= slo_ms:
                    others.append((p.ttft_ms, c.site, c.rtt_ms))
        others.sort()
        self.metrics.slo_admitted(req.model)
        return router.Route(best.site, best.rtt_ms, "slo", [(s, r) for _, s, r in others]), best

    def _service_time(self, site: str, model: str, service_ms: float) -> None:
        """Fold one answer's service time into its (site, model) mean (bounded: sites x models)."""
        key = (site, model)
        mean = self.service_ms.get(key)
        if mean is None and len(self.service_ms) >= DEMAND_KEYS_MAX:
            return
        self.service_ms[key] = ttft.service_update(mean or 0.0, service_ms)

    def _predicted(self, served: Served, req: wire.InferRequest, actual_s: float, streamed: bool) -> None:
        """Record an admitted request's prediction against what happened; a stream's first token
        (actual TTFT, less the predicted RTT and queue wait) calibrates its accelerator's profile."""
        best = served.predicted
        if best is None or served.site != best.site:
            return
        actual_ms = actual_s * 1000.0
        self.metrics.ttft_predicted(req.model, "stream" if streamed else "answer", best.ttft_ms, actual_ms)
        tokens = prompt_tokens(req)
        view = self.registry.get(served.site)
        if streamed and tokens >= CALIBRATE_MIN_TOKENS and view is not None and view.accelerators:
            acc = ttft.accelerator_of(view, req.model)
            per = self.profiles.setdefault(req.model, {})  # models the tenant may call: bounded
            per[acc] = ttft.calibrate(per.get(acc) or ttft.Profile(accelerator=acc), tokens,
                                      actual_ms - best.rtt_ms - best.queue_ms)

    async def complete(
        self, req: wire.InferRequest, *, origin: str, budget_ms: float, policy: str,
        deployments: frozenset[str] | None = None, slo_ttft_ms: float | None = None,
    ) -> Served:
        """Serve a non-streaming request, failing over as needed (``slo_ttft_ms``: admission by
        predicted TTFT, :meth:`admit`); when only silent sites are left, see :meth:`_heard_again`."""
        started = self.clock.monotonic()
        while True:
            try:
                return await self._complete_once(req, origin=origin, budget_ms=budget_ms, policy=policy,
                                                 deployments=deployments, slo_ttft_ms=slo_ttft_ms)
            except (AllSitesFailed, NoCapacity):
                if not await self._heard_again(req, started):
                    raise

    async def _heard_again(self, req: wire.InferRequest, started: float) -> bool:
        """After every candidate failed (or none was left), whether to route the request once more:
        True once a site holding its model that was silent (it did not acknowledge: its agent's NATS
        node frozen, say) is heard from again (the agent moved to another node and sent a heartbeat),
        within the request's time (``site_timeout_s`` from ``started``, less an acknowledgement's
        timeout for the new attempt). False at once when no such site is silent."""
        model = req.model
        silent = [site for site, v in self.registry.views.items() if v.silent and model in v.replicas]
        if not silent:
            return False
        until = started + self.site_timeout_s - self.site_ack_timeout_s
        log.info("event=waiting_for_silent_sites request_id=%s model=%s sites=%s", req.request_id, model,
                 ",".join(silent))
        while self.clock.monotonic() < until:
            await self.clock.sleep(HEARD_POLL_S)
            views = self.registry.views
            if any((v := views.get(site)) is not None and v.routable for site in silent):
                self.waited_for_silent += 1
                return True
        return False

    async def _complete_once(
        self, req: wire.InferRequest, *, origin: str, budget_ms: float, policy: str,
        deployments: frozenset[str] | None = None, slo_ttft_ms: float | None = None,
    ) -> Served:
        started = self.clock.monotonic()
        served, decision = self._begin(req, origin, budget_ms, policy, deployments, slo_ttft_ms)
        last = ""
        for site, rtt_ms in [(decision.site, decision.rtt_ms), *decision.fallbacks]:
            served.tried.append(site)
            try:
                result = await self._send(site, req)
            except (SiteUnreachable, SiteRefused) as exc:
                if isinstance(exc, SiteRefused) and not exc.retryable:
                    log.info("event=site_refused request_id=%s site=%s error=%s", req.request_id, site, exc)
                    raise public_refusal(site, exc) from None
                last = _public(site, exc)
                await self._failed_over(site, req, exc)
                continue
            if len(served.tried) > 1:
                served.route = "failover"
            served.site, served.rtt_ms, served.result = site, rtt_ms, result
            self.served += 1
            elapsed = self.clock.monotonic() - started
            served.overhead_ms = self.overhead.ms(site)
            self.metrics.answered(req.model, site, elapsed)
            if served.predicted is not None:
                self._predicted(served, req, elapsed, False)
            self.accounting.account(req, result, site)
            self._service_time(site, req.model, result.service_ms)
            return served
        raise AllSitesFailed(served.tried, last)

    async def _failed_over(self, site: str, req: wire.InferRequest, exc: Exception) -> None:
        """Count and log a failover from ``site``; a site that stayed silent is passed over by the
        router until it is heard from again, and told to drop the request in case it was only slow."""
        self.failovers += 1
        log.info("event=failover request_id=%s site=%s error=%s", req.request_id, site, exc)
        if isinstance(exc, SiteSilent):
            view = self.registry.get(site)
            if view is not None and not view.silent:
                view.silent = True
                log.warning("event=site_silent site=%s detail=%s", site, exc)
            await self.bus.publish_command(site, wire.CancelInfer(request_id=req.request_id))

    def _begin(self, req: wire.InferRequest, origin: str, budget_ms: float, policy: str,
               deployments: frozenset[str] | None, slo_ttft_ms: float | None) -> tuple[Served, router.Route]:
        """The route (or the admission by predicted TTFT) and the ``Served`` record a request starts with."""
        predicted = None
        if slo_ttft_ms is None:
            decision = self.decide(origin, req.model, budget_ms, policy, deployments, req.tenant)
        else:
            decision, predicted = self.admit(req, origin, budget_ms, slo_ttft_ms, deployments)
        self._ask_ack(req)
        served = Served(decision.site, decision.rtt_ms, decision.reason, ingress=self.router.ingress,
                        nearer_gateway=self.router.nearer_gateway.get(origin, ""), predicted=predicted)
        return served, decision

    def relayed(self, served: Served, origin: str, took_ms: float) -> None:
        """A whole answer the gateway relayed, or a stream's first message: ``took_ms`` from reading
        the request to the answer encoded (a stream: to its first message in hand). Less the site's
        own time (``service_ms``; a stream's ``first_site_ms``) and the network's share of the relay
        (the layout's leg gateway -> site), it is cpn's own time (:mod:`controlplane.core.overhead`).
        Not counted: an answer after a failover (the failed attempt's time is not the relay's), a
        stream whose site did not state its time to the first chunk.

        A site is believed only within bounds (else a site claiming a long service time would make
        cpn's own time look small): a claimed time longer than the whole relay (impossible), or
        above :data:`SERVICE_CLAIM_SLACK` times the p99 service time the site declares in its
        heartbeats, is counted (``cpn_overhead_samples_dropped``) and dropped."""
        result = served.result
        site_ms = result.service_ms if result is not None else served.first_site_ms
        if site_ms is None or len(served.tried) != 1:
            return
        leg_ms = self.router.network_leg_ms(origin, served.rtt_ms)
        view = self.registry.get(served.site)
        declared = view.service_ms_p99 if view is not None else 0.0
        reason = ""
        # The whole relay, not less the layout's leg: on loopback (``cpn up``) the leg is not spent.
        if not (0 <= site_ms <= took_ms):
            reason = "longer_than_relay"
        elif declared > 0 and site_ms > SERVICE_CLAIM_SLACK * declared:
            reason = "beyond_declared"
        if reason:
            self.overhead.drop()
            self.metrics.count(self.metrics.overhead_dropped, reason)
            log.debug("event=overhead_sample_dropped site=%s reason=%s site_ms=%.3f took_ms=%.3f declared_p99_ms=%.3f",
                     served.site, reason, site_ms, took_ms, declared)
            return
        self.overhead.observe(served.site, took_ms - site_ms - leg_ms, self.clock.monotonic())

    def _ask_ack(self, req: wire.InferRequest) -> None:
        """Ask sites that acknowledge to do so (a silent one is then left after
        ``HubConfig.site_ack_timeout_s``), but only when the answer is slow in coming: an answer or
        first chunk within a quarter of that timeout stands for the acknowledgement, so a fast
        request costs two NATS messages, not three (older agents acknowledge at once, as before)."""
        ack_s = self.site_ack_timeout_s
        req.ack = ack_s > 0  # 0: acknowledgements are off, nothing would wait for one
        req.ack_after_ms = ack_s * 1000.0 * ACK_AFTER_SHARE

    def _ack_timeout(self, view: SiteView | None) -> float | None:
        ack_s = self.site_ack_timeout_s
        return ack_s if ack_s > 0 and view is not None and view.infer_acks else None

    async def _send(self, site: str, req: wire.InferRequest) -> wire.InferResult:
        view = self.registry.get(site)
        if view is None:
            return await self.bus.infer(site, req, self.site_timeout_s)
        view.sent += 1
        try:
            return await self.bus.infer(site, req, self.site_timeout_s, self._ack_timeout(view))
        finally:
            if view.sent > 0:
                view.sent -= 1

    async def stream(
        self, req: wire.InferRequest, *, origin: str, budget_ms: float, policy: str,
        deployments: frozenset[str] | None = None, slo_ttft_ms: float | None = None,
    ) -> tuple[Served, AsyncIterator[wire.InferChunk | wire.InferResult]]:
        """Open a streaming request: fail over until a site sends its first message, then commit
        (when only silent sites are left, see :meth:`_heard_again`).

        Returns the serving site and an iterator of the remaining messages (first one included).
        After the first chunk there is no failover: the tenant already has part of an answer.

        When the site's first message is already its result (the whole answer came at once, its
        text in ``InferResult.tail`` if the request was ``tail_ok``), that result is
        ``served.result`` (accounted, the site's stream closed) and the iterator is empty: the
        caller can answer in one piece.
        """
        started = self.clock.monotonic()
        while True:
            try:
                return await self._stream_once(req, origin=origin, budget_ms=budget_ms, policy=policy,
                                               deployments=deployments, slo_ttft_ms=slo_ttft_ms)
            except (AllSitesFailed, NoCapacity):
                if not await self._heard_again(req, started):
                    raise

    async def _stream_once(
        self, req: wire.InferRequest, *, origin: str, budget_ms: float, policy: str,
        deployments: frozenset[str] | None = None, slo_ttft_ms: float | None = None,
    ) -> tuple[Served, AsyncIterator[wire.InferChunk | wire.InferResult]]:
        started = self.clock.monotonic()
        served, decision = self._begin(req, origin, budget_ms, policy, deployments, slo_ttft_ms)
        last = ""
        for site, rtt_ms in [(decision.site, decision.rtt_ms), *decision.fallbacks]:
            served.tried.append(site)
            try:
                first, it = await self.bus.infer_stream(site, req, self.site_timeout_s,
                                                        ack_timeout_s=self._ack_timeout(self.registry.get(site)))
            except (SiteUnreachable, SiteRefused) as exc:
                if isinstance(exc, SiteRefused) and not exc.retryable:
                    log.info("event=site_refused request_id=%s site=%s error=%s", req.request_id, site, exc)
                    raise public_refusal(site, exc) from None
                last = _public(site, exc)
                await self._failed_over(site, req, exc)
                continue
            if len(served.tried) > 1:
                served.route = "failover"
            served.site, served.rtt_ms = site, rtt_ms
            served.overhead_ms = self.overhead.ms(site)
            served.first_site_ms = first.service_ms if isinstance(first, wire.InferResult) else first.site_ms
            self.served += 1
            elapsed = self.clock.monotonic() - started
            self.metrics.first_token(req.model, site, elapsed)
            if served.predicted is not None:
                self._predicted(served, req, elapsed, True)
            if it is None:  # the whole answer at once, waited for as a plain one's: no relay loop needed
                assert isinstance(first, wire.InferResult)
                self.accounting.account(req, first, site)
                self._service_time(site, req.model, first.service_ms)
                served.result = first
                return served, _NOTHING
            assert isinstance(first, wire.InferChunk)
            return served, _Rest(self, first, it, req, site)
        raise AllSitesFailed(served.tried, last)

    def stream_ready(self, request_id: str) -> bool:
        """Whether the stream of ``request_id`` (from :meth:`stream`) has its next message here
        already: the relay can write it together with the one it holds."""
        return self.bus.stream_ready(request_id)


class _Rest:
    """A stream's messages from its first chunk on (:meth:`InferenceService.stream`): the final
    result accounted as it passes; closed (:meth:`aclose`, or at its end or failure) before its
    result, the site is told to stop. An object rather than an async generator, so closing it works
    even before it is first read (a response head that could not be written)."""

    __slots__ = ("service", "first", "it", "req", "site", "finished", "closed")

    def __init__(self, service: InferenceService, first: wire.InferChunk,
                 it: AsyncIterator[wire.InferChunk | wire.InferResult], req: wire.InferRequest, site: str) -> None:
        self.service = service
        self.first: wire.InferChunk | None = first
        self.it = it
        self.req = req
        self.site = site
        self.finished = False
        self.closed = False

    def __aiter__(self) -> _Rest:
        return self

    async def __anext__(self) -> wire.InferChunk | wire.InferResult:
        if self.closed:
            raise StopAsyncIteration
        first = self.first
        if first is not None:
            self.first = None
            return first
        req, site = self.req, self.site
        try:
            msg = await self.it.__anext__()
        except SiteRefused as exc:
            await self.aclose()
            log.info("event=site_refused request_id=%s site=%s error=%s", req.request_id, site, exc)
            raise public_refusal(site, exc) from None
        except BaseException:
            await self.aclose()
            raise
        if isinstance(msg, wire.InferResult):
            self.finished = True
            service = self.service
            service.accounting.account(req, msg, site)
            service._service_time(site, req.model, msg.service_ms)
            await self.aclose()
        return msg

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        await aclose(self.it)
        if not self.finished:
            # The tenant went away (or the site failed) mid-stream: tell the site to stop.
            await self.service.bus.publish_command(self.site, wire.CancelInfer(request_id=self.req.request_id))


class _Nothing:
    """An async iterator with nothing in it (a stream answered whole, see ``InferenceService.stream``)."""

    __slots__ = ()

    def __aiter__(self) -> _Nothing:
        return self

    async def __anext__(self) -> wire.InferChunk | wire.InferResult:
        raise StopAsyncIteration


_NOTHING = _Nothing()


def prompt_tokens(req: wire.InferRequest) -> int:
    """The prompt's length in tokens, estimated at 4 characters a token (for the prefill term)."""
    chars = len(req.prompt)
    if req.messages:
        chars += sum(len(m.content) for m in req.messages)
    return (chars + 3) // 4


def ttft_candidate(view: SiteView, model: str, rtt_ms: float, service_ms: float = 0.0) -> ttft.Candidate | None:
    """What the predictor needs of one site for ``model`` (``ttft.candidate``, shared with ``cpn sim``)."""
    return ttft.candidate(view, model, rtt_ms, service_ms)


async def aclose(it: object) -> None:
    """Close an async iterator if it can be closed, ignoring errors (cleanup paths)."""
    close = getattr(it, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:
            pass


class RequestIds:
    """Request ids, drawn by the hub: ``r`` and 128 random bits (``os.urandom``), one wire id each.

    The wire id is what ``CancelInfer`` and a site's de-duplication key on, so it must be neither
    guessable nor settable by a client: with ids a tenant could predict (a counter) or choose (its
    own ``X-Request-Id``), it could cancel another tenant's requests. A client's ``X-Request-Id`` is
    only echoed and logged (see the gateway's request guard).

    The bits come from the kernel's generator 4 KiB at a time (256 ids a system call, not one a
    request): about 0.4 us an id against 1.4 us for ``secrets.token_hex`` each. Every id is still
    128 bits the kernel drew and no id is handed out twice; the pool is refilled in the process that
    uses it (a copy inherited through ``fork`` is dropped, so two processes never share ids).
    """

    __slots__ = ("_hex", "_at", "_fork")

    POOL_BYTES = 4096

    def __init__(self) -> None:
        self._hex = ""
        self._at = 0
        self._fork = -1

    def next(self) -> str:
        at = self._at
        if at >= len(self._hex) or self._fork != _forks[0]:
            self._hex, self._fork, at = os.urandom(self.POOL_BYTES).hex(), _forks[0], 0
        self._at = at + 32
        return "r" + self._hex[at:at + 32]
