"""``cpn agent``: one site's agent (the work is in :mod:`edge_agent.cli`; this only registers it)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from edge_agent import cli

    p = sub.add_parser("agent", help="run one site's agent (--config site.toml, or flags)")
    cli.add_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from edge_agent import cli

    return cli.run_args(args)
