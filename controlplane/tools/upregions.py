"""``cpn up --regions N``: the layout's regions on one machine, as a NATS super-cluster.

What runs (all in this process, nats-servers as children):

- one NATS cluster per region (the first N regions of the layout, in file order), joined by gateway
  connections (configs from :mod:`controlplane.nats.natsregions`, the same generator as
  ``cpn deploy nats-config``). The **home region** (the first) has 3 nodes: the replicated record
  (``CPN_RECORD``, 3 replicas) and ``CPN_EVENTS`` live there, placed by its JetStream tag
  ``region:<home>``; every other region has one node (a laptop's scale); each region's sites' events
  are stored in a stream of that region (``CPN_EVENTS_<region>``, HubConfig ``event_regions``);
- one controller (``role = "controller"``) on the home region's cluster: it alone decides
  (scheduling, deployments, commands to sites);
- one gateway (``role = "gateway"``) per region on its own region's cluster, with ``gateway_city`` the
  region's first gateway city of the layout (routing counts the full path from there);
- the layout's agents, each a client of its own region's cluster. Sites of regions past N join the
  kept region whose cluster city is nearest.

Where the record lives, and what a region cut off from the home region can do: docs/topology.md
("Regions on one machine"). In short: its gateway keeps serving inference for its own sites from its
current view (keys, deployments, replicas are in its projection); writes to the record (new keys,
submissions, deployments) are refused with 503 ``record_unavailable`` until the link heals.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import shutil
import socket
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from controlplane.compose import HubProcess, build
from controlplane.config import HubConfig
from controlplane.core.errors import NoCapacity, RequestError
from controlplane.core.router import RttSource
from controlplane.nats import natsconf, natsregions
from controlplane.nats.natsserver import NatsServer, default_gomaxprocs
from edge_agent import private_files
from topology import layout as topo_layout
from topology import loader

if TYPE_CHECKING:
    from controlplane.tools.up import UpOptions

log = logging.getLogger("cpn.up")

HOME_NODES = 3
"""Nodes of the home region's cluster: the record's 3 replicas need 3 servers of one cluster."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now (the cluster and gateway ports must be written in the configs). Another
    process may take it before a server binds it: callers start again on new ports when a server
    says so (:func:`port_taken`)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


PORT_ATTEMPTS = 3
"""Starts of the nats-servers on freshly picked ports before giving up (a port picked free and
taken by another process before the server bound it)."""


def port_taken(servers: list[NatsServer]) -> bool:
    """Whether one of ``servers`` failed because a port it was to bind was taken meanwhile."""
    return any("address already in use" in line for server in servers for line in server.tail())


class RefusingPort:
    """A loopback port that refuses connections for as long as this object lives: bound, never
    listening, so no other process can take it (a port merely picked free could be taken and then
    answer)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._sock = socket.socket()
        self._sock.bind((host, 0))
        self.address = f"{host}:{self._sock.getsockname()[1]}"

    def close(self) -> None:
        self._sock.close()


@dataclass(frozen=True)
class RegionPlan:
    """One region as ``cpn up --regions`` runs it."""

    id: str
    gateway_city: str
    sites: tuple[str, ...]
    nodes: tuple[natsregions.Node, ...]


def plan_regions(layout: topo_layout.Layout, n: int, data: Path, host: str = "127.0.0.1", *,
                 fold: bool = True, max_sites: int | None = None) -> list[RegionPlan]:
    """The first ``n`` regions of ``layout`` with their sites and nodes (ports picked now). With
    ``fold`` the sites of the other regions join the nearest kept region; without, they are left out.
    With ``max_sites`` each region keeps only that many sites, those nearest its gateway city (a
    lighter run: the benchmark's).

    Raises:
        ValueError: ``n`` < 1, or more regions than the layout names.
    """
    if n < 1:
        raise ValueError(f"--regions: {n}: at least 1")
    if n > len(layout.regions):
        raise ValueError(f"--regions: {n}: the layout names {len(layout.regions)} region(s)")
    kept = layout.regions[:n]
    by_region: dict[str, list[str]] = {r.id: [] for r in kept}
    for site in layout.sites:
        rid = layout.region_of_site(site.id)
        if rid not in by_region:
            if not fold:
                continue
            rid = _nearest_region(layout, kept, site)
        by_region[rid].append(site.id)
    if max_sites is not None:
        if max_sites < 1:
            raise ValueError(f"max_sites: {max_sites}: at least 1")
        for region in kept:
            at = layout.origin(region.gateways[0] if region.gateways else region.cluster)

            def km(site_id: str, at: topo_layout.Origin = at) -> tuple[float, str]:
                s = layout.site(site_id)
                return topo_layout.great_circle_km(at.lat, at.lon, s.lat, s.lon), site_id

            by_region[region.id] = sorted(by_region[region.id], key=km)[:max_sites]
    counts = [HOME_NODES if i == 0 else 1 for i in range(len(kept))]
    nodes = iter(plan_nodes(host, [f"{r.id}-node-{k}" for r, count in zip(kept, counts) for k in range(1, count + 1)]))
    plans = []
    for region, count in zip(kept, counts):
        city = region.gateways[0] if region.gateways else region.cluster
        plans.append(RegionPlan(id=region.id, gateway_city=city, sites=tuple(by_region[region.id]),
                                nodes=tuple(next(nodes) for _ in range(count))))
    return plans


def plan_nodes(host: str, names: list[str]) -> list[natsregions.Node]:
    """A node of each name on ``host``, every port picked free now (each held until all are picked,
    so none is given twice; routes cannot take port 0: each node names the others')."""
    held: list[socket.socket] = []

    def port() -> int:
        s = socket.socket()
        s.bind((host, 0))
        held.append(s)
        return int(s.getsockname()[1])

    try:
        return [natsregions.Node(name=name, host=host, listen_host=host, client_port=port(), cluster_port=port(),
                                 leafnode_port=port(), gateway_port=port(), monitor=f"{host}:{port()}", store_dir="")
                for name in names]
    finally:
        for s in held:
            s.close()


def _nearest_region(layout: topo_layout.Layout, kept: list[topo_layout.Region], site: topo_layout.Site) -> str:
    def km(region: topo_layout.Region) -> float:
        o = layout.origin(region.cluster)
        return math.hypot(o.lat - site.lat, (o.lon - site.lon) * math.cos(math.radians(site.lat)))

    return min(kept, key=km).id


class WanLinks(Protocol):
    """What stands on the links between regional clusters (a test's fault proxies; none in ``cpn up``)."""

    refused_address: str
    """``host:port`` that refuses connections: what every node advertises, so only :meth:`link` URLs are dialled."""

    async def link(self, dialer: str, target: str, url: str) -> str:
        """The URL region ``dialer`` dials to reach ``url``, a gateway port of region ``target``."""
        ...

    async def site(self, site: str, region: str, url: str) -> str:
        """The URL ``site``'s agent dials to reach ``url``, a client port of its region's cluster
        (its access link; return ``url`` to leave it as it is)."""
        ...

    # Optional: ``async def gateway(self, region: str, url: str) -> str``, the URL the region's
    # gateway dials to reach ``url``, a client port of its region's cluster (the leg gateway city ->
    # cluster city); without it the gateway dials its cluster directly.


@dataclass
class RegionRun:
    """The running parts of one region."""

    plan: RegionPlan
    servers: list[NatsServer] = field(default_factory=list)
    gateway: HubProcess | None = None
    agents: list[Any] = field(default_factory=list)
    leaves: dict[str, NatsServer] = field(default_factory=dict)
    """Each site's own nats-server, a leaf node of this region's cluster (``leaf_sites``), by site."""
    not_served: str = ""
    """Why the region's gateway does not serve its own city within the strict budget ("" when it does)."""

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def monitor_ports(self) -> list[int]:
        return [int(str(n.monitor).rsplit(":", 1)[1]) for n in self.plan.nodes]


class RegionalNetwork:
    """``cpn up --regions N``: a super-cluster, a controller, a gateway per region, the agents."""

    def __init__(self, opts: UpOptions, *, wan: WanLinks | None = None,
                 hub_overrides: dict[str, Any] | None = None, fold_sites: bool = True,
                 max_sites: int | None = None, leaf_sites: bool = False) -> None:
        self.opts = opts
        self.leaf_sites = leaf_sites
        """Each site's agent talks to a nats-server of its own, a leaf node of its region's cluster
        (what ``cpn deploy nats-config`` generates for a site), instead of being a client of the cluster."""
        self.fold_sites = fold_sites
        """Sites of regions past N join the nearest kept region (else they are not run: a lighter bench)."""
        self.max_sites = max_sites
        """At most this many sites per region, nearest its gateway city (None: all)."""
        self.wan = wan
        self.hub_overrides = dict(hub_overrides or {})
        """More :class:`HubConfig` fields of every hub process (the tests' shorter deadlines)."""
        self.layout: topo_layout.Layout | None = None
        self.regions: list[RegionRun] = []
        self.controller: HubProcess | None = None
        self.credentials: dict[str, str] = {}

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        from controlplane.tools import up

        opts = self.opts
        data = opts.data_dir
        private_files.private_dir(data)
        private_files.tighten_tree(data)
        self.layout = loader.load(opts.layout) if opts.layout else loader.load_default()
        creds = natsconf.derive_credentials([s.id for s in self.layout.sites], _secret(data))
        for attempt in range(PORT_ATTEMPTS):
            plans = plan_regions(self.layout, opts.regions, data, opts.host, fold=self.fold_sites,
                                 max_sites=self.max_sites)
            self.regions = [RegionRun(p) for p in plans]
            try:
                await self._start_nats(creds)
                await self._wait_jetstream()
                break
            except Exception:
                servers = [s for r in self.regions for s in r.servers]
                taken = port_taken(servers)
                for server in servers:
                    await server.stop()
                if not taken or attempt == PORT_ATTEMPTS - 1:
                    raise
                log.warning("event=port_taken attempt=%d detail=a port picked free was taken before a "
                            "nats-server bound it: starting again on new ports", attempt + 1)
                for server in servers:  # a fresh store: nothing of the failed start is carried over
                    shutil.rmtree(server.store_dir, ignore_errors=True)
        home = self.regions[0]
        hub_user, hub_password = creds.hub.user, creds.hub.password
        # Each region's sites' events in a stream of its own, placed in the region.
        event_regions = {r.plan.id: min(3, len(r.plan.nodes)) for r in self.regions}

        def config(name: str, region: RegionRun, role: str, port: int, city: str | None,
                   urls: list[str] | None = None) -> HubConfig:
            (data / name).mkdir(exist_ok=True)
            urls = urls or region.urls
            return HubConfig(
                hub_id=name, role=role, record="nats",  # type: ignore[arg-type]
                nats_url=",".join(urls), nats_user=hub_user, nats_password=hub_password,
                # the record's connection takes its identity from the URLs (the record has no user field)
                record_nats_urls=[u.replace("nats://", f"nats://{hub_user}:{hub_password}@") for u in urls],
                db_path=str(data / name / "hub.db"), listen_host=opts.host, listen_port=port, gateway_city=city,
                layout=opts.layout, sim_time_scale=opts.sim_time_scale, strict_inboxes=True,
                tls_cert=opts.tls_cert, tls_key=opts.tls_key, trusted_proxies=opts.trusted_proxies,
                event_regions=event_regions, **self.hub_overrides)

        # The controller first, on the home region: the record and the event stream are created
        # from its connection, so they are placed in the home region's cluster.
        self.controller = build(config("controller", home, "controller", 0, None), layout=self.layout)
        await self.controller.hub.start(serve_http=False)
        for i, region in enumerate(self.regions):
            port = opts.port + i if opts.port else 0
            region.gateway = build(config(f"gateway-{region.plan.id}", region, "gateway", port,
                                          region.plan.gateway_city, await self._gateway_urls(region)),
                                   layout=self.layout)
            await region.gateway.hub.start()
        first = self.regions[0].gateway
        assert first is not None
        self.credentials = up.demo_credentials(first.hub, self.layout, self.credentials_path)
        if opts.agents:
            for region in self.regions:
                await self._start_agents(region, creds)
            await self._wait_registered()
        await self._wait_leading()
        await up._deploy_demo(self.controller.services.deployments, self.layout)
        if opts.agents:
            await self._wait_demo_served()
        private_files.write_private(self.credentials_path, json.dumps(self.credentials, indent=2) + "\n")

    async def stop(self) -> None:
        for region in reversed(self.regions):
            for agent in reversed(region.agents):
                with contextlib.suppress(Exception):
                    await agent.stop()
            region.agents.clear()
        for region in reversed(self.regions):
            for leaf in region.leaves.values():
                await leaf.stop()
            region.leaves.clear()
        for region in reversed(self.regions):
            if region.gateway is not None:
                with contextlib.suppress(Exception):
                    await region.gateway.hub.stop()
                region.gateway = None
        if self.controller is not None:
            with contextlib.suppress(Exception):
                await self.controller.hub.stop()
            self.controller = None
        for region in reversed(self.regions):
            for server in reversed(region.servers):
                await server.stop()
            region.servers.clear()

    @property
    def credentials_path(self) -> Path:
        return self.opts.data_dir / "demo-credentials.json"

    # ------------------------------------------------------------------ parts

    async def _start_nats(self, creds: natsconf.CredentialSet) -> None:
        data = self.opts.data_dir
        dial: dict[str, dict[str, list[str]]] | None = None
        advertise: dict[str, str] | None = None
        if self.wan is not None:
            dial = {x.plan.id: {y.plan.id: [await self.wan.link(x.plan.id, y.plan.id, f"nats://{n.host}:{n.gateway_port}")
                                            for n in y.plan.nodes]
                                for y in self.regions if y is not x}
                    for x in self.regions}
            advertise = {n.name: self.wan.refused_address for r in self.regions for n in r.plan.nodes}
        confs = natsregions.supercluster_configs(
            creds, {r.plan.id: r.plan.nodes for r in self.regions}, min_nodes=1,
            gateway_dial=dial, gateway_advertise=advertise)
        for region in self.regions:
            for node in region.plan.nodes:
                path = data / "nats" / f"{node.name}.conf"
                private_files.private_dir(path.parent)
                private_files.write_private(path, confs[region.plan.id][node.name])
                region.servers.append(NatsServer(data / "nats" / node.name, port=node.client_port,
                                                 host=node.listen_host, config=path,
                                                 gomaxprocs=default_gomaxprocs()))  # 1 on a small host
        # A clustered server is ready only once its routes are up: start them all together.
        # Every start runs to its end (a failed one is not left running beside the retry).
        results = await asyncio.gather(*(s.start(timeout_s=self.opts.ready_timeout_s)
                                         for r in self.regions for s in r.servers), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _wait_jetstream(self) -> None:
        await wait_meta_leader([p for r in self.regions for p in r.monitor_ports], 3 * self.opts.ready_timeout_s)

    async def _gateway_urls(self, region: RegionRun) -> list[str]:
        """The URLs the region's gateway dials to reach its cluster: through the WAN's ``gateway``
        link when it has one (a gateway city away from the region's cluster city), else direct."""
        hook = getattr(self.wan, "gateway", None)
        if hook is None:
            return region.urls
        return [await hook(region.plan.id, u) for u in region.urls]

    async def _start_agents(self, region: RegionRun, creds: natsconf.CredentialSet) -> None:
        from edge_agent.agent import Agent
        from controlplane.tools.up import agent_config_for

        assert self.layout is not None and self.controller is not None
        urls = region.urls  # the agent takes one URL: the sites are spread over the region's nodes
        dial = [urls[i % len(urls)] for i in range(len(region.plan.sites))]
        if self.leaf_sites:
            await self._start_leaves(region, creds)
            dial = [region.leaves[s].url for s in region.plan.sites]
        if self.wan is not None:
            dial = [await self.wan.site(s, region.plan.id, u) for s, u in zip(region.plan.sites, dial)]
        # Behind its own leaf server a site's agent needs no identity: the leaf connection carries it.
        configs = [agent_config_for(self.layout.site(s), dial[i], self.opts.data_dir,
                                    None if self.leaf_sites else (creds.sites[s].user, creds.sites[s].password))
                   for i, s in enumerate(region.plan.sites)]
        region.agents = [Agent(c, clock=self.controller.hub.clock) for c in configs]
        await asyncio.gather(*(a.start() for a in region.agents))

    async def _start_leaves(self, region: RegionRun, creds: natsconf.CredentialSet) -> None:
        """A nats-server per site of ``region`` (no JetStream), a leaf node dialling every node of
        the region's cluster with the site's leaf identity: the config ``cpn deploy nats-config``
        writes for the site (``supercluster/leaf/<site>.conf``), plain on loopback."""
        data = self.opts.data_dir
        remotes = natsregions.leaf_urls(region.plan.nodes, tls=False)
        async def start_leaf(site: str) -> None:
            for attempt in range(PORT_ATTEMPTS):
                port = free_port(self.opts.host)
                path = data / "nats" / "leaf" / f"{site}.conf"
                private_files.private_dir(path.parent)
                private_files.write_private(path, natsconf.leaf_config(site, remotes, creds.sites[site],
                                                                       listen=f"{self.opts.host}:{port}"))
                server = NatsServer(data / "nats" / f"leaf-{site}", port=port, host=self.opts.host,
                                    config=path, jetstream=False, gomaxprocs=default_gomaxprocs())
                try:
                    await server.start(timeout_s=self.opts.ready_timeout_s)
                except Exception:
                    if not port_taken([server]) or attempt == PORT_ATTEMPTS - 1:
                        raise
                    log.warning("event=port_taken site=%s attempt=%d", site, attempt + 1)
                    continue
                region.leaves[site] = server
                return

        await asyncio.gather(*(start_leaf(site) for site in region.plan.sites))

    def _hubs(self) -> list[Any]:
        hubs = [r.gateway.hub for r in self.regions if r.gateway is not None]
        return hubs + ([self.controller.hub] if self.controller is not None else [])

    async def _wait_registered(self) -> None:
        assert self.layout is not None
        n = sum(len(r.plan.sites) for r in self.regions)
        deadline = time.monotonic() + self.opts.ready_timeout_s
        while any(sum(1 for v in h.registry if v.state == "up" and v.registered) < n for h in self._hubs()):
            if time.monotonic() > deadline:
                log.warning("event=not_all_sites_registered of=%d", n)
                return
            await asyncio.sleep(0.05)

    async def _wait_leading(self) -> None:
        assert self.controller is not None
        deadline = time.monotonic() + 3 * self.opts.ready_timeout_s
        while not self.controller.services.leadership.leading:
            if time.monotonic() > deadline:
                raise RuntimeError("the controller did not take the lead")
            await asyncio.sleep(0.05)

    async def _wait_demo_served(self) -> None:
        """Until every region's gateway can serve the demo model to its own city within the strict
        budget, each region waited for on its own and given up after ``ready_timeout_s`` with a
        warning (never a hang). A region whose gateway city has no site of the run within the
        budget at all (the layout's figure, :func:`unreachable_in_budget`) is not waited for. Either
        way the region is named in :attr:`not_served` and on the banner."""
        await asyncio.gather(*(self._wait_region_served(r) for r in self.regions))

    async def _wait_region_served(self, region: RegionRun) -> None:
        from controlplane.tools.up import DEMO_MODEL

        assert region.gateway is not None
        hub = region.gateway.hub
        city, budget = region.plan.gateway_city, float(hub.config.default_budget_ms)
        run_sites = frozenset(s for r in self.regions for s in r.plan.sites)
        nearest = nearest_site(hub.inference.router.rtt, city, frozenset(region.plan.sites))
        in_region = "" if nearest is not None and nearest[1] <= budget else (
            f"no in-region site within {budget:g} ms of its gateway city {city}"
            + (f" (nearest: {nearest[0]} at {nearest[1]:.1f} ms)" if nearest else ""))
        if unreachable_in_budget(hub.inference.router.rtt, city, run_sites, budget):
            region.not_served = in_region or f"no site within {budget:g} ms of its gateway city {city}"
            log.warning("event=region_not_served region=%s reason=%r", region.plan.id, region.not_served)
            return
        deadline = time.monotonic() + self.opts.ready_timeout_s
        while True:
            try:
                route = hub.inference.decide(city, DEMO_MODEL, budget, "strict")
                if in_region:  # served within budget all the same, from another region's site
                    log.info("event=region_served_from_elsewhere region=%s site=%s reason=%r", region.plan.id,
                             route.site, in_region)
                return
            except (NoCapacity, RequestError) as exc:
                if time.monotonic() >= deadline:
                    region.not_served = (in_region + "; " if in_region else "") + (
                        f"the demo model not served within {budget:g} ms of {city} after "
                        f"{self.opts.ready_timeout_s:g} s: {exc}")
                    log.warning("event=region_not_served region=%s reason=%r", region.plan.id, region.not_served)
                    return
                await asyncio.sleep(0.05)

    @property
    def not_served(self) -> dict[str, str]:
        """Region -> why its gateway does not serve its own city within the strict budget (regions
        that do are absent)."""
        return {r.plan.id: r.not_served for r in self.regions if r.not_served}

    # ------------------------------------------------------------------ what the user sees

    def gateway_url(self, region: RegionRun) -> str:
        assert region.gateway is not None
        hub = region.gateway.hub
        return f"{hub.http_scheme}://{self.opts.host}:{hub.http_port}"

    def banner(self) -> str:
        from controlplane.tools.up import DEMO_MODEL, DEMO_TENANT

        assert self.layout is not None
        key = self.credentials["tenant_key"]
        lines = ["", f"cpn is up: {sum(len(r.plan.sites) for r in self.regions)} sites in {len(self.regions)} regions "
                     f"(NATS super-cluster; record and controller in region {self.regions[0].plan.id!r})"]
        for region in self.regions:
            lines.append(f"  region {region.plan.id}: gateway at {self.gateway_url(region)} "
                         f"(city {region.plan.gateway_city}, {len(region.plan.sites)} sites, "
                         f"NATS {', '.join(region.urls)}{'; sites are leaf nodes' if region.leaves else ''})")
            if region.not_served:
                lines.append(f"    not served within budget: {region.not_served}; its tenants get the nearest "
                             f"site beyond it with policy 'nearest', a 503 under 'strict'")
        url = self.gateway_url(self.regions[0])
        lines += [
            f"  admin key:   {self.credentials['admin_key']}",
            f"  tenant key:  {key}   (tenant '{DEMO_TENANT}')",
            f"  credentials: {self.credentials_path}",
            "",
            "Try it at your region's gateway (OpenAI-compatible):",
            "",
            f"  curl -s {url}/v1/chat/completions -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' "
            f"-d '{{\"model\": \"{DEMO_MODEL}\", \"messages\": [{{\"role\": \"user\", \"content\": \"hello\"}}]}}' -D - ",
            "",
            "Ctrl-C drains and stops everything.",
            "",
        ]
        return "\n".join(lines)


def nearest_site(rtt: RttSource, city: str, sites: frozenset[str]) -> tuple[str, float] | None:
    """The site of ``sites`` nearest ``city`` as ``rtt`` (a gateway's router source) ranks them, or None."""
    return next(((s, ms) for s, ms in rtt.ranked(city) if s in sites), None)


def unreachable_in_budget(rtt: RttSource, city: str, sites: frozenset[str], budget_ms: float) -> bool:
    """Whether no site of ``sites`` is within ``budget_ms`` of ``city`` as ``rtt`` ranks them: then
    no replica can ever serve ``city`` under the strict budget, and waiting for one would be a hang."""
    near = nearest_site(rtt, city, sites)
    return near is None or near[1] > budget_ms


async def wait_meta_leader(monitor_ports: list[int], timeout_s: float) -> None:
    """Until every node (by monitoring port) reports the same JetStream meta leader (the cluster is
    formed; a record opened before would wait on it, and time out under load)."""

    def leader(port: int) -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/jsz", timeout=2) as resp:
                return str((json.loads(resp.read()).get("meta_cluster") or {}).get("leader") or "")
        except OSError:
            return ""

    deadline = time.monotonic() + timeout_s
    while True:
        seen = {await asyncio.to_thread(leader, p) for p in monitor_ports}
        if len(seen) == 1 and "" not in seen:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the NATS cluster elected no JetStream meta leader: {sorted(seen)}")
        await asyncio.sleep(0.2)


def _secret(data: Path) -> bytes:
    path = data / "nats-secret"
    if not path.exists():
        private_files.write_private(path, secrets.token_bytes(32))
    return path.read_bytes()


async def run(opts: UpOptions) -> None:
    """Start every region, print the banner, wait for cancellation, stop everything."""
    from edge_agent import gc_tuning

    net = RegionalNetwork(opts, leaf_sites=opts.leaf_sites)
    try:
        await net.start()
        print(net.banner(), flush=True)
        gc_tuning.settle_after_startup()
        await asyncio.Event().wait()
    finally:
        await net.stop()
