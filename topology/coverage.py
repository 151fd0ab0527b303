"""Coverage: which demand is served within an RTT budget, from how many cities, and where the holes are.

Promises:

- :func:`analyse` is pure: a layout and its :class:`latency.RttIndex` in, a :class:`CoverageReport` out.
- The report's JSON form (:func:`to_json`) is stable and documented in docs/topology.md
  (schema id ``cpn.topology.coverage/1``): keys in a fixed order, origins sorted by id, RTTs rounded to
  0.001 ms, shares to 1e-4. A new key may be added; none is renamed or removed without a new schema id.
- Totals are given at the requested budget and always at 5 ms and 10 ms (the policy's regional and
  the operator's inference circles), so two runs at different budgets can be compared.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from .latency import RttIndex
from .layout import TIERS, Layout, Site

SCHEMA = "cpn.topology.coverage/1"
STANDARD_BUDGETS_MS = (5.0, 10.0)


class SiteReach(msgspec.Struct, frozen=True, kw_only=True):
    """A site as seen from one origin."""

    site: str
    city: str
    tier: str
    rtt_ms: float


class OriginCoverage(msgspec.Struct, frozen=True, kw_only=True):
    """One origin: the sites within budget, their distinct cities, and the nearest site at any RTT."""

    id: str
    name: str
    region: str
    weight: float
    share: float                  # weight / total weight
    n_sites: int
    n_cities: int
    cities: list[str]             # distinct site cities within budget, nearest first
    sites: list[SiteReach]        # within budget, nearest first
    nearest: SiteReach | None     # nearest site at any RTT (None: nothing reachable)
    second_city: SiteReach | None  # nearest site in a different city from ``nearest``


class BudgetTotals(msgspec.Struct, frozen=True, kw_only=True):
    """Demand served within one budget."""

    budget_ms: float
    share_1_city: float           # share of demand weight with >= 1 city within budget
    share_2_cities: float         # ... with >= 2 distinct cities within budget
    origins_1_city: int
    origins_2_cities: int
    origins_uncovered: int


class UncoveredOrigin(msgspec.Struct, frozen=True, kw_only=True):
    """An origin with no site within the requested budget."""

    id: str
    name: str
    weight: float
    share: float
    nearest: SiteReach | None


class CoverageReport(msgspec.Struct, frozen=True, kw_only=True):
    """The whole analysis; :func:`to_json` gives its stable JSON form."""

    schema: str
    layout: str
    budget_ms: float
    tiers: list[str]
    origins_total: int
    weight_total: float
    totals: list[BudgetTotals]    # the requested budget first, then 5 and 10 ms (deduplicated)
    uncovered: list[UncoveredOrigin]  # at the requested budget, heaviest first
    origins: list[OriginCoverage]     # at the requested budget, by id

    def at(self, budget_ms: float) -> BudgetTotals:
        """Totals for one of the budgets in :attr:`totals` (KeyError otherwise)."""
        for t in self.totals:
            if t.budget_ms == budget_ms:
                return t
        raise KeyError(budget_ms)


def checked(budget_ms: float, tiers: Iterable[str]) -> tuple[float, list[str], list[float]]:
    """The budget as a float, the tiers sorted, and the budgets to total at (the requested one, then 5
    and 10 ms): what :func:`analyse` and :func:`topology.ingress.analyse` both validate.

    Raises:
        ValueError: budget not positive, or an unknown tier.
    """
    tiers = sorted(set(tiers))
    if not tiers or any(t not in TIERS for t in tiers):
        raise ValueError(f"tiers must be among {', '.join(TIERS)}; got {', '.join(tiers) or 'none'}")
    if not budget_ms > 0:
        raise ValueError(f"budget_ms must be > 0, got {budget_ms}")
    budget_ms = float(budget_ms)
    return budget_ms, tiers, [budget_ms] + [b for b in STANDARD_BUDGETS_MS if b != budget_ms]


def of_tiers(ranked: Iterable[tuple[str, float]], site_of: dict[str, Site], wanted: set[str]) -> list[tuple[str, float]]:
    """``(site, rtt)`` pairs of the layout's sites whose tier is ``wanted``, order kept."""
    return [(s, r) for s, r in ranked if s in site_of and site_of[s].tier in wanted]


def cities_within(ranked: Iterable[tuple[str, float]], site_of: dict[str, Site], budget_ms: float) -> int:
    """Distinct cities of the sites within ``budget_ms``."""
    return len({site_of[s].city for s, r in ranked if r <= budget_ms})


def analyse(
    layout: Layout,
    index: RttIndex,
    budget_ms: float,
    tiers: Iterable[str] = TIERS,
) -> CoverageReport:
    """Coverage of every origin of ``layout`` within ``budget_ms`` RTT, counting sites of ``tiers``.

    Raises:
        ValueError: budget not positive, or an unknown tier.
    """
    budget_ms, tiers, budgets = checked(budget_ms, tiers)
    site_of = {s.id: s for s in layout.sites}
    weight_total = sum(o.weight for o in layout.origins)
    wanted = set(tiers)

    def reach(site_id: str, rtt: float) -> SiteReach:
        s = site_of[site_id]
        return SiteReach(site=site_id, city=s.city, tier=s.tier, rtt_ms=round(rtt, 3))

    counts = {b: [0.0, 0.0, 0, 0, 0] for b in budgets}
    origins: list[OriginCoverage] = []
    for o in sorted(layout.origins, key=lambda o: o.id):
        ranked = of_tiers(index.ranked(o.id), site_of, wanted)
        for b in budgets:
            n = cities_within(ranked, site_of, b)
            c = counts[b]
            if n >= 1:
                c[0] += o.weight
                c[2] += 1
            else:
                c[4] += 1
            if n >= 2:
                c[1] += o.weight
                c[3] += 1
        within = [reach(s, r) for s, r in ranked if r <= budget_ms]
        cities: list[str] = []
        for sr in within:
            if sr.city not in cities:
                cities.append(sr.city)
        nearest = reach(*ranked[0]) if ranked else None
        second = next((reach(s, r) for s, r in ranked if nearest and site_of[s].city != nearest.city), None)
        origins.append(
            OriginCoverage(
                id=o.id, name=o.name, region=o.region, weight=o.weight,
                share=round(o.weight / weight_total, 4), n_sites=len(within), n_cities=len(cities),
                cities=cities, sites=within, nearest=nearest, second_city=second,
            )
        )
    totals = [
        BudgetTotals(
            budget_ms=b,
            share_1_city=round(counts[b][0] / weight_total, 4),
            share_2_cities=round(counts[b][1] / weight_total, 4),
            origins_1_city=int(counts[b][2]),
            origins_2_cities=int(counts[b][3]),
            origins_uncovered=int(counts[b][4]),
        )
        for b in budgets
    ]
    uncovered = [
        UncoveredOrigin(id=c.id, name=c.name, weight=c.weight, share=c.share, nearest=c.nearest)
        for c in sorted(origins, key=lambda c: (-c.weight, c.id))
        if c.n_sites == 0
    ]
    return CoverageReport(
        schema=SCHEMA, layout=layout.name, budget_ms=budget_ms, tiers=tiers,
        origins_total=len(origins), weight_total=round(weight_total, 4), totals=totals,
        uncovered=uncovered, origins=origins,
    )


def to_json(report: CoverageReport) -> bytes:
    """The stable JSON form of a report (see docs/topology.md, "Coverage JSON")."""
    return msgspec.json.format(msgspec.json.encode(report), indent=2)


def format_text(report: CoverageReport, max_origins: int | None = None) -> str:
    """A report an operator reads: totals, the holes, then every origin (heaviest first)."""
    lines = [
        f"coverage of layout {report.layout!r} at {report.budget_ms:g} ms RTT "
        f"({report.origins_total} origins, tiers: {', '.join(report.tiers)})",
        "",
        "demand served        >=1 city   >=2 cities   origins uncovered",
    ]
    for t in report.totals:
        lines.append(
            f"  within {t.budget_ms:>5g} ms  {100 * t.share_1_city:7.1f}%   {100 * t.share_2_cities:8.1f}%"
            f"   {t.origins_uncovered:>3d} of {report.origins_total}"
        )
    lines.append("")
    if report.uncovered:
        lines.append(f"uncovered at {report.budget_ms:g} ms (heaviest first): nearest site and its RTT")
        for u in report.uncovered:
            near = f"{u.nearest.site} ({u.nearest.city}) {u.nearest.rtt_ms:.2f} ms" if u.nearest else "nothing reachable"
            lines.append(f"  {u.id:<14} {100 * u.share:5.2f}% of demand  nearest: {near}")
    else:
        lines.append(f"every origin has a site within {report.budget_ms:g} ms")
    one_city = [c for c in report.origins if c.n_cities == 1]
    if one_city:
        lines.append("")
        lines.append(f"served from one city only at {report.budget_ms:g} ms (no second city for redundancy):")
        for c in sorted(one_city, key=lambda c: (-c.weight, c.id)):
            second = c.second_city
            extra = f"second city: {second.city} {second.rtt_ms:.2f} ms" if second else "no second city reachable"
            lines.append(f"  {c.id:<14} {100 * c.share:5.2f}% of demand  only {c.cities[0]}; {extra}")
    lines.append("")
    lines.append(f"{'origin':<14} {'share':>6} {'sites':>5} {'cities':>6}  nearest (RTT ms) / cities within budget")
    rows = sorted(report.origins, key=lambda c: (-c.weight, c.id))
    for c in rows[: max_origins if max_origins is not None else len(rows)]:
        near = f"{c.nearest.site} {c.nearest.rtt_ms:.2f}" if c.nearest else "-"
        lines.append(
            f"{c.id:<14} {100 * c.share:5.2f}% {c.n_sites:>5} {c.n_cities:>6}  {near}; {', '.join(c.cities[:6])}"
            + (" ..." if len(c.cities) > 6 else "")
        )
    return "\n".join(lines) + "\n"
