"""``cpn up``: the whole network on one machine.

An embedded nats-server (JetStream, store under the data dir, loopback, 4222 if free), the hub with
its gateway, and one simulated agent per site of the layout, each with its own NATS connection and
identity. On first start it creates an admin key and a demo tenant key and writes them to
``<data-dir>/demo-credentials.json``; later starts reuse them. SIGINT/SIGTERM drain and stop every
part in reverse order, leaving no process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlplane.config import HubConfig
from controlplane.core.errors import NoCapacity, RequestError
from controlplane.hub import Hub
from controlplane.services.deployments import DeploymentService
from controlplane.services.record import Services
from controlplane.nats.natsserver import NatsServer, default_gomaxprocs, port_free
from controlplane.compose import build
from edge_agent import gc_tuning, private_files
from topology import layout as topo_layout
from topology import loader

log = logging.getLogger("cpn.up")

DEMO_MODEL = "demo-chat"
DEMO_TENANT = "demo"


@dataclass(frozen=True)
class UpOptions:
    data_dir: Path = Path(".cpn")
    host: str = "127.0.0.1"
    port: int = 8080
    nats_port: int = 4222
    layout: str | None = None
    agents: bool = True
    sim_time_scale: float = 60.0
    ready_timeout_s: float = 20.0
    tls_cert: str | None = None
    tls_key: str | None = None
    trusted_proxies: tuple[str, ...] = ()
    regions: int = 0
    """0: one NATS server and one hub; N: the layout's first N regions as a super-cluster
    (``controlplane.tools.upregions.run``; ``cpn up --regions N``)."""
    leaf_sites: bool = False
    """With ``regions``: each site's agent behind a nats-server of its own, a leaf node of its
    region's cluster (``cpn up --regions N --leaf-sites``), instead of a client of the cluster."""


class Network:
    """The running parts of ``cpn up`` (for the command and for tests)."""

    def __init__(self, opts: UpOptions) -> None:
        self.opts = opts
        self.nats: NatsServer | None = None
        self.hub: Hub | None = None
        self.services: Services | None = None
        self.agents: list[Any] = []
        self.credentials: dict[str, str] = {}
        self.layout: topo_layout.Layout | None = None
        self.site_credentials: dict[str, tuple[str, str]] = {}

    async def start(self) -> None:
        opts = self.opts
        data = opts.data_dir
        private_files.private_dir(data)
        private_files.tighten_tree(data)  # everything under it is ours: hub.db, jetstream/, agents/, credentials
        self.layout = loader.load(opts.layout) if opts.layout else loader.load_default()
        site_ids = [s.id for s in self.layout.sites]
        auth = nats_identities(data, site_ids)
        self.site_credentials = auth.site_credentials
        self.nats = NatsServer(
            data / "jetstream",
            port=opts.nats_port if opts.nats_port and port_free("127.0.0.1", opts.nats_port) else 0,
            config=auth.config_path,
            on_line=None,
            gomaxprocs=default_gomaxprocs(),  # 1 on a small host shared with the hub and the agents
        )
        await self.nats.start()
        hub_config = HubConfig(
            nats_url=self.nats.url, nats_user=auth.hub_user, nats_password=auth.hub_password,
            db_path=str(data / "hub.db"), listen_host=opts.host, listen_port=opts.port,
            layout=opts.layout, sim_time_scale=opts.sim_time_scale, strict_inboxes=auth.config_path is not None,
            tls_cert=opts.tls_cert, tls_key=opts.tls_key, trusted_proxies=opts.trusted_proxies,
        )
        process = build(hub_config, layout=self.layout)
        self.hub = process.hub
        self.services = process.services
        if opts.agents:
            # Not ready until the printed curl would be answered (/readyz says why not).
            self.hub.readiness.hold("demo_model", f"demo model {DEMO_MODEL!r} not served yet")
        if auth.violations is not None:
            counter = auth.violations
            hub = self.hub

            def on_line(line: str) -> None:
                if counter.feed(line):
                    hub.permission_violations = counter.total

            self.nats.on_line = on_line
        await self.hub.start()
        self.credentials = self._ensure_credentials()
        if opts.agents:
            await self._start_agents(auth.site_credentials)
            await self._wait_ready(len(site_ids))
        await _deploy_demo(process.services.deployments, self.layout)
        if opts.agents:
            await self._wait_demo_served()
            self.hub.readiness.release("demo_model")
        # Only now: a script that waits for this file (or for /readyz) can use the keys at once.
        private_files.write_private(self.credentials_path, json.dumps(self.credentials, indent=2) + "\n")

    async def stop(self) -> None:
        for agent in reversed(self.agents):
            with contextlib.suppress(Exception):
                await agent.stop()
        self.agents.clear()
        if self.hub is not None:
            await self.hub.stop()
            self.hub = None
        if self.nats is not None:
            await self.nats.stop()
            self.nats = None

    @property
    def credentials_path(self) -> Path:
        return self.opts.data_dir / "demo-credentials.json"

    def _ensure_credentials(self) -> dict[str, str]:
        assert self.hub is not None and self.layout is not None
        return demo_credentials(self.hub, self.layout, self.credentials_path)

    def _key_works(self, key: str) -> bool:
        assert self.hub is not None
        return self.hub.tenancy.authenticate(key) is not None

    async def _start_agents(self, site_creds: dict[str, tuple[str, str]]) -> None:
        from edge_agent.agent import Agent

        assert self.layout is not None and self.nats is not None and self.hub is not None
        configs = [agent_config_for(site, self.nats.url, self.opts.data_dir, site_creds.get(site.id)) for site in self.layout.sites]
        self.agents = [Agent(c, clock=self.hub.clock) for c in configs]  # one clock for the whole process
        await asyncio.gather(*(a.start() for a in self.agents))

    async def _wait_ready(self, n_sites: int) -> None:
        assert self.hub is not None
        deadline = time.monotonic() + self.opts.ready_timeout_s
        while sum(1 for v in self.hub.registry if v.state == "up" and v.registered) < n_sites:
            if time.monotonic() > deadline:
                up = sum(1 for v in self.hub.registry if v.state == "up")
                log.warning("event=not_all_sites_registered up=%d of=%d", up, n_sites)
                return
            await asyncio.sleep(0.05)

    async def _wait_demo_served(self) -> None:
        """Until the demo tenant's origin has a ready replica of the demo model (so the printed
        curl answers at once). Past ``ready_timeout_s`` it says so on the log, every
        ``ready_timeout_s``, and keeps waiting: printing the banner early is what it must not do."""
        assert self.hub is not None and self.layout is not None
        origin = self.hub.tenancy.tenant_default_origin(DEMO_TENANT) or _demo_origin(self.layout)
        started = time.monotonic()
        next_warning = started + self.opts.ready_timeout_s
        while True:
            try:
                self.hub.inference.decide(origin, DEMO_MODEL, self.hub.config.default_budget_ms, "strict")
                return
            except (NoCapacity, RequestError) as exc:  # no ready replica in budget yet, or the model not heard of yet
                if time.monotonic() >= next_warning:
                    next_warning += self.opts.ready_timeout_s
                    log.warning("event=demo_not_ready origin=%s model=%s waited_s=%.0f reason=%s",
                                origin, DEMO_MODEL, time.monotonic() - started, exc)
                await asyncio.sleep(0.05)

    def banner(self) -> str:
        assert self.hub is not None
        url = f"{self.hub.http_scheme}://{self.opts.host}:{self.hub.http_port}"
        key = self.credentials["tenant_key"]
        up = self.hub.registry.counts()["up"]
        return "\n".join([
            "",
            f"cpn is up: {up} sites, hub gateway at {url}",
            f"  admin key:   {self.credentials['admin_key']}",
            f"  tenant key:  {key}   (tenant '{DEMO_TENANT}')",
            f"  credentials: {self.opts.data_dir / 'demo-credentials.json'}",
            f"  NATS:        {self.nats.url if self.nats else '?'}",
            "",
            "Try it (OpenAI-compatible; any OpenAI client works with base URL " + url + "/v1):",
            "",
            f"  curl -s {url}/v1/chat/completions -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' "
            f"-d '{{\"model\": \"{DEMO_MODEL}\", \"messages\": [{{\"role\": \"user\", \"content\": \"hello\"}}]}}' -D - ",
            "",
            f"  sites:  curl -s {url}/v1/sites -H 'Authorization: Bearer {self.credentials['admin_key']}'",
            "",
            "Ctrl-C drains and stops everything.",
            "",
        ])


def demo_credentials(hub: Hub, layout: topo_layout.Layout, path: Path) -> dict[str, str]:
    """The demo keys: those of the credentials file at ``path`` if they still work, else new ones.

    The file itself is removed here and written again by the caller once the network is ready,
    so its appearance means "ready" on a restart too."""

    def works(key: str) -> bool:
        return hub.tenancy.authenticate(key) is not None

    if path.exists():
        try:
            creds = json.loads(path.read_text())
            if works(creds["admin_key"]) and works(creds["tenant_key"]):
                path.unlink()
                return {"admin_key": creds["admin_key"], "tenant_key": creds["tenant_key"]}
        except (ValueError, KeyError, TypeError, RequestError):  # RequestError: revoked or expired
            pass
        path.unlink(missing_ok=True)
    admin = hub.create_admin_key("cpn up")
    origin = _demo_origin(layout)
    if hub.tenant(DEMO_TENANT) is None:
        tenant_key = hub.create_tenant(DEMO_TENANT, name="Demo tenant", default_origin=origin)
    else:
        tenant_key = hub.tenancy.add_tenant_key(DEMO_TENANT)
    return {"admin_key": admin, "tenant_key": tenant_key}


@dataclass
class _Identities:
    config_path: Path | None
    hub_user: str | None
    hub_password: str | None
    site_credentials: dict[str, tuple[str, str]]
    violations: Any


def nats_identities(data: Path, site_ids: list[str]) -> _Identities:
    """Per-site NATS users and permissions for the embedded server (same scheme as deployments)."""
    try:
        from controlplane.nats import natsconf
    except ImportError:
        return _Identities(None, None, None, {}, None)
    secret_path = data / "nats-secret"
    if not secret_path.exists():
        private_files.write_private(secret_path, secrets.token_bytes(32))
    secret = secret_path.read_bytes()
    text, hub_creds, site_creds = natsconf.embedded_config(site_ids, secret=secret, jetstream_dir=str(data / "jetstream"))
    conf = data / "nats-server.conf"
    private_files.write_private(conf, text)
    return _Identities(
        conf, hub_creds.user, hub_creds.password,
        {site: (c.user, c.password) for site, c in site_creds.items()},
        natsconf.ViolationCounter(),
    )


def _demo_origin(layout: topo_layout.Layout) -> str:
    ids = {o.id for o in layout.origins}
    for preferred in ("shanghai", "beijing", "guangzhou"):
        if preferred in ids:
            return preferred
    return max(layout.origins, key=lambda o: o.weight).id


def agent_config_for(site: topo_layout.Site, nats_url: str, data_dir: Path, creds: tuple[str, str] | None) -> Any:
    """The simulated agent of one layout site, as ``cpn up`` runs it."""
    from edge_agent.config import AgentConfig, BackendConfig, ExecutorsConfig, SimBackendConfig

    user, password = creds or ("", "")
    return AgentConfig(
        site=site.id, nats=nats_url, user=user, password=password, tier=site.tier,
        city=site.city, provider=site.provider, region=site.region, lat=site.lat, lon=site.lon, tee=site.tee,
        accelerators=dict(site.accelerators), heartbeat_s=1.0,
        data_dir=str(data_dir / "agents" / site.id),
        backend=BackendConfig(kind="sim", sim=SimBackendConfig(ttft_ms=20.0, per_token_ms=4.0, slots=8, load_time_s=1.0, answer_words=24)),
        executors=ExecutorsConfig(enabled=["sim"]),  # simulated training only: no tenant code runs
    )


async def _deploy_demo(service: DeploymentService, layout: topo_layout.Layout) -> None:
    """Deploy the demo model for the demo tenant (once; reused across restarts) through the
    deployments service: every origin of the layout, 0.25 cards per replica, 10 ms, two cities.
    The plan is committed before this returns; the edge pools load it in the background."""
    dep_id = await service.deploy_demo(DEMO_TENANT, DEMO_MODEL)
    log.info("event=demo_deployed deployment=%s model=%s sites=%d", dep_id, DEMO_MODEL, len(layout.sites))


async def run(opts: UpOptions) -> None:
    """Start everything, print the banner, wait for cancellation (Ctrl-C), stop everything."""
    net = Network(opts)
    try:
        await net.start()
        print(net.banner(), flush=True)
        gc_tuning.settle_after_startup()
        await asyncio.Event().wait()
    finally:
        await net.stop()
