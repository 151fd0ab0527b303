"""What ``cpn topology show`` prints: sites by tier, cards by accelerator and provider, tariffs.

Pure: a layout in, plain data (and text) out. The JSON form (schema ``cpn.topology.show/1``) keeps
its keys; new keys may be added.
"""

from __future__ import annotations

from typing import Any

from .layout import TIERS, Layout

SCHEMA = "cpn.topology.show/1"


def summarise(layout: Layout) -> dict[str, Any]:
    """Counts and figures of a layout as a JSON-ready dict (see docs/topology.md)."""
    units = {name: spec.units for name, spec in layout.accelerators.items()}
    tiers: dict[str, dict[str, Any]] = {}
    for tier in TIERS:
        sites = [s for s in layout.sites if s.tier == tier]
        tiers[tier] = {
            "sites": len(sites),
            "cities": len({s.city for s in sites}),
            "cards": sum(s.cards for s in sites),
            "units": round(sum(n * units[a] for s in sites for a, n in s.accelerators.items()), 1),
        }
    accelerators = {}
    for name, cards in layout.cards_by_accelerator().items():
        spec = layout.accelerators[name]
        accelerators[name] = {
            "vendor": spec.vendor, "cards": cards, "units_per_card": spec.units,
            "units": round(cards * spec.units, 1), "kw_per_card": spec.kw_per_card, "source": spec.source,
        }
    providers: dict[str, dict[str, int]] = {}
    for s in layout.sites:
        p = providers.setdefault(s.provider, {"sites": 0, "cards": 0})
        p["sites"] += 1
        p["cards"] += s.cards
    site_list = [
        {
            "id": s.id, "tier": s.tier, "city": s.city, "region": s.region, "provider": s.provider,
            "cards": s.cards, "accelerators": dict(s.accelerators), "pue": s.pue, "tee": s.tee,
            "tariff": {
                "flat_cny_per_kwh": s.tariff.flat_cny_per_kwh, "peak_cny_per_kwh": s.tariff.peak_cny_per_kwh,
                "valley_cny_per_kwh": s.tariff.valley_cny_per_kwh,
                "mean_cny_per_kwh": round(s.tariff.mean_cny_per_kwh(), 4),
            },
            "failure_rate_per_card_hour": s.failure_rate_per_card_hour,
        }
        for s in sorted(layout.sites, key=lambda s: (TIERS.index(s.tier), s.id))
    ]
    return {
        "schema": SCHEMA,
        "layout": layout.name,
        "description": layout.description,
        "sites": len(layout.sites),
        "origins": len(layout.origins),
        "links": len(layout.links),
        "tiers": tiers,
        "accelerators": accelerators,
        "providers": dict(sorted(providers.items())),
        "site_list": site_list,
        "illustrative": list(layout.illustrative),
        "regions": [
            {"id": r.id, "name": r.name, "cluster": r.cluster, "gateways": list(r.gateways),
             "provinces": list(r.provinces), "sites": sum(1 for x in layout.sites if x.region in r.provinces)}
            for r in layout.regions
        ],
    }


def format_text(summary: dict[str, Any]) -> str:
    """The summary as an operator reads it."""
    out = [
        f"layout {summary['layout']!r}: {summary['sites']} sites, {summary['origins']} origins, {summary['links']} backbone links",
        summary["description"],
        "",
        f"{'tier':<9} {'sites':>5} {'cities':>6} {'cards':>8} {'A800-units':>10}",
    ]
    for tier, t in summary["tiers"].items():
        out.append(f"{tier:<9} {t['sites']:>5} {t['cities']:>6} {t['cards']:>8} {t['units']:>10.0f}")
    out += ["", f"{'accelerator':<11} {'vendor':<7} {'cards':>7} {'units/card':>10} {'units':>9}"]
    for name, a in summary["accelerators"].items():
        out.append(f"{name:<11} {a['vendor']:<7} {a['cards']:>7} {a['units_per_card']:>10.2f} {a['units']:>9.0f}")
    out += ["", f"{'provider':<14} {'sites':>5} {'cards':>7}"]
    for name, p in summary["providers"].items():
        out.append(f"{name:<14} {p['sites']:>5} {p['cards']:>7}")
    out += ["", "tariffs (CNY/kWh, China local time) and PUE, hubs and regional pools:",
            f"{'site':<14} {'city':<12} {'flat':>5} {'peak':>5} {'valley':>6} {'mean':>5} {'PUE':>5}  TEE"]
    for s in summary["site_list"]:
        if s["tier"] == "edge":
            continue
        t = s["tariff"]
        out.append(
            f"{s['id']:<14} {s['city']:<12} {t['flat_cny_per_kwh']:>5.2f} {t['peak_cny_per_kwh']:>5.2f} "
            f"{t['valley_cny_per_kwh']:>6.2f} {t['mean_cny_per_kwh']:>5.2f} {s['pue']:>5.2f}  {'yes' if s['tee'] else 'no'}"
        )
    if summary.get("regions"):
        out += ["", f"{'region':<11} {'cluster':<11} {'sites':>5}  gateways; provinces"]
        for r in summary["regions"]:
            out.append(f"{r['id']:<11} {r['cluster']:<11} {r['sites']:>5}  {', '.join(r['gateways'])}; "
                       f"{', '.join(r['provinces'])}")
    edges = [s for s in summary["site_list"] if s["tier"] == "edge"]
    if edges:
        out += ["", f"edge pools ({len(edges)}): " + ", ".join(f"{s['id']} ({s['cards']})" for s in edges)]
    if summary["illustrative"]:
        out += ["", "illustrative figures (not measurements): " + "; ".join(summary["illustrative"])]
    return "\n".join(out) + "\n"
