"""The inference path of the hub: route (pure), send over the bus, fail over, account.

Decide, then do the I/O (CONVENTIONS example 2): the router returns the chosen site and its
fallbacks; this module sends and, when a site fails (no responders, timeout, a retryable error, or
the site being declared lost while the request is in flight), tries the next fallback within the
request's RTT budget. Only when every candidate failed does the caller see an error.

A site is not trusted with what tenants read: an ``ErrorReply``'s free text (which could name a
site's internal URLs or hosts, or say anything at all) is logged here and never passed on. A tenant
sees the site id and the reply's code, and only a code from :data:`PUBLIC_CODES` (else ``error``).
"""

from __future__ import annotations

import logging
import random
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from controlplane.core import router
from controlplane.core.errors import NoCapacity, PeerError, RequestError, SiteRefused, SiteSilent, SiteUnreachable
from edge_agent import wire

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


PUBLIC_CODES = frozenset({
    "bad_message", "unknown_model", "busy", "backend", "backend_unavailable", "backend_error", "timeout",
    "cancelled", "shutting_down", "internal", "draining", "no_capacity",
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
                 site_ack_timeout_s: float) -> None:
        self.registry = registry
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

    def __repr__(self) -> str:
        return f"<InferenceService served={self.served} failovers={self.failovers}>"

    def decide(self, origin: str, model: str, budget_ms: float, policy: str,
               deployments: frozenset[str] | None = None, tenant: str = "") -> router.Route:
        """Route decision or NoCapacity (503) with the router's reason."""
        if origin not in self.origin_ids:
            raise RequestError(f"unknown origin {origin!r}", field="origin", status=400, code="unknown_origin")
        if model not in self.known_models():
            raise RequestError(f"model {model!r} is not served by any site", field="model", status=404, code="model_not_found")
        decision = self.router.route(
            router.RouteRequest(origin=origin, model=model, budget_ms=budget_ms, policy=policy, deployments=deployments,
                                tenant=tenant),
            self.registry.views,
            self.registry.version,
            self.rng,
        )
        self.metrics.route_decision(decision)
        if isinstance(decision, router.NoRoute):
            raise NoCapacity(decision.reason)
        return decision

    async def complete(
        self, req: wire.InferRequest, *, origin: str, budget_ms: float, policy: str,
        deployments: frozenset[str] | None = None,
    ) -> Served:
        """Serve a non-streaming request, failing over as needed."""
        started = self.clock.monotonic()
        decision = self.decide(origin, req.model, budget_ms, policy, deployments, req.tenant)
        self._ask_ack(req)
        served = Served(decision.site, decision.rtt_ms, decision.reason, ingress=self.router.ingress,
                        nearer_gateway=self.router.nearer_gateway.get(origin, ""))
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
            self.metrics.answered(req.model, site, self.clock.monotonic() - started)
            self.accounting.account(req, result, site)
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
        deployments: frozenset[str] | None = None,
    ) -> tuple[Served, AsyncIterator[wire.InferChunk | wire.InferResult]]:
        """Open a streaming request: fail over until a site sends its first message, then commit.

        Returns the serving site and an iterator of the remaining messages (first one included).
        After the first chunk there is no failover: the tenant already has part of an answer.
        """
        started = self.clock.monotonic()
        decision = self.decide(origin, req.model, budget_ms, policy, deployments, req.tenant)
        self._ask_ack(req)
        served = Served(decision.site, decision.rtt_ms, decision.reason, ingress=self.router.ingress,
                        nearer_gateway=self.router.nearer_gateway.get(origin, ""))
        last = ""
        for site, rtt_ms in [(decision.site, decision.rtt_ms), *decision.fallbacks]:
            served.tried.append(site)
            it = self.bus.infer_stream(site, req, self.site_timeout_s,
                                       ack_timeout_s=self._ack_timeout(self.registry.get(site))).__aiter__()
            try:
                first = await it.__anext__()
            except (SiteUnreachable, SiteRefused) as exc:
                await aclose(it)
                if isinstance(exc, SiteRefused) and not exc.retryable:
                    log.info("event=site_refused request_id=%s site=%s error=%s", req.request_id, site, exc)
                    raise public_refusal(site, exc) from None
                last = _public(site, exc)
                await self._failed_over(site, req, exc)
                continue
            except StopAsyncIteration:
                last = f"{site} ended the stream without an answer"
                continue
            if len(served.tried) > 1:
                served.route = "failover"
            served.site, served.rtt_ms = site, rtt_ms
            self.served += 1
            self.metrics.first_token(req.model, site, self.clock.monotonic() - started)
            return served, self._rest(first, it, req, site)
        raise AllSitesFailed(served.tried, last)

    def stream_ready(self, request_id: str) -> bool:
        """Whether the stream of ``request_id`` (from :meth:`stream`) has its next message here
        already: the relay can write it together with the one it holds."""
        return self.bus.stream_ready(request_id)

    async def _rest(
        self,
        first: wire.InferChunk | wire.InferResult,
        it: AsyncIterator[wire.InferChunk | wire.InferResult],
        req: wire.InferRequest,
        site: str,
    ) -> AsyncIterator[wire.InferChunk | wire.InferResult]:
        finished = False
        try:
            msg = first
            while True:
                if isinstance(msg, wire.InferResult):
                    finished = True
                    self.accounting.account(req, msg, site)
                    yield msg
                    return
                yield msg
                try:
                    msg = await it.__anext__()
                except SiteRefused as exc:
                    log.info("event=site_refused request_id=%s site=%s error=%s", req.request_id, site, exc)
                    raise public_refusal(site, exc) from None
        finally:
            await aclose(it)
            if not finished:
                # The tenant went away (or the site failed) mid-stream: tell the site to stop.
                await self.bus.publish_command(site, wire.CancelInfer(request_id=req.request_id))


async def aclose(it: object) -> None:
    """Close an async iterator if it can be closed, ignoring errors (cleanup paths)."""
    close = getattr(it, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:
            pass


class RequestIds:
    """Request ids, drawn by the hub: ``r`` and 128 random bits (``secrets``), one wire id each.

    The wire id is what ``CancelInfer`` and a site's de-duplication key on, so it must be neither
    guessable nor settable by a client: with ids a tenant could predict (a counter) or choose (its
    own ``X-Request-Id``), it could cancel another tenant's requests. A client's ``X-Request-Id`` is
    only echoed and logged (see the gateway's request guard). About 1 us per request.
    """

    __slots__ = ()

    def next(self) -> str:
        return "r" + secrets.token_hex(16)
