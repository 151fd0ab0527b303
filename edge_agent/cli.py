"""``cpn agent``: run one site's agent until SIGINT/SIGTERM.

``cpn agent --config site.toml`` or flags (``--site``, ``--nats``, ``--cards H20=8,910B=4`` ...);
with both, the flags given override the file's top-level keys. The NATS password may also come
from the environment variable ``CPN_NATS_PASSWORD`` (kept out of ``ps``). ``--creds FILE`` takes
``creds/<site>.json`` of ``cpn deploy nats-config`` (connecting straight to the hub's NATS): its
server URLs, user, password and TLS files replace the file's; flags still win.

Exit codes: 0 after a clean stop, 2 on a bad config or flags (one line on stderr naming the key).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys


from edge_agent import config as agent_config
from edge_agent import gc_tuning, logs
from edge_agent.errors import ConfigError

_OVERRIDABLE = ("site", "nats", "tier", "city", "provider", "region", "user", "password", "data_dir")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``cpn agent`` flags (also used by ``controlplane/tools/commands/agent.py``)."""
    parser.add_argument("--config", help="site TOML file (see deploy/site.example.toml)")
    parser.add_argument("--site", help="site id")
    parser.add_argument("--nats", action="append", help="NATS server URL (repeatable)")
    parser.add_argument("--cards", default=None, help="accelerators, e.g. H20=8,910B=4")
    parser.add_argument("--tier", choices=["hub", "regional", "edge"])
    parser.add_argument("--city")
    parser.add_argument("--provider")
    parser.add_argument("--region")
    parser.add_argument("--user", help="NATS user")
    parser.add_argument("--password", help="NATS password (or set CPN_NATS_PASSWORD)")
    parser.add_argument("--creds", metavar="FILE",
                        help="creds/<site>.json from `cpn deploy nats-config`: servers, user, password, TLS files "
                             "(direct connection to the hub's NATS; not with a leaf node at the site)")
    parser.add_argument("--backend", choices=["sim", "openai-http"])
    parser.add_argument("--backend-url", help="base URL of the local OpenAI-compatible server")
    parser.add_argument("--model", action="append", default=[], metavar="NAME[:cards[:slots]]",
                        help="model to preload (repeatable)")
    parser.add_argument("--data-dir", help="directory for the event outbox and checkpoints")
    parser.add_argument("--heartbeat-s", type=float)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-json", action="store_true", default=None,
                        help="one JSON object per log line (default: key=value; or set CPN_LOG_JSON=1)")


def config_from_args(args: argparse.Namespace) -> agent_config.AgentConfig:
    """Build the config from parsed flags (and the file, when ``--config`` is given).

    Raises:
        ConfigError: naming the key or flag that is wrong.
    """
    password = args.password if args.password is not None else os.environ.get("CPN_NATS_PASSWORD")
    nats = (args.nats[0] if len(args.nats) == 1 else args.nats) if args.nats else None
    creds = agent_config.read_creds(args.creds) if getattr(args, "creds", None) else {}
    if args.config or creds:
        base = agent_config.to_dict(agent_config.load(args.config)) if args.config else {}
        if creds:
            if base.get("site") not in (None, creds["site"]) or args.site not in (None, creds["site"]):
                raise ConfigError(f"--creds: {args.creds} holds site {creds['site']!r}'s credentials, "
                                  f"not {args.site or base.get('site')!r}'s")
            base.update(creds)
        overrides = {"site": args.site, "nats": nats, "tier": args.tier, "city": args.city,
                     "provider": args.provider, "region": args.region, "user": args.user,
                     "password": password, "data_dir": args.data_dir, "heartbeat_s": args.heartbeat_s}
        base.update({k: v for k, v in overrides.items() if v is not None})
        if args.cards is not None:
            base["accelerators"] = agent_config.parse_cards(args.cards)
        if args.model:
            base["models"] = [agent_config.parse_model(m) for m in args.model]
        backend = dict(base.get("backend") or {})  # type: ignore[call-overload]
        if args.backend:
            backend["kind"] = args.backend
        if args.backend_url:
            backend["openai-http"] = {**backend.get("openai-http", {}), "url": args.backend_url}
        base["backend"] = backend
        return agent_config.from_dict(base, args.config or args.creds)
    if not args.site:
        raise ConfigError("--site: required when no --config is given")
    return agent_config.from_flags(
        site=args.site, nats=nats or "nats://127.0.0.1:4222", cards=args.cards or "", tier=args.tier or "edge",
        city=args.city or "", provider=args.provider or "", region=args.region or "", user=args.user or "",
        password=password or "", backend=args.backend or "sim", backend_url=args.backend_url or "",
        models=args.model, data_dir=args.data_dir or "", heartbeat_s=args.heartbeat_s or 1.0,
    )


async def serve(config: agent_config.AgentConfig) -> None:
    """Run one agent until SIGINT or SIGTERM, then stop it (draining) and return."""
    from edge_agent.agent import Agent

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    agent = Agent(config)
    starting = asyncio.create_task(agent.start())
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # a start-up error surfaces here
            gc_tuning.settle_after_startup()
            await stopping
    finally:
        for task in (starting, stopping):
            task.cancel()
        await asyncio.gather(starting, stopping, return_exceptions=True)
        await agent.stop(drain=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run_args(args: argparse.Namespace) -> int:
    """Run ``cpn agent`` from parsed arguments; returns the exit code."""
    logs.setup(args.log_level, json_lines=args.log_json)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"cpn agent: bad config: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``cpn agent`` as a function: parse ``argv``, run until a signal, return the exit code."""
    parser = argparse.ArgumentParser(prog="cpn agent", description="Run one site's agent.")
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse prints its own one-line reason
        return int(exc.code or 0)
    return run_args(args)


if __name__ == "__main__":
    sys.exit(main())
