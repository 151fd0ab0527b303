"""The ``cpn`` command: ``main(argv) -> int``. One module per sub-command in ``commands/``.

Each command module has ``register(subparsers)`` which adds its parser and sets ``run`` to a
function ``run(args) -> int``. Command modules import their heavy dependencies inside ``run``, so
``cpn topology validate`` does not pay for aiohttp. Exit codes: 0 ok, 1 the check failed (e.g. an
invalid layout), 2 bad usage or input (one line on stderr saying why), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from controlplane.core.errors import CpnError

COMMANDS = ["up", "hub", "agent", "tenant", "key", "site", "topology", "sim", "bench", "deploy", "chaos"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpn", description="Control plane of a computing power network.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"controlplane.tools.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"controlplane.tools.commands.{name}":
                continue  # not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run = getattr(args, "run", None)
    if run is None:
        parser.print_help()
        return 2
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except CpnError as exc:
        print(f"cpn {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
