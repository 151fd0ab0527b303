"""``cpn sim``: what the network will do over a simulated day, on the hub's own router and scheduler.

    cpn sim [--layout FILE | --synthetic SITES] [--hours 24] [--seed N] [--scenario NAME|FILE]
            [--json] [--out DIR]

Prints the summary table (or, with ``--json``, the report JSON) on stdout; with ``--out`` also
writes ``report.json``, ``report.txt`` and the PNG plots there. Progress goes to stderr: a bar on a
terminal, else a plain line every 10%. Exit codes: 0 ok; 2 bad input (unknown scenario, invalid scenario or layout,
missing matplotlib for ``--out``), one line on stderr saying why.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("sim", help="simulate a day of the network (inference, training, faults) against baselines")
    p.add_argument("--layout", metavar="FILE", help="layout TOML file (default: the shipped national layout)")
    p.add_argument("--synthetic", type=int, metavar="SITES",
                   help="use a synthetic layout of this many sites (origins = SITES / 10) instead")
    p.add_argument("--hours", type=float, help="simulated hours (default: the scenario's, 24); load scales with it")
    p.add_argument("--seed", type=int, default=0, help="seed of every random stream (default 0)")
    p.add_argument("--scenario", default="national-day", metavar="NAME|FILE",
                   help="a shipped scenario (national-day, edge-outage, tidal-lending) or a TOML file")
    p.add_argument("--json", action="store_true", help="print the report JSON (schema cpn.sim.report/1) instead of the table")
    p.add_argument("--out", metavar="DIR", help="write report.json, report.txt and PNG plots into DIR")
    p.set_defaults(run=run)


def _bar() -> Callable[[float], None]:
    from controlplane.progress import Progress

    return Progress("simulating")


def _fail(msg: str) -> int:
    print(f"cpn sim: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from controlplane.tools.sim import report, runner
    from controlplane.tools.sim.core_scenario import ScenarioError
    from topology import layout as tlayout
    from topology import loader, synth

    if args.hours is not None and not args.hours > 0:
        return _fail(f"--hours must be > 0, got {args.hours:g}")
    if args.layout and args.synthetic:
        return _fail("give --layout or --synthetic, not both")
    if args.synthetic is not None and args.synthetic < 10:
        return _fail(f"--synthetic needs at least 10 sites, got {args.synthetic}")
    out = Path(args.out) if args.out else None
    if out is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return _fail("--out draws plots and needs matplotlib: pip install 'cpn[map]'")
    try:
        scenario = runner.load_scenario(args.scenario)
    except ScenarioError as exc:
        return _fail(str(exc))
    try:
        if args.synthetic:
            lay = synth.generate(args.synthetic, max(1, args.synthetic // 10))
        else:
            lay = loader.load(args.layout) if args.layout else loader.load_default()
    except tlayout.LayoutError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return _fail(f"{args.layout}: invalid layout")
    try:
        result = runner.simulate(scenario, layout=lay, seed=args.seed, hours=args.hours, progress=_bar())
    except (ScenarioError, ValueError) as exc:
        return _fail(str(exc))
    table = report.text(result.report, result.timing)
    if args.json:
        sys.stdout.write(report.to_json(result.report, result.timing))
    else:
        sys.stdout.write(table)
    if out is not None:
        from controlplane.tools.sim import plots

        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(report.to_json(result.report, result.timing))
        (out / "report.txt").write_text(table)
        paths = plots.write(result.report, out)
        if not args.json:
            print(f"wrote {out / 'report.json'}, {out / 'report.txt'}, " + ", ".join(str(p) for p in paths))
    return 0
