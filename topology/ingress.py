"""Ingress: where requests enter the network, and what the full path origin -> gateway -> site costs.

A tenant's request enters at a gateway (an HTTP front in some city) and only then goes to a site, so
the latency a user gets is RTT(origin -> gateway) + RTT(gateway -> site), not RTT(origin -> site).

Promises:

- Pure: a layout, its :class:`latency.RttIndex` and a list of gateway cities (origin ids) in, data out.
- RTT between two cities is the shortest path through the backbone: ``min over sites s of
  rtt(a, s) + rtt(b, s)`` (every city reaches the backbone through its access links, and a path
  between two cities crosses at least one site); 0 within one city.
- Each origin enters at its *nearest* gateway (what the operator's DNS or anycast does), ties by
  city id. The leg gateway -> site is the one the hub routes with (:func:`gateway_paths`): the NATS
  path through the regions' clusters when the layout names regions, else the backbone's shortest
  path. So the full path is never shorter than the direct one, and equals it when the origin's own
  city has a gateway and (with regions) that city is its region's cluster city.
- One RTT model everywhere: a live gateway (``core/router.for_gateway``), ``cpn sim`` and
  :func:`analyse` (``cpn topology coverage --gateways``) all rank with :class:`IngressRtt` over
  :func:`gateway_paths`, so the header, the simulation and the coverage report give one figure.
- :func:`analyse` reports, per budget (the requested one, then 5 and 10 ms), the demand share with
  >= 1 and >= 2 site cities within budget on the direct path and on the full path. Its JSON form
  (schema ``cpn.topology.ingress/1``, docs/topology.md) is stable in the same way as coverage's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import msgspec

from .coverage import checked, cities_within, of_tiers
from .latency import RttIndex
from .layout import TIERS, Layout

SCHEMA = "cpn.topology.ingress/1"


class IngressError(ValueError):
    """Gateway cities that are not cities of the layout (or none at all)."""


def city_rtt_ms(index: RttIndex, a: str, b: str) -> float:
    """RTT in ms between two cities (origin ids) through the backbone; 0 within a city."""
    if a == b:
        return 0.0
    best = math.inf
    for site, r in index.ranked(a):
        if r >= best:
            break  # ranked ascending: no later site can do better
        best = min(best, r + index.rtt_ms(b, site))
    return best


def check_gateways(layout: Layout, gateways: Iterable[str]) -> list[str]:
    """The gateway list, deduplicated in order.

    Raises:
        IngressError: empty, or naming a city that is not an origin id of the layout.
    """
    out: list[str] = []
    for g in gateways:
        if g not in out:
            out.append(g)
    bad = [g for g in out if not layout.has_origin(g)]
    if bad:
        raise IngressError(f"gateway city/cities {', '.join(map(repr, bad))} are not origin ids of layout {layout.name!r}")
    if not out:
        raise IngressError("no gateway cities given (and the layout names none)")
    return out


def nearest_gateways(layout: Layout, index: RttIndex, gateways: Iterable[str]) -> dict[str, tuple[str, float]]:
    """Origin id -> (its nearest gateway city, RTT to it in ms); ties by city id."""
    gws = sorted(check_gateways(layout, gateways))
    out: dict[str, tuple[str, float]] = {}
    for o in layout.origins:
        best = min(((city_rtt_ms(index, o.id, g), g) for g in gws))
        out[o.id] = (best[1], best[0])
    return out


class ClusterPaths:
    """Where a layout's regions put the NATS path between a gateway and a site.

    In a super-cluster (docs/topology.md, ``[regions.ID]``) a gateway is a client of its own
    region's cluster and a site is a leaf node of its own region's cluster, so a message between
    them goes gateway city -> its region's cluster city -> (the site's region's cluster city, over a
    gateway connection, when the regions differ) -> the site. :meth:`ranked_from` ranks every site
    by that path from a city; a city or a site in no region is reached directly (the backbone's
    shortest path). Within one region whose cluster stands in the gateway's city, the path is the
    direct one.
    """

    __slots__ = ("index", "_cluster_of_site", "_cluster_of_city")

    def __init__(self, layout: Layout, index: RttIndex) -> None:
        self.index = index
        cluster = {r.id: r.cluster for r in layout.regions}
        self._cluster_of_site = {s.id: cluster[rid] for s in layout.sites
                                 if (rid := layout.region_of_province(s.region)) is not None}
        self._cluster_of_city = {o.id: cluster[rid] for o in layout.origins
                                 if (rid := layout.region_of_province(o.region)) is not None}

    def ranked_from(self, city: str) -> list[tuple[str, float]]:
        """Every site as ``(site, RTT ms)`` from ``city`` along the NATS path, ascending (ties by id)."""
        home = self._cluster_of_city.get(city)
        direct = self.index.ranked(city)
        if home is None:
            return list(direct)
        to_home = city_rtt_ms(self.index, city, home)
        between: dict[str, float] = {}
        out = []
        for site, rtt in direct:
            there = self._cluster_of_site.get(site)
            if there is None:
                out.append((site, rtt))
                continue
            if there not in between:
                between[there] = city_rtt_ms(self.index, home, there)
            out.append((site, to_home + between[there] + self.index.rtt_ms(there, site)))
        return sorted(out, key=lambda p: (p[1], p[0]))


def gateway_paths(layout: Layout, index: RttIndex) -> ClusterPaths | None:
    """The leg gateway -> site of every full-path figure for ``layout``: the NATS path through the
    regions' clusters when the layout names regions, else None (the backbone's shortest path)."""
    return ClusterPaths(layout, index) if layout.regions else None


class IngressRtt:
    """The RTT source a gateway in ``city`` routes with: every site ranked by the full path
    origin -> ``city`` -> site, in ascending order (the router's ``ranked(origin)``); with
    ``paths``, the leg ``city`` -> site is the NATS path through the regions' clusters
    (:class:`ClusterPaths`), else the backbone's shortest path.

    Entering at one gateway, every path to a site shares the leg origin -> gateway, so the ranking
    is the gateway's own ranking shifted by that leg: nothing is sorted per origin. The leg is
    computed once per origin and kept (origins are a fixed set of the layout).
    """

    __slots__ = ("index", "city", "paths", "_leg", "_own")

    def __init__(self, index: RttIndex, city: str, paths: ClusterPaths | None = None) -> None:
        self.index = index
        self.city = city
        self.paths = paths
        self._leg: dict[str, float] = {}
        self._own: list[tuple[str, float]] | None = None

    def __repr__(self) -> str:
        return f"<IngressRtt at {self.city} origins={len(self._leg)}>"

    def leg_ms(self, origin: str) -> float:
        """RTT origin -> this gateway in ms (0 from its own city)."""
        leg = self._leg.get(origin)
        if leg is None:
            leg = self._leg[origin] = city_rtt_ms(self.index, origin, self.city)
        return leg

    def ranked(self, origin: str) -> Iterable[tuple[str, float]]:
        leg = self.leg_ms(origin)
        if self.paths is None:
            return ((s, leg + r) for s, r in self.index.ranked(self.city))
        if self._own is None:
            self._own = self.paths.ranked_from(self.city)
        return ((s, leg + r) for s, r in self._own)

    def forget(self) -> None:
        """Drop the kept legs and ranking (call when the index's links are recomputed or a site is added)."""
        self._leg.clear()
        self._own = None


class NearestIngressRtt:
    """The RTT source of a network with several gateways: each origin enters at its nearest one
    (:func:`nearest_gateways`) and every site is ranked on the full path through it, the leg
    gateway -> site as a live gateway counts it (:func:`gateway_paths`). What the simulator routes
    with to compare gateway sets on the same day, and what :func:`analyse` reports."""

    __slots__ = ("gateways", "_by_city", "_entry")

    def __init__(self, layout: Layout, index: RttIndex, gateways: Iterable[str]) -> None:
        self.gateways = check_gateways(layout, gateways)
        self._entry = nearest_gateways(layout, index, self.gateways)
        paths = gateway_paths(layout, index)
        self._by_city = {g: IngressRtt(index, g, paths) for g in self.gateways}

    def __repr__(self) -> str:
        return f"<NearestIngressRtt gateways={len(self.gateways)}>"

    def gateway_of(self, origin: str) -> str:
        return self._entry[origin][0]

    def entry(self, origin: str) -> tuple[str, float]:
        """(the origin's gateway city, RTT origin -> that gateway in ms)."""
        return self._entry[origin]

    def ranked(self, origin: str) -> list[tuple[str, float]]:
        return list(self._by_city[self._entry[origin][0]].ranked(origin))


def gateway_sets(layout: Layout, index: RttIndex) -> dict[str, list[str]]:
    """The three gateway sets a comparison uses: one central gateway, the layout's (a gateway per
    region; omitted when the layout names none) and one per province."""
    out = {"central": [central_gateway(layout, index)]}
    if layout.gateways():
        out["region"] = layout.gateways()
    out["province"] = province_gateways(layout)
    return out


def province_gateways(layout: Layout) -> list[str]:
    """A gateway in every province: its heaviest demand city (ties by id)."""
    best: dict[str, tuple[float, str]] = {}
    for o in layout.origins:
        key = (-o.weight, o.id)
        if o.region not in best or key < best[o.region]:
            best[o.region] = key
    return sorted(v[1] for v in best.values())


def central_gateway(layout: Layout, index: RttIndex) -> str:
    """The best single gateway city: the hub city with the least demand-weighted RTT to all origins.

    The "one central gateway" of a comparison; choosing the best one keeps the comparison fair to it.
    """
    hub_cities = sorted({s.city for s in layout.sites if s.tier == "hub"} or {s.city for s in layout.sites})

    def cost(city: str) -> tuple[float, str]:
        return (sum(o.weight * city_rtt_ms(index, o.id, city) for o in layout.origins), city)

    return min(map(cost, hub_cities))[1]


class OriginIngress(msgspec.Struct, frozen=True, kw_only=True):
    """One origin: where it enters, and its nearest sites on the direct and the full path."""

    id: str
    weight: float
    share: float
    gateway: str
    ingress_rtt_ms: float
    nearest_site: str | None
    direct_rtt_ms: float | None     # origin -> nearest site
    full_site: str | None
    full_rtt_ms: float | None       # origin -> gateway -> nearest site through that gateway
    cities_direct: int              # distinct site cities within the requested budget, direct path
    cities_full: int                # ... on the full path


class IngressTotals(msgspec.Struct, frozen=True, kw_only=True):
    """Demand share served within one budget, on the direct path and on the full path."""

    budget_ms: float
    direct_1_city: float
    direct_2_cities: float
    full_1_city: float
    full_2_cities: float
    origins_uncovered_full: int


class IngressReport(msgspec.Struct, frozen=True, kw_only=True):
    """The whole analysis for one set of gateways; :func:`to_json` gives its stable JSON form."""

    schema: str
    layout: str
    budget_ms: float
    tiers: list[str]
    gateways: list[str]
    weighted_ingress_rtt_ms: float  # demand-weighted mean RTT origin -> its gateway
    totals: list[IngressTotals]     # the requested budget first, then 5 and 10 ms
    origins: list[OriginIngress]    # by id

    def at(self, budget_ms: float) -> IngressTotals:
        """Totals for one of the budgets in :attr:`totals` (KeyError otherwise)."""
        for t in self.totals:
            if t.budget_ms == budget_ms:
                return t
        raise KeyError(budget_ms)


def analyse(
    layout: Layout,
    index: RttIndex,
    budget_ms: float,
    gateways: Iterable[str],
    tiers: Iterable[str] = TIERS,
) -> IngressReport:
    """Coverage on the full path origin -> nearest gateway -> site, next to the direct path; the
    full path is what :class:`NearestIngressRtt` ranks (a live gateway's figure).

    Raises:
        ValueError: budget not positive, or an unknown tier.
        IngressError: bad gateway cities.
    """
    budget_ms, tiers, budgets = checked(budget_ms, tiers)
    source = NearestIngressRtt(layout, index, gateways)
    gws = source.gateways
    site_of = {s.id: s for s in layout.sites}
    wanted = set(tiers)
    weight_total = sum(o.weight for o in layout.origins)
    sums = {b: [0.0, 0.0, 0.0, 0.0, 0] for b in budgets}

    rows: list[OriginIngress] = []
    for o in sorted(layout.origins, key=lambda o: o.id):
        gw, in_rtt = source.entry(o.id)
        direct = of_tiers(index.ranked(o.id), site_of, wanted)
        full = of_tiers(source.ranked(o.id), site_of, wanted)
        for b in budgets:
            nd, nf = cities_within(direct, site_of, b), cities_within(full, site_of, b)
            c = sums[b]
            c[0] += o.weight if nd >= 1 else 0.0
            c[1] += o.weight if nd >= 2 else 0.0
            c[2] += o.weight if nf >= 1 else 0.0
            c[3] += o.weight if nf >= 2 else 0.0
            c[4] += 1 if nf == 0 else 0
        rows.append(OriginIngress(
            id=o.id, weight=o.weight, share=round(o.weight / weight_total, 4), gateway=gw,
            ingress_rtt_ms=round(in_rtt, 3),
            nearest_site=direct[0][0] if direct else None,
            direct_rtt_ms=round(direct[0][1], 3) if direct else None,
            full_site=full[0][0] if full else None,
            full_rtt_ms=round(full[0][1], 3) if full else None,
            cities_direct=cities_within(direct, site_of, budget_ms), cities_full=cities_within(full, site_of, budget_ms),
        ))
    totals = [
        IngressTotals(
            budget_ms=b,
            direct_1_city=round(sums[b][0] / weight_total, 4),
            direct_2_cities=round(sums[b][1] / weight_total, 4),
            full_1_city=round(sums[b][2] / weight_total, 4),
            full_2_cities=round(sums[b][3] / weight_total, 4),
            origins_uncovered_full=int(sums[b][4]),
        )
        for b in budgets
    ]
    mean_in = sum(o.weight * source.entry(o.id)[1] for o in layout.origins) / weight_total
    return IngressReport(
        schema=SCHEMA, layout=layout.name, budget_ms=budget_ms, tiers=tiers, gateways=gws,
        weighted_ingress_rtt_ms=round(mean_in, 3), totals=totals, origins=rows,
    )


def to_json(report: IngressReport) -> bytes:
    """The stable JSON form of a report (see docs/topology.md, "Full-path coverage")."""
    return msgspec.json.format(msgspec.json.encode(report), indent=2)


def format_text(report: IngressReport, max_origins: int | None = 15) -> str:
    """Direct vs full-path coverage, then the origins the gateways cost most (heaviest loss first)."""
    lines = [
        f"full path origin -> nearest gateway -> site, gateways: {', '.join(report.gateways)} "
        f"(demand-weighted RTT to the gateway {report.weighted_ingress_rtt_ms:.2f} ms)",
        "",
        "demand served        direct >=1 / >=2 cities    full path >=1 / >=2 cities",
    ]
    for t in report.totals:
        lines.append(
            f"  within {t.budget_ms:>5g} ms  {100 * t.direct_1_city:7.1f}% / {100 * t.direct_2_cities:5.1f}%"
            f"          {100 * t.full_1_city:7.1f}% / {100 * t.full_2_cities:5.1f}%"
        )
    hurt = [o for o in report.origins if o.full_rtt_ms is not None and o.direct_rtt_ms is not None
            and o.full_rtt_ms > o.direct_rtt_ms]
    hurt.sort(key=lambda o: (-o.weight, o.id))
    if hurt:
        lines += ["", f"{'origin':<14} {'share':>6}  {'gateway':<12} {'to gw':>7}  {'direct':>7}  {'full':>7}  (RTT ms to the nearest site)"]
        for o in hurt[: max_origins if max_origins is not None else len(hurt)]:
            lines.append(
                f"{o.id:<14} {100 * o.share:5.2f}%  {o.gateway:<12} {o.ingress_rtt_ms:7.2f}  "
                f"{o.direct_rtt_ms:7.2f}  {o.full_rtt_ms:7.2f}"
            )
        if max_origins is not None and len(hurt) > max_origins:
            lines.append(f"... and {len(hurt) - max_origins} more origins whose gateway is not in their city")
    return "\n".join(lines) + "\n"


__all__ = [
    "SCHEMA", "ClusterPaths", "IngressError", "IngressReport", "IngressTotals", "OriginIngress", "analyse", "central_gateway",
    "check_gateways", "city_rtt_ms", "format_text", "gateway_paths", "nearest_gateways", "province_gateways", "to_json",
]
