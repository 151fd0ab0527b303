"""A NATS super-cluster from the layout's regions: configuration text, as pure functions.

What this module promises:

- Rule 1: one cluster per region (3 nodes in production), named after the region id, its nodes
  joined by routes; the clusters joined by gateway connections (every node of every region knows
  every other region's nodes). Each site's leaf node dials only its own region's nodes, so messages
  between a region's gateway and its sites never leave that region's cluster (gateways forward a
  message to another cluster only where that cluster has interest in its subject).
- Rule 2: every node carries the JetStream server tag ``region:<id>``, so a stream created with
  placement tags ``["region:<id>"]`` (:func:`placement_tags`) lives in that region; and every
  JetStream block says ``sync_interval: always`` (JetStream otherwise acknowledges before fsync).
- Rule 3: with TLS files (by node name), every link is TLS as in :mod:`controlplane.nats.natsconf`:
  clients verified by host name, routes, gateways and leaf connections by both ends.
- Rule 4: pure; the identities, permissions and rendering are natsconf's, so the accounts of a
  super-cluster node are exactly those of a single cluster node. Every generated text passes
  ``nats-server -t`` (tests/adapters/test_supercluster.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from controlplane.nats import natsconf


SYSTEM_ACCOUNT = "SYS"
"""The servers' own account (no users): nats-server needs one when a node has gateways and leaf nodes."""


class Node(msgspec.Struct, frozen=True, kw_only=True):
    """Where one node of a regional cluster is reachable, and its ports."""

    name: str
    host: str
    client_port: int = natsconf.DEFAULT_CLIENT_PORT
    cluster_port: int = natsconf.DEFAULT_CLUSTER_PORT
    leafnode_port: int = natsconf.DEFAULT_LEAFNODE_PORT
    gateway_port: int = natsconf.DEFAULT_GATEWAY_PORT
    monitor: str | None = "127.0.0.1:8222"
    listen_host: str = "0.0.0.0"
    store_dir: str = natsconf.DEFAULT_STORE_DIR


def default_nodes(region_ids: Sequence[str], n: int = 3) -> dict[str, list[Node]]:
    """``n`` nodes per region, named and hosted ``<region>-node-<i>``, on the standard ports."""
    return {r: [Node(name=f"{r}-node-{i}", host=f"{r}-node-{i}") for i in range(1, n + 1)] for r in region_ids}


def region_tag(region: str) -> str:
    """The JetStream server tag of a region's nodes."""
    return f"region:{region}"


def placement_tags(region: str) -> list[str]:
    """Placement tags that put a stream in ``region`` (``StreamConfig.placement.tags``)."""
    return [region_tag(region)]


def supercluster_configs(
    creds: natsconf.CredentialSet,
    regions: Mapping[str, Sequence[Node]],
    *,
    tls: Mapping[str, natsconf.TlsFiles] | None = None,
    min_nodes: int = 3,
    gateway_dial: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    gateway_advertise: Mapping[str, str] | None = None,
) -> dict[str, dict[str, str]]:
    """Config text of every node, by region then node name.

    Args:
        creds: the deployment's identities (natsconf).
        regions: region id -> its nodes (see :func:`default_nodes`).
        tls: TLS files by node name (every node needs them when given).
        min_nodes: the least nodes a region may have (3 for a JetStream quorum; 1 for a scaled-down
            loopback test).
        gateway_dial: the URLs region X's nodes dial to reach region Y (``[X][Y]``; default: Y's
            nodes' gateway ports). A loopback test puts a fault proxy on each link this way.
        gateway_advertise: the gateway URL a node (by name) tells the other regions to dial (nats-server
            gossips it; default: its listen address). With ``gateway_dial`` through proxies, a test
            advertises an address that refuses, so that only the configured links are ever dialled.

    Raises:
        ValueError: no region, a region with too few nodes, a node name used twice, missing TLS files.
    """
    if not regions:
        raise ValueError("no regions: a super-cluster needs at least one")
    names = [n.name for nodes in regions.values() for n in nodes]
    if len(names) != len(set(names)):
        raise ValueError("node names must be unique across regions")
    for rid, nodes in regions.items():
        if len(nodes) < min_nodes:
            raise ValueError(f"region {rid!r}: {len(nodes)} node(s); a JetStream cluster needs {min_nodes}")
    if tls is not None and set(names) - set(tls):
        raise ValueError(f"tls: no files for {sorted(set(names) - set(tls))}")
    route = creds.route
    gateway_urls = {rid: [f"nats://{n.host}:{n.gateway_port}" for n in nodes] for rid, nodes in regions.items()}
    out: dict[str, dict[str, str]] = {}
    for rid, nodes in regions.items():
        out[rid] = {}
        for node in nodes:
            files = tls[node.name] if tls is not None else None
            doc: dict[str, Any] = {"server_name": node.name, "listen": f"{node.listen_host}:{node.client_port}"}
            if files is not None:
                doc["tls"] = files.block(verify=False)
            if node.monitor:
                doc["http"] = node.monitor
            doc["server_tags"] = [region_tag(rid)]
            # An empty store_dir leaves the store to the command line (``-sd``: ``cpn up --regions``);
            # nats-server refuses a store dir given both ways, even the same one.
            doc["jetstream"] = ({"store_dir": node.store_dir, "sync_interval": "always"} if node.store_dir
                                else {"sync_interval": "always"})
            doc["cluster"] = {
                "name": rid,
                "listen": f"{node.listen_host}:{node.cluster_port}",
                "authorization": {"user": route.user, "password": route.password},
                # A one-node region (a scaled-down test) routes to itself: nats-server starts
                # clustered JetStream only with routes configured, and ignores a route to itself.
                "routes": [f"nats-route://{route.user}:{route.password}@{o.host}:{o.cluster_port}"
                           for o in nodes if o.name != node.name or len(nodes) == 1],
            }
            doc["leafnodes"] = {"listen": f"{node.listen_host}:{node.leafnode_port}"}
            doc["gateway"] = {
                "name": rid,
                "listen": f"{node.listen_host}:{node.gateway_port}",
                "gateways": [{"name": other, "urls": list((gateway_dial or {}).get(rid, {}).get(other, urls))}
                             for other, urls in gateway_urls.items() if other != rid],
            }
            if gateway_advertise and node.name in gateway_advertise:
                doc["gateway"]["advertise"] = gateway_advertise[node.name]
            if files is not None:
                doc["cluster"]["tls"] = files.block(verify=True)
                doc["leafnodes"]["tls"] = files.block(verify=True)
                doc["gateway"]["tls"] = files.block(verify=True)
            # nats-server refuses leaf nodes and gateways together without a system account.
            doc["accounts"] = {**natsconf._accounts(creds), SYSTEM_ACCOUNT: {}}
            doc["system_account"] = SYSTEM_ACCOUNT
            header = (natsconf._HEADER + f"\nSuper-cluster: region {rid!r} ({len(nodes)} node(s)), {node.name} "
                      f"(host {node.host}); gateways to {', '.join(r for r in regions if r != rid) or 'none'}.")
            out[rid][node.name] = natsconf.render(doc, header)
    return out


def leaf_urls(nodes: Sequence[Node], *, tls: bool) -> list[str]:
    """The leaf-node URLs of a region's nodes (before the site's identity is put in them)."""
    scheme = "tls" if tls else "nats-leaf"
    return [f"{scheme}://{n.host}:{n.leafnode_port}" for n in nodes]


__all__ = ["Node", "default_nodes", "leaf_urls", "placement_tags", "region_tag", "supercluster_configs"]
