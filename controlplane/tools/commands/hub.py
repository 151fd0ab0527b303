"""``cpn hub``, ``cpn gateway``, ``cpn controller``: a hub process against a NATS server or cluster.

``cpn hub`` is the gateway and the controller in one process (the default, on its SQLite file or
on the replicated record). ``cpn gateway`` serves tenants' HTTP only and ``cpn controller`` decides
without HTTP; both share the replicated record (``--record nats``, their default) with the others,
and controllers elect one leader among themselves.
"""

from __future__ import annotations

import argparse
import os


ROLES = {
    "hub": "run the hub (gateway, routing, scheduling) against NATS",
    "gateway": "run a gateway only (tenants' HTTP, routing) on the replicated record",
    "controller": "run a controller only (scheduling, deployments; one leads) on the replicated record",
}


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    for role, text in ROLES.items():
        p = sub.add_parser(role, help=text)
        _flags(p)
        p.set_defaults(run=run, role=role)


def _flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="hub TOML config (flags override it)")
    p.add_argument("--nats", help="NATS URL(s), comma separated (default nats://127.0.0.1:4222)")
    p.add_argument("--nats-user")
    p.add_argument("--nats-password")
    p.add_argument("--creds", metavar="FILE",
                   help="creds/hub.json from `cpn deploy nats-config`: NATS URLs, user, password and TLS files "
                        "(over the config file; other flags win)")
    p.add_argument("--nats-tls-ca", help="CA file that signed the NATS servers' certificates (TLS on)")
    p.add_argument("--nats-tls-cert", help="client certificate for NATS servers that verify clients")
    p.add_argument("--nats-tls-key", help="private key of --nats-tls-cert")
    p.add_argument("--db", help="SQLite database path (default .cpn/hub.db)")
    p.add_argument("--listen", help="HOST:PORT of the HTTP gateway (default 127.0.0.1:8080)")
    p.add_argument("--layout", help="layout file (default: the shipped national layout)")
    p.add_argument("--hub-id")
    p.add_argument("--gateway-city", metavar="CITY",
                   help="the layout city (origin id) where this gateway stands: route and report on the full path")
    p.add_argument("--create-admin-key", action="store_true", help="print a new admin key on start")
    p.add_argument("--record", choices=["sqlite", "nats"],
                   help="where the record lives: sqlite (the --db file alone; cpn hub's default) or nats (the "
                        "replicated CPN_RECORD bucket shared by every hub process; --db is then this process's "
                        "projection; cpn gateway's and cpn controller's default)")
    p.add_argument("--record-nats", metavar="URLS",
                   help="NATS URL(s) of the cluster holding the record, comma separated (default: --nats)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (default: CPN_LOG, else INFO)")
    p.add_argument("--log-json", action="store_true", default=None, help="one JSON object per log line (or CPN_LOG_JSON=1)")
    add_gateway_flags(p)


def add_gateway_flags(p: argparse.ArgumentParser) -> None:
    """``--tls-cert/--tls-key`` and ``--trusted-proxy`` (``cpn hub`` and ``cpn up``)."""
    p.add_argument("--tls-cert", help="PEM certificate chain: the gateway serves HTTPS (TLS >= 1.2); needs --tls-key")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--trusted-proxy", action="append", metavar="CIDR",
                   help="a reverse proxy whose X-Forwarded-For is believed (repeatable)")


def parse_listen(value: str) -> tuple[str, int]:
    from controlplane.core.errors import RequestError

    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise RequestError(f"--listen wants HOST:PORT, got {value!r}")
    return host or "127.0.0.1", int(port)


def creds_overrides(path: str) -> dict[str, object]:
    """Hub config fields from a credentials file of ``cpn deploy nats-config`` (``creds/hub.json``).

    Raises:
        RequestError: the file is missing or not a credentials file (naming the field).
    """
    from pathlib import Path

    import msgspec

    from controlplane.nats import natsconf
    from controlplane.core.errors import RequestError

    try:
        creds = natsconf.read_credentials_file(Path(path).read_bytes())
    except OSError as exc:
        raise RequestError(f"--creds {path}: {exc.strerror or exc}") from None
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise RequestError(f"--creds {path}: {exc}") from None
    if creds.site:
        raise RequestError(f"--creds {path}: these are site {creds.site!r}'s credentials, not the hub's")
    fields: dict[str, object] = {"nats_user": creds.user, "nats_password": creds.password,
                                 "nats_tls_ca": creds.tls_ca or None, "nats_tls_cert": creds.tls_cert or None,
                                 "nats_tls_key": creds.tls_key or None}
    if creds.nats:
        fields["nats_url"] = ",".join(creds.nats)
    return {k: v for k, v in fields.items() if v is not None}


def run(args: argparse.Namespace) -> int:
    from controlplane import logs
    from controlplane.config import HubConfig, load_hub_config
    from controlplane.runtime import run_until_signalled

    logs.setup(args.log_level, json_lines=args.log_json)
    os.umask(0o077)  # whatever this process writes (the database and its WAL) is the operator's only
    overrides: dict[str, object] = creds_overrides(args.creds) if args.creds else {}
    overrides |= {k: v for k, v in {
        "nats_tls_ca": args.nats_tls_ca, "nats_tls_cert": args.nats_tls_cert, "nats_tls_key": args.nats_tls_key,
        "nats_url": args.nats, "nats_user": args.nats_user, "nats_password": args.nats_password,
        "db_path": args.db, "layout": args.layout, "hub_id": args.hub_id, "gateway_city": args.gateway_city,
        "record": args.record or (None if args.role == "hub" else "nats"), "role": args.role,
        "record_nats_urls": [u.strip() for u in args.record_nats.split(",") if u.strip()] if args.record_nats else None,
        "tls_cert": args.tls_cert, "tls_key": args.tls_key,
        "trusted_proxies": tuple(args.trusted_proxy) if args.trusted_proxy else None,
    }.items() if v is not None}
    if args.listen:
        host, port = parse_listen(args.listen)
        overrides.update(listen_host=host, listen_port=port)
    if args.config:
        config = load_hub_config(args.config, **overrides)
    else:
        try:
            config = HubConfig(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
        except ValueError as exc:
            from controlplane.core.errors import RequestError

            raise RequestError(str(exc)) from None

    async def main() -> None:
        from controlplane.compose import build_hub, record_urls
        from edge_agent import gc_tuning

        hub = build_hub(config)
        await hub.start(serve_http=config.role != "controller")
        try:
            if args.create_admin_key:
                print(f"admin key: {hub.create_admin_key('cli')}", flush=True)
            if config.role == "controller":
                print(f"cpn controller {config.hub_id} running (record on {', '.join(record_urls(config))})", flush=True)
            else:
                print(f"cpn {config.role} {config.hub_id} listening on {hub.http_scheme}://{config.listen_host}:"
                      f"{hub.http_port}", flush=True)
            gc_tuning.settle_after_startup()
            await yield_forever()
        finally:
            await hub.stop()

    return run_until_signalled(main())


async def yield_forever() -> None:
    import asyncio

    await asyncio.Event().wait()
