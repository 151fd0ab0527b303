"""The super-cluster generator on real nats-servers: `nats-server -t` on every config, and a scaled-down
loopback run (3 regions x 1 node, TLS on every link, one leaf site in two of them) that forms the
super-cluster, carries a site's message across regions, and keeps an in-region message in its region."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import secrets
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import nats
import pytest

from controlplane import cli
from controlplane.nats import natsregions
from controlplane.nats import natscerts, natsconf
from controlplane.nats.natsserver import binary
from tests.support.natscluster import free_port
from tests.support.waiting import until
from topology import loader

REGIONS = ("a", "b", "c")
SITES = {"sa": "a", "sb": "b"}


def nats_server_accepts(path: Path) -> None:
    result = subprocess.run([binary(), "-t", "-c", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"{path}: {result.stdout}{result.stderr}"


def test_national_layout_gives_a_supercluster_every_config_valid(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert cli.main(["deploy", "nats-config", "--layout", str(loader.default_path()), "--out", str(out),
                     "--bcrypt-cost", "4"]) == 0
    lay = loader.load_default()
    regions = [r.id for r in lay.regions]
    assert sorted(p.name for p in (out / "supercluster").iterdir()) == sorted([*regions, "leaf"])
    confs = sorted((out / "supercluster").glob("*/*.conf"))
    assert len(confs) == 3 * len(regions) + len(lay.sites)
    text = (out / "supercluster" / "east" / "east-node-2.conf").read_text()
    assert 'server_tags: ["region:east"]' in text and 'sync_interval: "always"' in text
    assert re.search(r'gateway: \{\n  name: "east"', text) and 'system_account: "SYS"' in text
    assert '"nats://north-node-1:7222"' in text and '"nats://east-node-1:7222"' not in text  # the others only
    assert "@east-node-1:6222" in text and "@east-node-2:6222" not in text  # routes to its peers only
    assert text.count("verify: true") == 3  # routes, leaf nodes, gateways: mutual TLS
    leaf = (out / "supercluster" / "leaf" / "hz-edge.conf").read_text()  # Hangzhou is in the east
    assert leaf.count("@east-node-") == 3 and "north-node" not in leaf and "tls://" in leaf
    assert (out / "tls" / "east-node-2.pem").exists()
    for path in confs:
        nats_server_accepts(path)
    with pytest.raises(ValueError, match="needs 3"):
        natsregions.supercluster_configs(natsconf.generate_credentials(["x"], secrets.token_bytes, bcrypt_cost=4),
                                         {"x": natsregions.default_nodes(["x"], n=2)["x"]})


def gatewayz(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/gatewayz", timeout=2) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


def meta_leader(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/jsz", timeout=2) as resp:
        return str((json.loads(resp.read()).get("meta_cluster") or {}).get("leader") or "")


def gateway_msgs(port: int) -> dict[str, int]:
    """Messages this server sent to each other region over its outbound gateway connections."""
    out = gatewayz(port).get("outbound_gateways") or {}
    return {name: int(gw["connection"]["out_msgs"]) for name, gw in out.items()}


class Server:
    """A nats-server run exactly as an operator would: ``nats-server -c FILE``."""

    def __init__(self, conf: Path) -> None:
        self.conf = conf
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []

    async def start(self, timeout_s: float = 15.0) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            binary(), "-c", str(self.conf), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)

        async def ready() -> None:
            assert self.proc and self.proc.stderr
            while True:
                raw = await self.proc.stderr.readline()
                if not raw:
                    raise AssertionError(f"{self.conf.name} exited:\n" + "\n".join(self.lines[-20:]))
                self.lines.append(raw.decode(errors="replace").rstrip())
                if "Server is ready" in self.lines[-1]:
                    return

        await asyncio.wait_for(ready(), timeout_s)
        asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        assert self.proc and self.proc.stderr
        while await self.proc.stderr.readline():
            pass

    async def stop(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()


@pytest.mark.timeout(90)
async def test_three_regions_form_a_supercluster_and_keep_regional_traffic_home(tmp_path: Path) -> None:
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    now = dt.datetime.now(dt.timezone.utc)
    ca = natscerts.make_ca(now)
    (tls_dir / "ca.pem").write_bytes(ca.cert)

    def issue(name: str, server: bool) -> natsconf.TlsFiles:
        pem = natscerts.make_cert(ca, now, name, ["127.0.0.1", "localhost", name], server=server)
        (tls_dir / f"{name}.pem").write_bytes(pem.cert)
        (tls_dir / f"{name}-key.pem").write_bytes(pem.key)
        return natsconf.tls_files(str(tls_dir), name)

    creds = natsconf.generate_credentials(list(SITES), secrets.token_bytes, bcrypt_cost=4)
    monitor = {r: free_port() for r in REGIONS}
    nodes = {
        r: [natsregions.Node(
            name=f"{r}-node-1", host="127.0.0.1", listen_host="127.0.0.1", client_port=free_port(),
            cluster_port=free_port(), leafnode_port=free_port(), gateway_port=free_port(),
            monitor=f"127.0.0.1:{monitor[r]}", store_dir=str(tmp_path / "js" / r))]
        for r in REGIONS
    }
    tls = {ns[0].name: issue(ns[0].name, True) for ns in nodes.values()}
    confs = natsregions.supercluster_configs(creds, nodes, tls=tls, min_nodes=1)
    servers = []
    for r in REGIONS:
        path = tmp_path / f"{r}.conf"
        path.write_text(confs[r][f"{r}-node-1"])
        nats_server_accepts(path)
        servers.append(Server(path))
    leaf_ports = {}
    for site, r in SITES.items():
        leaf_ports[site] = free_port()
        text = natsconf.leaf_config(site, natsregions.leaf_urls(nodes[r], tls=True), creds.sites[site],
                                    listen=f"127.0.0.1:{leaf_ports[site]}", tls=issue(natsconf.leaf_user(site), False))
        path = tmp_path / f"leaf-{site}.conf"
        path.write_text(text)
        nats_server_accepts(path)
        servers.append(Server(path))
    conns: list[Any] = []
    try:
        t0 = time.monotonic()
        await asyncio.gather(*(s.start() for s in servers[:3]))
        views: list[Any] = []

        def formed() -> bool:  # every region sees both others, inbound and outbound
            try:
                views[:] = [gatewayz(monitor[r]) for r in REGIONS]
            except OSError:
                return False
            return all(len(v.get("outbound_gateways") or {}) == 2 and len(v.get("inbound_gateways") or {}) == 2
                       for v in views)

        await until(formed, 20, "the super-cluster to form", interval_s=0.1, last=lambda: views)
        formed_s = time.monotonic() - t0
        await until(lambda: len(leaders := {meta_leader(monitor[r]) for r in REGIONS}) == 1 and "" not in leaders,
                    20, "a JetStream meta leader across the super-cluster", interval_s=0.1)
        print(f"super-cluster of 3 regions: gateways up in {formed_s:.2f} s, "
              f"JetStream meta leader in {time.monotonic() - t0:.2f} s")
        await asyncio.gather(*(s.start() for s in servers[3:]))

        hub = creds.hub

        async def hub_in(r: str) -> Any:
            nc = await nats.connect(f"tls://127.0.0.1:{nodes[r][0].client_port}", user=hub.user, password=hub.password,
                                    tls=__import__("ssl").create_default_context(cafile=str(tls_dir / "ca.pem")),
                                    tls_hostname="127.0.0.1", inbox_prefix=b"_INBOX.hub")
            conns.append(nc)
            return nc

        async def site(s: str) -> Any:
            nc = await nats.connect(f"nats://127.0.0.1:{leaf_ports[s]}", inbox_prefix=f"_INBOX.{s}".encode())
            conns.append(nc)
            return nc

        hub_a, hub_b, site_a = await hub_in("a"), await hub_in("b"), await site("sa")
        got_b = await hub_b.subscribe("cpn.v1.site.*.hb")
        got_site = await site_a.subscribe("cpn.v1.site.sa.infer")
        await hub_b.flush()
        await site_a.flush()

        # Across regions: site sa (leaf of region a) publishes a heartbeat; region b's hub gets it.
        async def crossed() -> bool:  # interest crosses the gateways asynchronously: send again until it has
            await site_a.publish("cpn.v1.site.sa.hb", b"hb")
            await site_a.flush()
            try:
                msg = await got_b.next_msg(timeout=0.2)
            except nats.errors.TimeoutError:
                return False
            assert (msg.subject, msg.data) == ("cpn.v1.site.sa.hb", b"hb")
            return True

        await until(crossed, 10, "a heartbeat from region a to reach region b", interval_s=0)

        # Within a region: region a's hub sends to its own site; nothing leaves region a.
        before = gateway_msgs(monitor["a"])
        for i in range(50):
            await hub_a.publish("cpn.v1.site.sa.infer", b"%d" % i)
        await hub_a.flush()
        for i in range(50):
            assert (await got_site.next_msg(timeout=5)).data == b"%d" % i
        after = gateway_msgs(monitor["a"])
        assert set(after) == {"b", "c"}
        assert after == before, f"in-region messages crossed a gateway: {before} -> {after}"

        # Placement: a stream tagged for region b lives on region b's server.
        js = hub_a.jetstream()
        from nats.js.api import Placement, StreamConfig

        info = await js.add_stream(StreamConfig(name="CPN_B", subjects=["cpn.v1.region.b.>"], num_replicas=1,
                                                placement=Placement(tags=natsregions.placement_tags("b"))))
        assert info.cluster is not None and info.cluster.name == "b"
        assert info.cluster.leader == "b-node-1"
    finally:
        for nc in conns:
            await nc.close()
        await asyncio.gather(*(s.stop() for s in servers))
