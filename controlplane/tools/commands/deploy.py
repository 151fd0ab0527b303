"""``cpn deploy nats-config``: nats-server configs and per-site credentials for a deployment.

Writes, under ``--out DIR``::

    single/nats-server.conf      one server (JetStream R1), clients and leaf nodes of every site
    cluster/node-{1,2,3}.conf    a 3-node JetStream cluster (the hub creates CPN_EVENTS with R3)
    leaf/<site>.conf             the nats-server at each site, a leaf node of the hub's NATS
    supercluster/<region>/<region>-node-{1,2,3}.conf
                                 with a --layout that names regions: one 3-node cluster per region
                                 (JetStream server tag region:<id>), joined by gateways (TLS)
    supercluster/leaf/<site>.conf  the site's leaf node, dialling its own region's nodes
    creds/hub.json               the hub's identity
    ha/hub-{1,2,3}.toml, ha/cpn-hub.service, ha/compose.yaml
                                 three hub hosts: a cpn hub on the replicated record next to each
                                 cluster node (systemd unit, or a compose project per host)
    creds/<site>.json            each site's identity
    tls/ca.pem, tls/ca-key.pem   the deployment's CA (keep ca-key.pem off the servers)
    tls/<name>.pem, -key.pem     certificates: single, node-N (servers), hub, site-<s>, leaf-<s>
    README.md                    what goes where

Every link is TLS (clients, routes, gateways, leaf connections); configs name the certificate
files under ``--tls-dir`` (where they are installed on each host; default DIR/tls, absolute).
Server certificates carry the cluster hosts and every ``--server-name`` as SANs: list every
name and address clients dial. An existing CA in DIR/tls is reused (certificates it signed stay
valid); the other certificates are made anew on every run.

Every file but the README and ca.pem is mode 0600 (DIR 0700): leaf and cluster configs and the creds hold
plain passwords; the server configs hold bcrypt hashes of the user passwords. Passwords are
fresh random (``secrets``) unless ``--secret-file`` derives them reproducibly. An existing
``DIR/creds`` is not overwritten without ``--force`` (that rotates every credential).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from controlplane.core.errors import RequestError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("deploy", help="generate deployment files (nats-server configs, credentials)")
    dsub = p.add_subparsers(dest="deploy_command", metavar="WHAT", required=True)
    n = dsub.add_parser(
        "nats-config", help="nats-server configs (single, 3-node cluster, leaf per site) and per-site credentials",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = n.add_mutually_exclusive_group(required=True)
    src.add_argument("--layout", help="layout file; one identity per site in it")
    src.add_argument("--sites", help="comma-separated site ids (instead of a layout)")
    n.add_argument("--out", required=True, help="output directory")
    n.add_argument("--hub-url", action="append", default=[], metavar="URL",
                   help="leaf-node URL of the hub's NATS, repeatable (default: nats-leaf://node-N:7422)")
    n.add_argument("--cluster-host", action="append", default=[], metavar="HOST",
                   help="host of cluster node N, give 3 (default: node-1, node-2, node-3)")
    n.add_argument("--secret-file", help="derive every password from this secret (same secret, same files)")
    n.add_argument("--bcrypt-cost", type=int, default=None, help="bcrypt work factor for server-side hashes")
    n.add_argument("--force", action="store_true", help="overwrite existing credentials (rotates them all)")
    n.add_argument("--tls-dir", default=None, metavar="PATH",
                   help="where the certificate files are installed on each host, as the configs name them "
                        "(default: DIR/tls, absolute: the files work where they were written)")
    n.add_argument("--server-name", action="append", default=[], metavar="NAME",
                   help="extra host name or IP address in the servers' certificates, repeatable")
    n.add_argument("--gateway", action="append", default=[], metavar="NAME=URL[,URL]",
                   help="another cluster to link by gateway (TLS, mutual), repeatable")
    from controlplane.nats import natsconf

    n.add_argument("--client-url", action="append", default=[], metavar="URL",
                   help="client URL of the hub's NATS written into creds/*.json, repeatable "
                        "(default: tls://<cluster host>:<client port> for each cluster host)")
    n.add_argument("--listen-host", default="0.0.0.0", metavar="ADDR",
                   help="address the hub-side servers listen on (clients, leaf nodes, routes, gateways; default 0.0.0.0)")
    n.add_argument("--client-port", type=int, default=natsconf.DEFAULT_CLIENT_PORT, metavar="PORT",
                   help=f"client port of the hub-side servers (default {natsconf.DEFAULT_CLIENT_PORT})")
    n.add_argument("--leaf-port", type=int, default=natsconf.DEFAULT_LEAFNODE_PORT, metavar="PORT",
                   help=f"leaf-node port of the hub-side servers (default {natsconf.DEFAULT_LEAFNODE_PORT})")
    n.add_argument("--cluster-port", type=int, default=natsconf.DEFAULT_CLUSTER_PORT, metavar="PORT",
                   help=f"route port between cluster nodes (default {natsconf.DEFAULT_CLUSTER_PORT})")
    n.add_argument("--gateway-port", type=int, default=natsconf.DEFAULT_GATEWAY_PORT, metavar="PORT",
                   help=f"gateway port of the cluster nodes, with --gateway (default {natsconf.DEFAULT_GATEWAY_PORT})")
    n.add_argument("--monitor", default=natsconf.DEFAULT_MONITOR, metavar="HOST:PORT",
                   help=f"HTTP monitoring address of the hub-side servers; 'off' for none (default {natsconf.DEFAULT_MONITOR})")
    n.add_argument("--store-dir", default=natsconf.DEFAULT_STORE_DIR, metavar="PATH",
                   help=f"JetStream store directory of the hub-side servers (default {natsconf.DEFAULT_STORE_DIR})")
    n.add_argument("--site-listen", default=natsconf.DEFAULT_SITE_LISTEN, metavar="HOST:PORT",
                   help=f"where each site's leaf server listens for its agent (default {natsconf.DEFAULT_SITE_LISTEN})")
    n.set_defaults(run=run_nats_config)


def _gateways(specs: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, urls = spec.partition("=")
        if not sep or not name or not urls:
            raise RequestError(f"--gateway wants NAME=URL[,URL], got {spec!r}", field="gateway")
        out[name] = [u.strip() for u in urls.split(",") if u.strip()]
    return out


def _site_ids(args: argparse.Namespace) -> list[str]:
    if args.sites is not None:
        return [s.strip() for s in args.sites.split(",") if s.strip()]
    from topology import layout as topo_layout
    from topology import loader

    try:
        return [site.id for site in loader.load(args.layout).sites]
    except topo_layout.LayoutError as exc:
        raise RequestError(f"--layout: {exc}", field="layout") from None


def _site_regions(args: argparse.Namespace) -> dict[str, str]:
    """Site id -> region id from the layout's regions (empty without --layout or regions)."""
    if args.layout is None:
        return {}
    from topology import loader

    lay = loader.load(args.layout)  # already validated by _site_ids
    return {s.id: r for s in lay.sites if (r := lay.region_of_site(s.id)) is not None}


def _supercluster(out: Path, creds: object, site_regions: dict[str, str], tls_dir: str) -> list[str]:
    """Write the super-cluster's configs; return the node names (their certificates are issued by the caller)."""
    from controlplane.nats import natsconf
    from controlplane.nats import natsregions

    region_ids = list(dict.fromkeys(site_regions.values()))
    nodes = natsregions.default_nodes(region_ids)
    names = [n.name for ns in nodes.values() for n in ns]
    confs = natsregions.supercluster_configs(
        creds, nodes, tls={n: natsconf.tls_files(tls_dir, n) for n in names})  # type: ignore[arg-type]
    for rid, by_node in confs.items():
        for name, text in by_node.items():
            _write(out / "supercluster" / rid / f"{name}.conf", text)
    for site, rid in site_regions.items():
        _write(out / "supercluster" / "leaf" / f"{site}.conf", natsconf.leaf_config(
            site, natsregions.leaf_urls(nodes[rid], tls=True), creds.sites[site],  # type: ignore[attr-defined]
            tls=natsconf.tls_files(tls_dir, natsconf.leaf_user(site))))
    return names


def _write(path: Path, data: bytes | str, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask, and an old file keeps its own
        os.write(fd, raw)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _host_of(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url if "://" in url else f"x://{url}").hostname or ""


def _certificates(out: Path, sites: list[str], hosts: list[str], extra: list[str],
                  region_nodes: tuple[str, ...] | list[str] = ()) -> None:
    """The CA (reused if DIR/tls has one) and every certificate of the deployment."""
    import datetime as dt

    from controlplane.nats import natscerts, natsconf

    tls = out / "tls"
    now = dt.datetime.now(dt.timezone.utc)
    if (tls / "ca.pem").exists() and (tls / "ca-key.pem").exists():
        ca = natscerts.Pem((tls / "ca-key.pem").read_bytes(), (tls / "ca.pem").read_bytes())
    else:
        ca = natscerts.make_ca(now)
        _write(tls / "ca-key.pem", ca.key)
        _write(tls / "ca.pem", ca.cert, mode=0o644)

    def issue(name: str, names: list[str], server: bool) -> None:
        pem = natscerts.make_cert(ca, now, name, names, server=server)
        _write(tls / f"{name}-key.pem", pem.key)
        _write(tls / f"{name}.pem", pem.cert, mode=0o644)

    issue("single", [*hosts, *extra], True)
    for i, host in enumerate(hosts, 1):
        issue(f"node-{i}", [host, *extra], True)
    for name in region_nodes:
        issue(name, [name, *extra], True)
    issue(natsconf.HUB_USER, [natsconf.HUB_USER], False)
    for site in sites:
        issue(natsconf.site_user(site), [natsconf.site_user(site)], False)
        issue(natsconf.leaf_user(site), [natsconf.leaf_user(site)], False)


def run_nats_config(args: argparse.Namespace) -> int:
    import secrets

    from controlplane.nats import natsconf

    sites = _site_ids(args)
    if not sites:
        raise RequestError("no sites: give --layout FILE or --sites a,b,c", field="sites")
    out = Path(args.out)
    if (out / "creds").exists() and not args.force:
        raise RequestError(f"{out / 'creds'} exists; --force regenerates every credential (sites must be updated)",
                           field="out")
    cost = {} if args.bcrypt_cost is None else {"bcrypt_cost": args.bcrypt_cost}
    try:
        if args.secret_file:
            creds = natsconf.derive_credentials(sites, Path(args.secret_file).read_bytes().strip(), **cost)
        else:
            creds = natsconf.generate_credentials(sites, secrets.token_bytes, **cost)
        hosts = args.cluster_host or ["node-1", "node-2", "node-3"]
        tls_dir = args.tls_dir or str((out / "tls").resolve())
        node_tls = {f"node-{i}": natsconf.tls_files(tls_dir, f"node-{i}") for i in range(1, len(hosts) + 1)}
        monitor = None if args.monitor in ("", "off", "none") else args.monitor
        cluster = natsconf.cluster_configs(
            creds, hosts=hosts, tls=node_tls, gateways=_gateways(args.gateway), listen_host=args.listen_host,
            client_port=args.client_port, cluster_port=args.cluster_port, leafnode_port=args.leaf_port,
            gateway_port=args.gateway_port, monitor=monitor, store_dir=args.store_dir)
        hub_urls = args.hub_url or [f"tls://{h}:{args.leaf_port}" for h in hosts]
        leaves = {site: natsconf.leaf_config(site, hub_urls, creds.sites[site], listen=args.site_listen,
                                             tls=natsconf.tls_files(tls_dir, natsconf.leaf_user(site)))
                  for site in sites}
    except (ValueError, OSError) as exc:
        raise RequestError(str(exc)) from None
    client_urls = args.client_url or [f"tls://{h}:{args.client_port}" for h in hosts]
    extra_names = [*args.server_name, *(h for h in map(_host_of, [*hub_urls, *client_urls]) if h)]

    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    site_regions = _site_regions(args)
    region_nodes = _supercluster(out, creds, site_regions, tls_dir) if site_regions else []
    _certificates(out, sites, hosts, [n for n in extra_names if n not in hosts], region_nodes)
    _write(out / "single" / "nats-server.conf", natsconf.single_server_config(
        creds, tls=natsconf.tls_files(tls_dir, "single"), host=args.listen_host, port=args.client_port,
        leafnode_port=args.leaf_port, monitor=monitor, store_dir=args.store_dir))
    for name, text in cluster.items():
        _write(out / "cluster" / f"{name}.conf", text)
    for site, text in leaves.items():
        _write(out / "leaf" / f"{site}.conf", text)
    _write(out / "creds" / "hub.json", natsconf.credentials_file(
        creds.hub, client_urls, tls=natsconf.tls_files(tls_dir, natsconf.HUB_USER)))
    for site in sites:
        _write(out / "creds" / f"{site}.json", natsconf.credentials_file(
            creds.sites[site], client_urls, tls=natsconf.tls_files(tls_dir, natsconf.site_user(site))))
    from controlplane.tools import hafiles

    for i in range(1, len(hosts) + 1):
        _write(out / "ha" / f"hub-{i}.toml", hafiles.hub_toml(i))
    _write(out / "ha" / "cpn-hub.service", hafiles.systemd_unit(), mode=0o644)
    _write(out / "ha" / "compose.yaml", hafiles.compose(tls_dir, args.store_dir), mode=0o644)
    _write(out / "README.md", _readme(sites, hosts, hub_urls, args, monitor, tls_dir) + hafiles.readme_section(hosts),
           mode=0o644)
    print(f"wrote nats-server configs and credentials for {len(sites)} sites to {out}", file=sys.stderr)
    return 0


def _readme(sites: list[str], hosts: list[str], hub_urls: list[str], args: argparse.Namespace,
            monitor: str | None, tls_dir: str) -> str:
    example = sites[0]
    watch = f"monitoring on {monitor}" if monitor else "no monitoring port"
    return f"""# NATS configuration for cpn ({len(sites)} sites)

Generated by `cpn deploy nats-config`. Regenerate rather than edit. See docs/deploy.md (step by
step) and docs/security.md (the permission matrix and the reasoning) in the cpn repository.

| file | where it goes | secret? |
|---|---|---|
| `single/nats-server.conf` | one hub NATS server (JetStream R1) | bcrypt hashes only |
| `cluster/node-N.conf` | hub cluster nodes on {', '.join(hosts)} | yes: route password |
| `leaf/<site>.conf` | the nats-server at each site | yes: the site's password |
| `supercluster/<region>/<region>-node-N.conf` | with a layout naming regions: each region's 3 cluster nodes, joined by gateways (7222) | yes: route password |
| `supercluster/leaf/<site>.conf` | the site's nats-server, a leaf of its own region's nodes (instead of `leaf/`) | yes: the site's password |
| `creds/hub.json` | the hub (`cpn hub --creds`) | yes |
| `creds/<site>.json` | the site's agent, if it connects directly (`cpn agent --creds`; no leaf node) | yes |
| `tls/ca.pem` | every server, the hub and every agent (to verify servers) | no |
| `tls/ca-key.pem` | nowhere: keep it offline, it signs new certificates | yes |
| `tls/single.pem`, `tls/node-N.pem` (+ `-key.pem`) | the server(s) | the key |
| `tls/cpn-hub.pem`, `tls/site-<s>.pem`, `tls/leaf-<s>.pem` (+ `-key.pem`) | the hub, a direct agent, a site's leaf server | the key |

All files except this README and the certificates (`*.pem` without `-key`) are mode 0600: copy
them with their mode (e.g. `install -m 0600`). Every config names the certificate files where the
configs say ({tls_dir}, `--tls-dir`); install them there.

Every link is TLS: clients verify the server's certificate (CA and host name: the server
certificates carry the cluster hosts, the hosts of `--client-url`/`--hub-url` and every
`--server-name`), routes, gateways and leaf connections verify both ends. Leaf nodes dial
`tls://`, so the password in their URL only travels encrypted.

## Hub side

- Single server: `nats-server -c single/nats-server.conf` (clients on {args.listen_host}:{args.client_port},
  leaf nodes on {args.listen_host}:{args.leaf_port}, {watch}, JetStream under {args.store_dir}).
- Cluster: `nats-server -c cluster/node-N.conf` on each of {', '.join(hosts)}; routes on {args.cluster_port} must be
  reachable between the nodes only (gateways, if any, on {args.gateway_port}).
- Run the hub with `cpn hub --config hub.toml --creds creds/hub.json`: the file gives it the NATS
  URLs, user, password and TLS files (it sets inbox prefix `_INBOX.hub` itself). With these
  per-site identities the hub drops registrations whose reply is not in the site's own inbox
  (`strict_inboxes`, on by default whenever the hub authenticates to NATS).
- The hub creates the `CPN_EVENTS` stream with 1 replica on a single server and 3 on a cluster
  (it reads whether its server belongs to one; `event_stream_replicas` in hub.toml overrides).
  With the super-cluster, `event_regions = {{<region> = 3, ...}}` in every hub's hub.toml keeps each
  region's site events in a stream of that region (`CPN_EVENTS_<region>`), durable while it is cut off.

## Site side (choose one)

- Leaf node (recommended, sites behind NAT dial out): run `nats-server -c leaf/{example}.conf` at
  the site; it listens on {args.site_listen} and dials {', '.join(hub_urls)}. The agent connects to
  `nats://{args.site_listen}` without credentials (`cpn agent --config site.toml`, no `--creds`);
  its inbox prefix is `_INBOX.{example}` (the agent sets it itself).
- Direct: `cpn agent --config site.toml --creds creds/{example}.json`: the servers, user, password
  and TLS files come from the file (install `tls/ca.pem` and `tls/site-{example}*.pem` where it says).

Either way the hub's servers enforce the site's permissions: publish only on
`cpn.v1.site.{example}.{{register,hb,evt}}` (and replies), subscribe only to
`cpn.v1.site.{example}.{{infer,cmd}}` and `_INBOX.{example}.>`.
"""
