"""``cpn topology map``: a PNG of the layout (sites by tier and size, backbone, reach, holes).

This is a plot helper, not part of the pure core: it imports matplotlib (an optional extra,
``pip install 'cpn[map]'``) inside :func:`render` and writes the image file it is given.
The picture: an equirectangular lon/lat view; 5 ms and 10 ms RTT reach around every edge pool
(an origin whose access link alone fits the budget); backbone links by kind; sites by tier, sized
by cards, coloured by provider; origins sized by demand, uncovered ones marked and named.
"""

from __future__ import annotations

import math
import pathlib

from .coverage import BudgetTotals, CoverageReport
from .layout import FIBRE_MS_PER_KM, EARTH_RADIUS_KM, Layout

INSTALL_HINT = "matplotlib is needed for maps: pip install 'cpn[map]' (or: .venv/bin/pip install matplotlib)"

_PROVIDER_COLOURS = ["#1f5fa8", "#d9822b", "#2e9e5b", "#8e44ad", "#c0392b", "#7f8c8d"]


def reach_km(budget_ms: float, layout: Layout) -> float:
    """Great-circle radius within which an origin's access link alone fits ``budget_ms`` RTT."""
    return max(0.0, (budget_ms / 2 - layout.hop_ms) / FIBRE_MS_PER_KM / layout.route_factor)


def _circle(lat: float, lon: float, radius_km: float, n: int = 72) -> tuple[list[float], list[float]]:
    """Points on a great circle of ``radius_km`` around (lat, lon), as lon and lat lists."""
    d = radius_km / EARTH_RADIUS_KM
    p1, l1 = math.radians(lat), math.radians(lon)
    xs, ys = [], []
    for k in range(n + 1):
        b = 2 * math.pi * k / n
        p2 = math.asin(math.sin(p1) * math.cos(d) + math.cos(p1) * math.sin(d) * math.cos(b))
        l2 = l1 + math.atan2(math.sin(b) * math.sin(d) * math.cos(p1), math.cos(d) - math.sin(p1) * math.sin(p2))
        xs.append(math.degrees(l2))
        ys.append(math.degrees(p2))
    return xs, ys


def render(layout: Layout, reports: list[CoverageReport], out: str | pathlib.Path, *, dpi: int = 150) -> pathlib.Path:
    """Draw the layout and write a PNG to ``out``.

    Args:
        layout: the layout drawn.
        reports: coverage reports; uncovered origins of each are marked (the tightest budget wins).
        out: PNG path.

    Raises:
        ImportError: matplotlib is not installed (message: :data:`INSTALL_HINT`).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(INSTALL_HINT) from exc

    out = pathlib.Path(out)
    sites = {s.id: s for s in layout.sites}
    lats = [s.lat for s in layout.sites] + [o.lat for o in layout.origins]
    lons = [s.lon for s in layout.sites] + [o.lon for o in layout.origins]
    mid_lat = (min(lats) + max(lats)) / 2

    fig, ax = plt.subplots(figsize=(16, 10.5))
    ax.set_facecolor("#f4f7fb")
    ax.set_aspect(1 / math.cos(math.radians(mid_lat)))

    # Reach around edge pools: 10 ms underneath, 5 ms on top.
    edges = [s for s in layout.sites if s.tier == "edge"]
    for budget, colour, alpha in ((10.0, "#9ecae1", 0.09), (5.0, "#3182bd", 0.11)):
        r = reach_km(budget, layout)
        for s in edges:
            xs, ys = _circle(s.lat, s.lon, r)
            ax.fill(xs, ys, color=colour, alpha=alpha, linewidth=0, zorder=1)

    # Backbone.
    styles = {
        "hub-mesh": ("#555555", 0.6, 0.35),
        "regional-hub": ("#2c7fb8", 0.9, 0.6),
        "edge-uplink": ("#7fa7c9", 0.7, 0.7),
        "stated": ("#d62728", 1.4, 0.9),
    }
    for link in layout.links:
        a, b = sites[link.a], sites[link.b]
        colour, width, alpha = styles.get(link.kind, styles["stated"])
        ax.plot([a.lon, b.lon], [a.lat, b.lat], color=colour, linewidth=width, alpha=alpha, zorder=2)

    # Origins by demand; uncovered ones marked.
    weights = [o.weight for o in layout.origins]
    wmax = max(weights) if weights else 1.0
    ax.scatter(
        [o.lon for o in layout.origins], [o.lat for o in layout.origins],
        s=[8 + 60 * o.weight / wmax for o in layout.origins], c="#636363", alpha=0.55, zorder=3,
        linewidths=0,
    )
    marked: dict[str, float] = {}
    for report in sorted(reports, key=lambda r: r.budget_ms):  # the widest budget missed wins
        for u in report.uncovered:
            marked[u.id] = report.budget_ms
    for oid, budget in marked.items():
        o = layout.origin(oid)
        big = budget >= 10
        ax.scatter([o.lon], [o.lat], marker="X", s=150 if big else 90, c="#d7301f" if big else "#fc8d59",
                   edgecolors="black", linewidths=0.6, zorder=6)
        ax.annotate(f"{o.name}\n> {budget:g} ms", (o.lon, o.lat), xytext=(6, -14), textcoords="offset points",
                    fontsize=7.5, color="#99000d", zorder=7)

    # Sites: tier -> marker, cards -> size, provider -> colour.
    providers = sorted({s.provider for s in layout.sites})
    colour_of = {p: _PROVIDER_COLOURS[i % len(_PROVIDER_COLOURS)] for i, p in enumerate(providers)}
    markers = {"hub": "s", "regional": "D", "edge": "o"}
    for tier in ("edge", "regional", "hub"):
        group = [s for s in layout.sites if s.tier == tier]
        if not group:
            continue
        ax.scatter(
            [s.lon for s in group], [s.lat for s in group],
            s=[12 + 4.0 * math.sqrt(s.cards) for s in group], marker=markers[tier],
            c=[colour_of[s.provider] for s in group], edgecolors="white", linewidths=0.7, zorder=5 if tier != "edge" else 4,
        )
    for s in layout.sites:
        if s.tier == "hub":
            ax.annotate(f"{s.name.split(' (')[0].replace(' ten-thousand-card hub', '')}\n{s.cards:,} cards",
                        (s.lon, s.lat), xytext=(7, 5), textcoords="offset points", fontsize=7.5, weight="bold",
                        color="#08306b", zorder=7)

    pad = 1.5
    ax.set_xlim(min(lons) - pad, max(lons) + pad)
    ax.set_ylim(min(lats) - pad, max(lats) + pad)
    ax.grid(color="white", linewidth=0.8)
    ax.set_xlabel("longitude (deg E)")
    ax.set_ylabel("latitude (deg N)")

    totals: list[tuple[float, BudgetTotals]] = []
    for report in reports:
        for t in report.totals:
            if t.budget_ms in (5.0, 10.0) and not any(t.budget_ms == x for x, _ in totals):
                totals.append((t.budget_ms, t))
    subtitle = "   ".join(
        f"within {b:g} ms: {100 * t.share_1_city:.1f}% of demand from >=1 city, {100 * t.share_2_cities:.1f}% from >=2"
        for b, t in sorted(totals, key=lambda p: p[0])
    )
    ax.set_title(f"cpn layout '{layout.name}': {len(layout.sites)} sites, {len(layout.origins)} demand origins\n{subtitle}",
                 fontsize=11)

    handles = [
        Line2D([], [], marker="s", linestyle="", color="#444", markersize=9, label="hub (ten-thousand-card)"),
        Line2D([], [], marker="D", linestyle="", color="#444", markersize=7, label="regional pool (thousand-card)"),
        Line2D([], [], marker="o", linestyle="", color="#444", markersize=5, label="edge inference pool"),
        Line2D([], [], marker="o", linestyle="", color="#636363", alpha=0.55, markersize=5, label="demand origin (size = weight)"),
        Line2D([], [], marker="X", linestyle="", color="#d7301f", markersize=8, label="uncovered origin"),
        Line2D([], [], color="#3182bd", alpha=0.3, linewidth=8, label=f"5 ms RTT reach of an edge pool (~{reach_km(5, layout):.0f} km)"),
        Line2D([], [], color="#9ecae1", alpha=0.4, linewidth=8, label=f"10 ms RTT reach (~{reach_km(10, layout):.0f} km)"),
        Line2D([], [], color="#555555", alpha=0.5, label="backbone: hub mesh"),
        Line2D([], [], color="#2c7fb8", label="regional to hub / edge uplink"),
        Line2D([], [], color="#d62728", label="stated (measured) link"),
    ] + [Line2D([], [], marker="o", linestyle="", color=colour_of[p], markersize=7, label=f"provider: {p}") for p in providers]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, framealpha=0.9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return out
