"""``cpn topology validate|show|coverage|map``: look at a layout before the hub routes with it.

Exit codes (controlplane/cli.py): 0 ok; 1 the layout is invalid (every problem printed on stderr as
``FILE[:LINE]: ENTRY: REASON``); 2 bad usage or input (one line on stderr saying why, e.g. a missing
optional dependency or a non-positive budget).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("topology", help="validate, show, analyse coverage of, or map a network layout")
    tsub = p.add_subparsers(dest="topology_command", metavar="ACTION", required=True)

    v = tsub.add_parser("validate", help="check a layout file; exit 1 with every problem if invalid")
    _layout_arg(v)
    # Deprecated: `cpn topology validate FILE` (before every topology command took --layout).
    v.add_argument("file", nargs="?", help=argparse.SUPPRESS)
    v.add_argument("--json", action="store_true", help="machine-readable result (schema cpn.topology.validate/1)")
    v.set_defaults(run=run_validate)

    s = tsub.add_parser("show", help="sites by tier, cards by accelerator, tariffs")
    _layout_arg(s)
    s.add_argument("--json", action="store_true", help="machine-readable output (schema cpn.topology.show/1)")
    s.set_defaults(run=run_show)

    c = tsub.add_parser("coverage", help="demand served within an RTT budget, from how many cities; the holes")
    _layout_arg(c)
    c.add_argument("--budget", type=float, default=5.0, metavar="MS", help="RTT budget in ms (default 5)")
    c.add_argument("--tiers", default="hub,regional,edge", help="site tiers that count (default all)")
    c.add_argument("--gateways", metavar="CITY,CITY,...",
                   help="gateway cities (origin ids) for the full path origin -> nearest gateway -> site "
                        "(default: the layout's gateways; 'none' skips the full path)")
    c.add_argument("--json", action="store_true", help="stable JSON (schema cpn.topology.coverage/1, docs/topology.md)")
    c.set_defaults(run=run_coverage)

    m = tsub.add_parser("map", help="draw the layout to a PNG (needs matplotlib: pip install 'cpn[map]')")
    _layout_arg(m)
    m.add_argument("--out", required=True, metavar="FILE.png", help="PNG file to write")
    m.set_defaults(run=run_map)


def _layout_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", metavar="FILE", help="layout TOML file (default: the shipped national layout)")


def _load(path: str | None) -> Any:
    """The layout, or None after printing why it is unusable."""
    from topology import layout, loader

    try:
        return loader.load(path) if path else loader.load_default()
    except layout.LayoutError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return None


def _invalid_code(path: str | None) -> int:
    # A file that cannot be read at all is bad input (2); one that reads but is wrong is invalid (1).
    import pathlib

    if path is not None and not pathlib.Path(path).is_file():
        return 2
    return 1


def run_validate(args: argparse.Namespace) -> int:
    from topology import latency, loader

    if args.file is not None:
        if args.layout is not None and args.layout != args.file:
            print("cpn topology validate: give the layout once, as --layout FILE", file=sys.stderr)
            return 2
        print("cpn topology validate: a positional FILE is deprecated; use --layout FILE", file=sys.stderr)
    path = args.layout or args.file
    shown = path or str(loader.default_path())
    lay = _load(path)
    if lay is None:
        print(f"cpn topology validate: {shown}: invalid", file=sys.stderr)
        return _invalid_code(path)
    idx = latency.RttIndex.build(lay)
    unreachable = sum(1 for o in idx.origins if len(idx.ranked(o)) < len(idx.sites))
    if args.json:
        import json

        print(json.dumps({"schema": "cpn.topology.validate/1", "file": shown, "ok": True, "layout": lay.name,
                          "sites": len(lay.sites), "origins": len(lay.origins), "links": len(lay.links),
                          "origins_not_reaching_every_site": unreachable}, indent=2, ensure_ascii=False))
        return 0
    print(
        f"{shown}: ok: layout {lay.name!r}, {len(lay.sites)} sites, {len(lay.origins)} origins, "
        f"{len(lay.links)} links" + (f"; {unreachable} origins cannot reach every site" if unreachable else "")
    )
    return 0


def run_show(args: argparse.Namespace) -> int:
    from topology import summary

    lay = _load(args.layout)
    if lay is None:
        return _invalid_code(args.layout)
    data = summary.summarise(lay)
    if args.json:
        import json

        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        sys.stdout.write(summary.format_text(data))
    return 0


def _tiers(value: str) -> list[str] | None:
    from topology.layout import TIERS

    tiers = [t.strip() for t in value.split(",") if t.strip()]
    bad = [t for t in tiers if t not in TIERS]
    if bad or not tiers:
        print(f"cpn topology coverage: --tiers wants a comma list of {', '.join(TIERS)}; got {value!r}", file=sys.stderr)
        return None
    return tiers


def run_coverage(args: argparse.Namespace) -> int:
    from topology import coverage, ingress, latency

    if not args.budget > 0:
        print(f"cpn topology coverage: --budget must be > 0 ms, got {args.budget:g}", file=sys.stderr)
        return 2
    tiers = _tiers(args.tiers)
    if tiers is None:
        return 2
    lay = _load(args.layout)
    if lay is None:
        return _invalid_code(args.layout)
    idx = latency.RttIndex.build(lay)
    report = coverage.analyse(lay, idx, args.budget, tiers)
    full = _ingress(lay, idx, args, tiers)
    if full is False:
        return 2
    if args.json:
        import json

        doc = json.loads(coverage.to_json(report))
        if full is not None:
            doc["ingress"] = json.loads(ingress.to_json(full))
        print(json.dumps(doc, indent=2, ensure_ascii=False))
    else:
        sys.stdout.write(coverage.format_text(report))
        if full is not None:
            sys.stdout.write("\n" + ingress.format_text(full))
    return 0


def _ingress(lay: Any, idx: Any, args: argparse.Namespace, tiers: list[str]) -> Any:
    """The full-path report, None when there are no gateways to use, False after a usage error."""
    from topology import ingress

    if args.gateways is None:
        gateways = lay.gateways()
        if not gateways:
            return None
    elif args.gateways.strip().lower() == "none":
        return None
    else:
        gateways = [g.strip() for g in args.gateways.split(",") if g.strip()]
    try:
        return ingress.analyse(lay, idx, args.budget, gateways, tiers)
    except ingress.IngressError as exc:
        print(f"cpn topology coverage: --gateways: {exc}", file=sys.stderr)
        return False


def run_map(args: argparse.Namespace) -> int:
    from topology import coverage, latency

    try:
        from topology import mapplot

        import matplotlib  # noqa: F401
    except ImportError:
        from topology.mapplot import INSTALL_HINT

        print(f"cpn topology map: {INSTALL_HINT}", file=sys.stderr)
        return 2
    if not args.out.lower().endswith(".png"):
        print(f"cpn topology map: --out must name a .png file, got {args.out!r}", file=sys.stderr)
        return 2
    lay = _load(args.layout)
    if lay is None:
        return _invalid_code(args.layout)
    idx = latency.RttIndex.build(lay)
    reports = [coverage.analyse(lay, idx, b) for b in (5.0, 10.0)]
    path = mapplot.render(lay, reports, args.out)
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0
