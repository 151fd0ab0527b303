"""The ``cpn`` command: ``main(argv) -> int``. One module per sub-command in ``commands/``.

Each command module has ``register(subparsers)`` which adds its parser and sets ``run`` to a
function ``run(args) -> int``. Command modules import their heavy dependencies inside ``run``, so
``cpn topology validate`` does not pay for aiohttp. Exit codes: 0 ok, 1 the check failed (e.g. an
invalid layout), 2 bad usage or input (one line on stderr saying why), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

from controlplane.core.errors import CpnError

COMMANDS = ["up", "hub", "agent", "tenant", "key", "site", "topology", "sim", "bench", "deploy", "chaos", "market"]


class PlainHelp(argparse.RawDescriptionHelpFormatter):
    """Help as a terminal shows it: module docstrings lose their reST markup (````x````, ``::``)."""

    def _format_text(self, text: str) -> str:
        return super()._format_text(_plain(text))

    def _expand_help(self, action: argparse.Action) -> str:
        return _plain(super()._expand_help(action))


def _plain(text: str) -> str:
    text = text.replace("``", "")
    text = re.sub(r":(?:func|class|mod|meth|data|attr):`~?([^`]+)`", r"\1", text)
    return re.sub(r"(\S)::$", r"\1:", text, flags=re.M)


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("cpn")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def _every_parser(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                out.extend(_every_parser(child))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpn", description="Control plane of a computing power network.")
    parser.add_argument("--version", action="version", version=f"cpn {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"controlplane.tools.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"controlplane.tools.commands.{name}":
                continue  # not built yet
            raise
        module.register(sub)
    for p in _every_parser(parser):
        p.formatter_class = PlainHelp
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
    except BrokenPipeError:  # `cpn ... | head`: the reader left; not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except CpnError as exc:
        print(f"cpn {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
