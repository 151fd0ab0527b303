"""``cpn bench route|gateway|scheduler|heartbeat|submissions|all``: the architecture §10 budgets, measured.

Each benchmark prints its figures and ratios and writes JSON to ``bench/results/``;
``--readme`` rewrites the table in README.md between the ``bench-table`` markers.
``cpn bench gateway --peers`` (cpn next to vllm-router and sglang-router, bench/peers.py) writes
``gateway_peers.json``; with ``--readme`` it rewrites only the ``bench-peers`` section.
"""

from __future__ import annotations

import argparse
import importlib

BENCHES = ["route", "gateway", "scheduler", "heartbeat", "sim"]
ON_REQUEST = ["submissions", "regions", "takeover"]
"""Run only when named (not by ``all``): ``submissions`` starts a NATS cluster and four hub processes,
``regions`` a NATS super-cluster, a gateway per region and every site's agent, ``takeover`` the
rig of ``cpn up --ha`` and SIGKILLs its leader."""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("bench", help="benchmarks of the performance budgets (architecture §10)")
    p.add_argument("name", nargs="?", choices=[*BENCHES, *ON_REQUEST, "all", "table"],
                   help="which benchmark ('table' prints the README table)")
    p.add_argument("--readme", action="store_true", help="update the README table from bench/results/*.json")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to the benchmark")
    p.set_defaults(run=run, parser=p)


def run(args: argparse.Namespace) -> int:
    if args.name is None:  # `cpn bench` alone: say what it can do
        args.parser.print_help()
        return 2
    from bench import table

    if "--readme" in args.rest:  # REMAINDER swallows flags given after the name
        args.rest = [a for a in args.rest if a != "--readme"]
        args.readme = True
    peers = args.name == "gateway" and "--peers" in args.rest
    names = BENCHES if args.name == "all" else ([] if args.name == "table" else [args.name])
    code = 0
    for name in names:
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as exc:
            print(f"bench {name}: not available ({exc.name})")
            code = 1
            continue
        code |= int(module.main(args.rest if args.name != "all" else []) or 0)
    if code == 2 and args.name != "all":  # a one-line reason was printed (e.g. wrk missing)
        return code
    if not peers:  # the peers bench prints its own table
        print(table.render())
    if args.readme:
        table.update_readme(peers_only=peers)  # a peers run leaves the other rows as they are
    return code
