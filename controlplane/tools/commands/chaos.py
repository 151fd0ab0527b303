"""``cpn chaos``: a bounded chaos loop against a real local network, then invariant checks.

Progress goes to stderr; the results go to stdout, and to files only when asked (``--results``,
``--readme``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("chaos", help="inject faults into a local network under load and check invariants")
    p.add_argument("--seconds", type=float, default=60.0, help="length of the fault phase (default 60)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--jobs", type=int, default=8, help="training jobs submitted during the run")
    p.add_argument("--ha", action="store_true",
                   help="on the cpn up --ha rig (3 hub processes, 3 NATS nodes): leader kill, gateway kill, "
                        "NATS node kill and pause, with the takeover time per fault")
    p.add_argument("--data-dir", type=Path, help="keep state here instead of a temporary directory")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    p.add_argument("--results", type=Path, metavar="FILE", help="also write the results JSON to FILE")
    p.add_argument("--readme", action="store_true",
                   help="record this run as the chaos benchmark and rewrite the README's benchmark table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from controlplane.tools import chaos
    from controlplane import logs

    logs.setup("ERROR")
    if args.ha:
        from controlplane.tools import chaosha

        return chaosha.main(chaosha.HaChaosOptions(seconds=args.seconds, seed=args.seed, jobs=args.jobs,
                                                   data_dir=args.data_dir), as_json=args.json, results=args.results,
                            readme=args.readme)
    return chaos.main(chaos.ChaosOptions(seconds=args.seconds, seed=args.seed, jobs=args.jobs, data_dir=args.data_dir),
                      as_json=args.json, results=args.results, readme=args.readme)
