"""Inference routing: which site serves a request (architecture §6). Pure: no I/O, no clock, no global RNG.

Rule 1: only sites whose promise to the request's origin fits the budget are candidates (policy
``strict``); policy ``nearest`` falls back to the nearest serving site beyond the budget and says so
(reason ``over-budget``). The promise is what the user gets: the RTT on the full path plus cpn's own
time relaying to that site as the caller estimates it (``overhead``: the gateway's recent measured
overhead, :mod:`controlplane.core.overhead`; none: the RTT alone).
Rule 2: a candidate is up, not draining, healthy, and has a *ready* replica of the model with a free
slot as far as the hub can tell.
Rule 3: among the closest ``window`` candidates the router takes two at random (power of two choices)
and keeps the less loaded one, ties going to the nearer. Idle networks are served by the nearest site;
loaded ones spread, so no site is herded while another within budget is idle.
Rule 4: the answer carries the fallbacks in RTT order; the caller tries them while budget time remains
(reason ``failover``).
Rule 5: a replica a site loaded itself (deployment ``local`` or none) is a candidate for a tenant's
request only if the operator allowed that tenant at that site (``SiteView.local_model_tenants``;
``declarations.may_use_local``). Requests without a tenant (an operator's) may use any replica.

Cost: the walk is over a per-(origin, model) list of sites holding the model, in RTT order, cached
until the registry's version changes, and stops after ``window + max_fallbacks`` candidates, so a
decision does not grow with the number of sites in the network.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from controlplane.core.declarations import LOCAL_DEPLOYMENTS, may_use_local
from controlplane.core.errors import RequestError
from controlplane.core.registry import SiteView
from topology import ingress
from topology.latency import RttIndex
from topology.layout import Layout


class Rng(Protocol):
    def random(self) -> float: ...


class RttSource(Protocol):
    def ranked(self, origin: str) -> Iterable[tuple[str, float]]: ...


class RouteRequest(msgspec.Struct, frozen=True):
    """One request to route (a frozen msgspec Struct: built per request, and ~8x cheaper to build
    than a frozen dataclass)."""

    origin: str
    model: str
    budget_ms: float = 10.0
    policy: str = "strict"
    """``strict``: nothing beyond the budget; ``nearest``: best effort beyond it, said in the reason."""
    deployments: frozenset[str] | None = None
    """Only replicas of these deployments may serve (a tenant's own and the sites' own); None: any."""
    tenant: str = ""
    """Who asks: a site's own replicas serve only tenants the operator allowed there (Rule 5)."""


@dataclass(slots=True)
class Route:
    site: str
    rtt_ms: float
    reason: str
    """``nearest`` | ``load`` | ``over-budget`` (``failover`` is set by the caller on retries)."""
    fallbacks: list[tuple[str, float]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class NoRoute:
    reason: str
    nearest: tuple[str, float] | None = None


class Router:
    """Routing decisions over an RTT index and the registry's site views.

    Args:
        rtt: anything with ``ranked(origin) -> [(site, rtt_ms), ...]`` in ascending RTT.
        window: how many of the closest candidates power-of-two choices picks from.
        max_fallbacks: how many further candidates to return for failover.
        slack: how much less loaded (in busy share of slots) a farther site must be to win.
        ingress: the gateway city when ``rtt`` ranks full paths (``topology.ingress.IngressRtt``).
        nearer_gateway: origins with a nearer gateway city than ``ingress``, and that city.
    """

    def __init__(self, rtt: RttSource, *, window: int = 3, max_fallbacks: int = 4, slack: float = 0.25,
                 ingress: str = "", nearer_gateway: Mapping[str, str] | None = None) -> None:
        self.rtt = rtt
        self.ingress = ingress
        """The gateway city ``rtt`` measures from (its full path), or "" when the gateway is not placed."""
        self.nearer_gateway: Mapping[str, str] = nearer_gateway or {}
        """Origin -> a gateway city nearer to it than :attr:`ingress` (origins entering elsewhere)."""
        self.slack = slack
        self.window = window
        self.max_fallbacks = max_fallbacks
        self._cache: dict[tuple[str, str, frozenset[str] | None, str], list[tuple[str, float]]] = {}
        self._cache_version = -1
        self.decisions = 0

    def __repr__(self) -> str:
        return f"<Router decisions={self.decisions} cached={len(self._cache)} window={self.window}>"

    def network_leg_ms(self, origin: str, rtt_ms: float) -> float:
        """The share of ``rtt_ms`` (a route's figure from ``origin``) on the leg gateway -> site: the
        whole of it when the gateway is not placed (``rtt`` is origin -> site)."""
        leg = getattr(self.rtt, "leg_ms", None)
        return rtt_ms - leg(origin) if self.ingress and leg is not None else rtt_ms

    def invalidate(self) -> None:
        """Forget cached candidate lists (call when the RTT index is recomputed)."""
        self._cache.clear()

    def _holders(
        self, origin: str, model: str, deployments: frozenset[str] | None, sites: Mapping[str, SiteView], version: int,
        tenant: str = "",
    ) -> list[tuple[str, float]]:
        if version != self._cache_version:
            self._cache.clear()
            self._cache_version = version
        key = (origin, model, deployments, tenant)
        lst = self._cache.get(key)
        if lst is None:
            lst = []
            for site, rtt_ms in self.rtt.ranked(origin):
                view = sites.get(site)
                replica = view.replicas.get(model) if view is not None else None
                if replica is None or (deployments is not None and replica.deployment not in deployments):
                    continue
                if replica.deployment in LOCAL_DEPLOYMENTS and not may_use_local(view.local_model_tenants, tenant):  # type: ignore[union-attr]
                    continue
                lst.append((site, rtt_ms))
            self._cache[key] = lst
        return lst

    def route(
        self, req: RouteRequest, sites: Mapping[str, SiteView], version: int, rng: Rng,
        overhead: Callable[[str], float] | None = None,
    ) -> Route | NoRoute:
        """Decide where ``req`` goes.

        Args:
            req: origin, model, budget and policy.
            sites: the registry's views by site id.
            version: the registry's version (cache key).
            rng: a seeded random source (``random.Random`` live, a seeded one in the simulator).
            overhead: site -> cpn's own time (ms) a request relayed there is expected to take, added
                to the RTT for the budget (Rule 1); None: the RTT alone.
        """
        self.decisions += 1
        holders = self._holders(req.origin, req.model, req.deployments, sites, version, req.tenant)
        if not holders:
            if req.deployments is not None or req.tenant:
                return NoRoute(f"no site serves model {req.model!r} from a deployment this tenant may use")
            return NoRoute(f"no site serves model {req.model!r}")
        want = self.window + self.max_fallbacks
        cands: list[tuple[str, float]] = []
        beyond: tuple[str, float] | None = None
        beyond_over = 0.0
        skipped = 0
        budget = req.budget_ms
        nearest_policy = req.policy == "nearest"
        for site, rtt_ms in holders:
            # The overhead is >= 0, so past the budget by RTT alone nothing farther fits.
            if rtt_ms > budget and (not nearest_policy or cands or beyond is not None):
                break
            view = sites[site]
            if not view.routable or view.slots_free(req.model) <= 0:
                skipped += 1
                continue
            over = overhead(site) if overhead is not None else 0.0
            if rtt_ms + over > budget:
                if beyond is None:
                    beyond, beyond_over = (site, rtt_ms), over
                if rtt_ms > budget:
                    break
                continue  # a farther site with less measured overhead may still fit
            cands.append((site, rtt_ms))
            if len(cands) >= want:
                break
        if not cands:
            if beyond is not None and nearest_policy:
                rest = self._more(holders, beyond[0], req, sites)
                return Route(beyond[0], beyond[1], "over-budget", rest)
            if beyond is not None and beyond[1] <= budget:
                return NoRoute(
                    f"no site serving {req.model!r} within {budget:g} ms of {req.origin} counting cpn's own "
                    f"time: nearest is {beyond[0]} at {beyond[1]:.1f} ms RTT + {beyond_over:.1f} ms of cpn's own "
                    f"time",
                    beyond,
                )
            nearest = holders[0]
            if nearest[1] > budget:
                return NoRoute(
                    f"no site serving {req.model!r} within {budget:g} ms of {req.origin}; "
                    f"nearest is {nearest[0]} at {nearest[1]:.1f} ms",
                    nearest,
                )
            return NoRoute(
                f"all {skipped} sites serving {req.model!r} within {budget:g} ms of {req.origin} "
                f"are busy, lost, draining or silent (nearest {nearest[0]} at {nearest[1]:.1f} ms)",
                nearest,
            )
        n = min(len(cands), self.window)
        if n == 1:
            chosen = 0
        else:
            i = int(rng.random() * n)
            j = int(rng.random() * (n - 1))
            if j >= i:
                j += 1
            a, b = (i, j) if i < j else (j, i)
            la = sites[cands[a][0]].load(req.model)
            lb = sites[cands[b][0]].load(req.model)
            # The farther of the two wins only when it is clearly less loaded: heartbeat figures are
            # up to a second old, and an idle nearer site should not lose to noise.
            chosen = b if lb + self.slack < la else a
            if chosen != 0 and sites[cands[0][0]].load(req.model) <= min(la, lb) + self.slack:
                chosen = 0
        site, rtt_ms = cands[chosen]
        fallbacks = [c for k, c in enumerate(cands) if k != chosen]
        return Route(site, rtt_ms, "nearest" if chosen == 0 else "load", fallbacks)

    def within_budget(self, req: RouteRequest, sites: Mapping[str, SiteView], version: int,
                      limit: int = 8, overhead: Callable[[str], float] | None = None) -> list[tuple[str, float]]:
        """Routable sites holding ``req.model`` for the caller whose promise (RTT + ``overhead``, as
        :meth:`route`) is within ``req.budget_ms``, nearest first, whether or not a slot is free
        (admission by predicted TTFT weighs their queues); at most ``limit``."""
        out: list[tuple[str, float]] = []
        for site, rtt_ms in self._holders(req.origin, req.model, req.deployments, sites, version, req.tenant):
            if rtt_ms > req.budget_ms:
                break
            if overhead is not None and rtt_ms + overhead(site) > req.budget_ms:
                continue
            if sites[site].routable:
                out.append((site, rtt_ms))
                if len(out) >= limit:
                    break
        return out

    def _more(
        self, holders: list[tuple[str, float]], after: str, req: RouteRequest, sites: Mapping[str, SiteView]
    ) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        seen = False
        for site, rtt_ms in holders:
            if not seen:
                seen = site == after
                continue
            view = sites[site]
            if view.routable and view.slots_free(req.model) > 0:
                out.append((site, rtt_ms))
                if len(out) >= self.max_fallbacks:
                    break
        return out


def for_gateway(layout: Layout, index: RttIndex, city: str | None) -> Router:
    """The router of a gateway standing in ``city``: it ranks and budgets sites on the full path
    origin -> ``city`` -> site (``city`` -> site along the NATS path through the regions' clusters
    when the layout names regions) and knows which origins have a nearer gateway among the layout's.
    ``city`` None: origin -> site, the gateway's place not modelled.

    Raises:
        RequestError: ``city`` is not an origin id of the layout (field ``gateway_city``).
    """
    if city is None:
        return Router(index)
    try:
        ingress.check_gateways(layout, [city])
    except ingress.IngressError as exc:
        raise RequestError(f"gateway_city: {exc}", field="gateway_city") from None
    # With regions, the leg gateway -> site is the NATS path through the regions' clusters.
    source = ingress.IngressRtt(index, city, ingress.gateway_paths(layout, index))
    others = [g for g in layout.gateways() if g != city]
    nearer: dict[str, str] = {}
    if others:
        for origin, (gw, leg) in ingress.nearest_gateways(layout, index, [city, *others]).items():
            if gw != city and leg < source.leg_ms(origin):
                nearer[origin] = gw
    return Router(source, ingress=city, nearer_gateway=nearer)
