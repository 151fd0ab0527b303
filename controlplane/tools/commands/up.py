"""``cpn up``: the whole network on one machine (embedded NATS, hub, one simulated agent per site)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from controlplane.tools.commands.hub import add_gateway_flags


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("up", help="run the whole network locally: NATS, hub and a simulated agent per site")
    p.add_argument("--data-dir", default=".cpn", help="state directory (default ./.cpn)")
    p.add_argument("--port", type=int, default=8080, help="gateway port on 127.0.0.1 (default 8080, 0 = any free)")
    p.add_argument("--nats-port", type=int, default=4222, help="NATS port if free (default 4222, else any free port)")
    p.add_argument("--layout", help="layout file (default: the shipped national layout)")
    p.add_argument("--regions", type=int, default=0, metavar="N",
                   help="run the layout's first N regions as a NATS super-cluster: a gateway per region "
                        "(ports --port, --port+1, ...), a controller, each site on its own region's cluster")
    p.add_argument("--leaf-sites", action="store_true",
                   help="with --regions: each site behind a nats-server of its own, a leaf node of its region's "
                        "cluster (one more process per site)")
    p.add_argument("--ha", action="store_true",
                   help="no single hub: a 3-node NATS cluster and three hub processes on the replicated record "
                        "(gateways on --port, --port+1, --port+2; one leads), the agents")
    p.add_argument("--no-agents", action="store_true", help="start NATS and the hub only")
    p.add_argument("--time-scale", type=float, default=60.0, help="simulated seconds per second for sim training (default 60)")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR (default WARNING)")
    p.add_argument("--log-json", action="store_true", default=None, help="one JSON object per log line (or CPN_LOG_JSON=1)")
    add_gateway_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from controlplane import logs
    from controlplane.tools import up
    from controlplane.runtime import run_until_signalled

    if args.regions and not regions_ok(args):
        return 2
    if args.leaf_sites and not args.regions:
        print("cpn up: --leaf-sites needs --regions N (sites are leaf nodes of their region's cluster)",
              file=sys.stderr)
        return 2
    if args.regions and args.ha:
        print("cpn up: --ha and --regions: choose one", file=sys.stderr)
        return 2
    logs.setup(args.log_level or "WARNING", json_lines=args.log_json)
    os.umask(0o077)  # whatever this process writes (store, credentials, logs) is the operator's only
    opts = up.UpOptions(
        data_dir=Path(args.data_dir), port=args.port, nats_port=args.nats_port, layout=args.layout,
        agents=not args.no_agents, sim_time_scale=args.time_scale, regions=args.regions, leaf_sites=args.leaf_sites,
        tls_cert=args.tls_cert, tls_key=args.tls_key, trusted_proxies=tuple(args.trusted_proxy or ()),
    )
    if args.ha:
        from controlplane.tools import upha

        return run_until_signalled(upha.run(opts))
    if opts.regions:
        from controlplane.tools import upregions

        return run_until_signalled(upregions.run(opts))
    return run_until_signalled(up.run(opts))


def regions_ok(args: argparse.Namespace) -> bool:
    """``--regions N`` names between 1 and as many regions as the layout has (else one line on stderr)."""
    import sys

    from topology import loader

    layout = loader.load(args.layout) if args.layout else loader.load_default()
    if not 1 <= args.regions <= len(layout.regions):
        print(f"cpn up: --regions {args.regions}: the layout names {len(layout.regions)} region(s); "
              f"give 1 to {len(layout.regions)}", file=sys.stderr)
        return False
    return True
