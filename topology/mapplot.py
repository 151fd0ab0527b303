"""``cpn topology map``: a PNG of the layout (sites by tier and size, backbone, reach, holes).

This is a plot helper, not part of the pure core: it imports matplotlib (an optional extra,
``pip install 'cpn[map]'``) inside :func:`render` and writes the image file it is given.
The picture: province outlines (topology/provinces.py, offline data) in an equirectangular lon/lat
view; the area within 5 ms and within 10 ms RTT of an edge pool, drawn as two shaded regions with
their outlines (a point whose access link alone to the nearest edge pool fits the budget), so the
two budgets read apart instead of as overlapping discs; backbone links by kind; sites by tier,
sized by cards, coloured by provider, every hub and regional pool named and edge pools by city;
labels placed where they cover no symbol and no other label; origins sized by demand, uncovered
ones marked and named.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

from .coverage import BudgetTotals, CoverageReport
from .layout import FIBRE_MS_PER_KM, EARTH_RADIUS_KM, Layout
from . import loader

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


def _short(name: str) -> str:
    """A label for a site: ``Zhejiang pool``, ``Beijing hub``; edge pools are named by the caller."""
    base = name.split(" (")[0]
    for long, short in ((" ten-thousand-card hub", " hub"), (" thousand-card pool", " pool"), (" cluster pool", " pool")):
        base = base.replace(long, short)
    return base


def _reach_field(layout: Layout, lons: Any, lats: Any) -> Any:
    """Great-circle km from every grid point to the nearest edge pool (numpy arrays in, out)."""
    import numpy as np

    lon_g, lat_g = np.meshgrid(lons, lats)
    p1, l1 = np.radians(lat_g), np.radians(lon_g)
    best = np.full(lon_g.shape, np.inf)
    for s in layout.sites:
        if s.tier != "edge":
            continue
        p2, l2 = math.radians(s.lat), math.radians(s.lon)
        h = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * math.cos(p2) * np.sin((l2 - l1) / 2) ** 2
        best = np.minimum(best, 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.minimum(1.0, h))))
    return best


class _Labels:
    """Greedy label placement: each label takes the first of eight spots around its point whose box
    overlaps no symbol and no label already placed (else the least crowded spot)."""

    # (dx, dy) in units of the gap from the point, with the text's alignment there.
    SPOTS = ((1, 0, "left", "center"), (0.75, 0.75, "left", "bottom"), (0.75, -0.75, "left", "top"),
             (-1, 0, "right", "center"), (-0.75, 0.75, "right", "bottom"), (-0.75, -0.75, "right", "top"),
             (0, 1, "center", "bottom"), (0, -1, "center", "top"))

    def __init__(self, ax: Any, fig: Any) -> None:
        self.ax = ax
        from matplotlib import patheffects

        self.renderer = fig.canvas.get_renderer()
        self.boxes: list[Any] = []
        self.halo = [patheffects.withStroke(linewidth=2.4, foreground="white", alpha=0.85)]

    def block(self, lon: float, lat: float, radius_px: float) -> None:
        from matplotlib.transforms import Bbox

        x, y = self.ax.transData.transform((lon, lat))
        self.boxes.append(Bbox.from_extents(x - radius_px, y - radius_px, x + radius_px, y + radius_px))

    def place(self, text: str, lon: float, lat: float, gap_pt: float = 5.0, **style: Any) -> None:
        """Label (lon, lat) ``gap_pt`` points away from it (the symbol's radius plus a little)."""
        best: tuple[int, Any, Any] | None = None
        for dx, dy, ha, va in self.SPOTS:
            ann = self.ax.annotate(text, (lon, lat), xytext=(dx * gap_pt, dy * gap_pt), textcoords="offset points",
                                   ha=ha, va=va, path_effects=self.halo, **style)
            box = ann.get_window_extent(self.renderer).expanded(1.04, 1.1)
            hits = sum(1 for b in self.boxes if b.overlaps(box))
            if hits == 0:
                self.boxes.append(box)
                if best is not None:
                    best[1].remove()
                return
            if best is None or hits < best[0]:
                if best is not None:
                    best[1].remove()
                best = (hits, ann, box)
            else:
                ann.remove()
        assert best is not None
        self.boxes.append(best[2])


def _decorate(ax: Any, fig: Any, layout: Layout, reports: list[CoverageReport], colour_of: dict[str, str],
              providers: list[str], r5: float, r10: float) -> None:
    """Title, legend and source line."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("#9aa5b1")

    totals: list[tuple[float, BudgetTotals]] = []
    for report in reports:
        for t in report.totals:
            if t.budget_ms in (5.0, 10.0) and not any(t.budget_ms == x for x, _ in totals):
                totals.append((t.budget_ms, t))
    subtitle = "   ".join(
        f"within {b:g} ms: {100 * t.share_1_city:.1f}% of demand from >=1 city, {100 * t.share_2_cities:.1f}% from >=2"
        for b, t in sorted(totals, key=lambda p: p[0])
    )
    counts = {t: sum(1 for s in layout.sites if s.tier == t) for t in ("hub", "regional", "edge")}
    ax.set_title(f"cpn layout '{layout.name}': {counts['hub']} hubs, {counts['regional']} regional pools, "
                 f"{counts['edge']} edge pools, {len(layout.origins)} demand origins\n{subtitle}", fontsize=11)

    handles = [
        Line2D([], [], marker="s", linestyle="", color="#444", markersize=9, label="hub (ten-thousand-card)"),
        Line2D([], [], marker="D", linestyle="", color="#444", markersize=7, label="regional pool (thousand-card)"),
        Line2D([], [], marker="o", linestyle="", color="#444", markersize=5, label="edge inference pool"),
        Line2D([], [], marker="o", linestyle="", color="#525252", alpha=0.5, markersize=5, label="demand origin (size = weight)"),
        Line2D([], [], marker="X", linestyle="", color="#d7301f", markersize=8, label="origin beyond the budget shown"),
        Patch(facecolor="#6baed6", alpha=0.6, edgecolor="#2171b5", label=f"within 5 ms RTT of an edge pool (~{r5:.0f} km)"),
        Patch(facecolor="#c6dbef", alpha=0.8, edgecolor="#6baed6", linestyle="--",
              label=f"within 10 ms RTT (~{r10:.0f} km)"),
        Line2D([], [], color="#6b6b6b", alpha=0.5, label="backbone: hub mesh"),
        Line2D([], [], color="#2c7fb8", label="regional to hub / edge uplink"),
        Line2D([], [], color="#d62728", label="stated (measured) link"),
    ] + [Line2D([], [], marker="o", linestyle="", color=colour_of[p], markersize=7, label=f"provider: {p}") for p in providers]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, framealpha=0.95)
    ax.annotate("Province outlines: Natural Earth (public domain), simplified. Reach: access link to the nearest "
             "edge pool alone (great-circle km x route factor, 4.9 us/km, plus a hop).", xy=(0, -0.008), xycoords="axes fraction",
                va="top", fontsize=7, color="#555555")


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
        import numpy as np
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch, Polygon
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(INSTALL_HINT) from exc

    out = pathlib.Path(out)
    sites = {s.id: s for s in layout.sites}
    lats = [s.lat for s in layout.sites] + [o.lat for o in layout.origins]
    lons = [s.lon for s in layout.sites] + [o.lon for o in layout.origins]
    outlines, _ = loader.load_provinces()
    if outlines:  # the whole country in view, not only the part with sites
        lons += [x for p in outlines for ring in p.rings for x, _ in ring]
        lats += [y for p in outlines for ring in p.rings for _, y in ring]
    pad = 1.0
    x0, x1, y0, y1 = min(lons) - pad, max(lons) + pad, min(lats) - pad, max(lats) + pad
    mid_lat = (y0 + y1) / 2

    fig, ax = plt.subplots(figsize=(16, 10.5))
    ax.set_facecolor("#dfe9f3")  # sea and neighbours
    ax.set_aspect(1 / math.cos(math.radians(mid_lat)))
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)

    # Provinces: land in a warm light grey, white borders, names faint underneath everything.
    for p in outlines:
        for ring in p.rings:
            ax.add_patch(Polygon(ring, closed=True, facecolor="#f7f4ee", edgecolor="#b9b3a7", linewidth=0.6, zorder=0.5))

    # Reach: one region per budget from the distance to the nearest edge pool.
    gx = np.arange(x0, x1, 0.1)
    gy = np.arange(y0, y1, 0.1)
    dist = _reach_field(layout, gx, gy)
    r5, r10 = reach_km(5, layout), reach_km(10, layout)
    if any(s.tier == "edge" for s in layout.sites):
        ax.contourf(gx, gy, dist, levels=[0, r5, r10], colors=["#9ecae1", "#deebf7"], alpha=0.55, zorder=1)
        ax.contour(gx, gy, dist, levels=[r5], colors=["#2171b5"], linewidths=1.1, zorder=1.2)
        ax.contour(gx, gy, dist, levels=[r10], colors=["#6baed6"], linewidths=1.0, linestyles="--", zorder=1.2)

    # Province borders again above the reach shading, so both read.
    for p in outlines:
        for ring in p.rings:
            ax.add_patch(Polygon(ring, closed=True, facecolor="none", edgecolor="#a39e93", linewidth=0.5, zorder=1.5))

    # Backbone: hub mesh faint, uplinks clearer, stated links red.
    styles = {
        "hub-mesh": ("#6b6b6b", 0.45, 0.25),
        "regional-hub": ("#2c7fb8", 0.8, 0.55),
        "edge-uplink": ("#7fa7c9", 0.6, 0.6),
        "stated": ("#d62728", 1.4, 0.9),
    }
    for link in layout.links:
        a, b = sites[link.a], sites[link.b]
        colour, width, alpha = styles.get(link.kind, styles["stated"])
        ax.plot([a.lon, b.lon], [a.lat, b.lat], color=colour, linewidth=width, alpha=alpha, zorder=2)

    # Origins by demand.
    weights = [o.weight for o in layout.origins]
    wmax = max(weights) if weights else 1.0
    ax.scatter([o.lon for o in layout.origins], [o.lat for o in layout.origins],
               s=[6 + 40 * o.weight / wmax for o in layout.origins], c="#525252", alpha=0.5, zorder=3, linewidths=0)

    # Sites: tier -> marker, cards -> size, provider -> colour.
    providers = sorted({s.provider for s in layout.sites})
    colour_of = {p: _PROVIDER_COLOURS[i % len(_PROVIDER_COLOURS)] for i, p in enumerate(providers)}
    markers = {"hub": "s", "regional": "D", "edge": "o"}
    size = {s.id: 14 + 3.2 * math.sqrt(s.cards) for s in layout.sites}
    for tier in ("edge", "regional", "hub"):
        group = [s for s in layout.sites if s.tier == tier]
        if group:
            ax.scatter([s.lon for s in group], [s.lat for s in group], s=[size[s.id] for s in group], marker=markers[tier],
                       c=[colour_of[s.provider] for s in group], edgecolors="white", linewidths=0.8,
                       zorder=5 if tier != "edge" else 4)

    marked: dict[str, float] = {}
    for report in sorted(reports, key=lambda r: r.budget_ms):  # the widest budget missed wins
        for u in report.uncovered:
            marked[u.id] = report.budget_ms
    for oid, budget in marked.items():
        o = layout.origin(oid)
        big = budget >= 10
        ax.scatter([o.lon], [o.lat], marker="X", s=130 if big else 80, c="#d7301f" if big else "#fc8d59",
                   edgecolors="black", linewidths=0.6, zorder=6)

    _decorate(ax, fig, layout, reports, colour_of, providers, r5, r10)
    fig.tight_layout()
    fig.canvas.draw()  # fixes the axes' box (aspect, legend) so label boxes are measured where they end up

    # Labels last, placed around symbols (which they must not cover) and each other.
    labels = _Labels(ax, fig)
    points_per_px = 72 / fig.dpi
    for s in layout.sites:
        labels.block(s.lon, s.lat, math.sqrt(size[s.id]) / 2 / points_per_px + 1)
    for oid in marked:
        o = layout.origin(oid)
        labels.block(o.lon, o.lat, 7 / points_per_px)
    def gap(site_id: str) -> float:
        return math.sqrt(size[site_id]) / 2 + 2.5

    for s in sorted(layout.sites, key=lambda s: -s.cards):
        if s.tier == "hub":
            labels.place(f"{_short(s.name)}\n{s.cards:,} cards", s.lon, s.lat, gap(s.id), fontsize=8, weight="bold",
                         color="#08306b", zorder=8, linespacing=1.0)
        elif s.tier == "regional":
            labels.place(f"{_short(s.name)} {s.cards:,}", s.lon, s.lat, gap(s.id), fontsize=7, color="#08519c", zorder=8)
    # An edge pool in a city a hub or regional pool already names needs no label of its own.
    seen_cities: set[str] = {s.city for s in layout.sites if s.tier != "edge"}
    for s in layout.sites:
        if s.tier == "edge" and s.city not in seen_cities:
            seen_cities.add(s.city)
            try:
                city = layout.origin(s.city).name.split(" (")[0]
            except KeyError:
                city = s.city
            labels.place(city, s.lon, s.lat, gap(s.id), fontsize=6.3, color="#333333", zorder=7)
    for oid, budget in marked.items():
        o = layout.origin(oid)
        labels.place(f"{o.name.split(' (')[0]} > {budget:g} ms", o.lon, o.lat, 8.0, fontsize=7, color="#99000d", zorder=8)

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return out
