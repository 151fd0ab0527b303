"""``cpn up --ha``: no single hub, on one machine.

What runs:

- a 3-node NATS cluster from the wheel (the configs of :mod:`controlplane.nats.natsregions` for one
  region: JetStream with ``sync_interval: always``, per-site identities as ``cpn up`` has them);
- three hub processes as real subprocesses (``cpn hub --record nats``: each a gateway and a
  controller, its own hub id and projection database under ``<data-dir>/hubs/<id>``), their HTTP
  gateways on ``--port``, ``--port+1``, ``--port+2`` (free ports with ``--port 0``, kept across
  restarts). They share the replicated record; one of them leads (``GET /v1/cluster``);
- the layout's agents in this process, each a client of one node of the cluster (spread over the
  three); every site is seen by every hub process.

:class:`HaNetwork` is also the rig of ``cpn chaos --ha`` and ``cpn bench takeover``: it kills,
pauses, resumes and restarts a given hub process or NATS node, and says who leads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec

from controlplane.nats import natsconf, natsregions
from controlplane.nats.natsserver import NatsServer, _in_child, default_gomaxprocs
from controlplane.tools.upregions import _secret, free_port, plan_nodes, wait_meta_leader
from edge_agent import private_files
from topology import layout as topo_layout
from topology import loader

if TYPE_CHECKING:
    from controlplane.tools.up import UpOptions

log = logging.getLogger("cpn.up")

HUBS = 3
REGION = "cpn"
"""The cluster's name (one region of :func:`natsregions.supercluster_configs`: a plain 3-node cluster)."""
_LISTENING = re.compile(r"listening on (https?)://([^:\s]+):(\d+)")
_ADMIN = "admin key: "


@dataclass
class HubChild:
    """One ``cpn hub`` subprocess of the rig: its config, port and process."""

    hub_id: str
    config: Path
    port: int
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    paused: bool = False
    scheme: str = "http"
    _drain: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def url(self, host: str) -> str:
        return f"{self.scheme}://{host}:{self.port}"

    async def start(self, *, create_admin_key: bool = False, timeout_s: float = 60.0) -> str:
        """Start the process and wait for its "listening on" line; returns the admin key it printed
        (with ``create_admin_key``), else ""."""
        args = [sys.executable, "-m", "controlplane.cli", "hub", "--config", str(self.config)]
        if create_admin_key:
            args.append("--create-admin-key")
        logfile = open(self.log_path, "ab")  # noqa: SIM115 (the child holds it; closed below)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=logfile,
                env={**os.environ, "CPN_LOG": os.environ.get("CPN_LOG", "WARNING")},
                start_new_session=True,  # Ctrl-C in a terminal goes to cpn, which stops us in order
                preexec_fn=_in_child)  # and we die with cpn, even if it is SIGKILLed
        finally:
            logfile.close()
        self.paused = False
        admin = ""
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    line = (await self.proc.stdout.readline()).decode(errors="replace")
                    if not line:
                        code = await self.proc.wait()
                        try:  # the log's last lines say why (the data dir may be a temporary one)
                            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-12:])
                        except OSError:
                            tail = ""
                        raise RuntimeError(f"hub process {self.hub_id} exited with {code} (its log: "
                                           f"{self.log_path}; last lines:\n{tail})")
                    if line.startswith(_ADMIN):
                        admin = line[len(_ADMIN):].strip()
                    if m := _LISTENING.search(line):
                        self.scheme = m.group(1)
                        break
        except BaseException:
            await self.kill()
            raise
        self._drain = asyncio.create_task(self._drain_stdout(), name=f"hub-{self.hub_id}-stdout")
        return admin

    async def _drain_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.log_path, "ab") as out:
            while line := await self.proc.stdout.readline():
                out.write(line)
                out.flush()

    def signal(self, sig: signal.Signals) -> None:
        if self.running:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def kill(self) -> None:
        """SIGKILL (a crash) and reap."""
        if self.proc is None:
            return
        self.signal(signal.SIGKILL)
        await self.proc.wait()
        await self._finish()

    async def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM (a paused process is resumed first so it can act on it), SIGKILL past ``timeout_s``."""
        if self.proc is None:
            return
        if self.paused:
            self.signal(signal.SIGCONT)
            self.paused = False
        self.signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout_s):
                await self.proc.wait()
        except TimeoutError:
            log.warning("event=hub_stop_timeout hub=%s", self.hub_id)
            await self.kill()
        await self._finish()

    async def _finish(self) -> None:
        if self._drain is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._drain, 2)
            self._drain = None
        if self.proc is not None:
            transport = getattr(self.proc, "_transport", None)
            if transport is not None:
                transport.close()


class HaNetwork:
    """``cpn up --ha``: a 3-node NATS cluster, three hub processes on the replicated record, the agents.

    Args:
        opts: ``cpn up``'s options (``port``: the first gateway's port, 0 for free ports).
        hub_overrides: more :class:`~controlplane.config.HubConfig` fields of every hub process.
        demo: create the demo tenant and deploy the demo model (``cpn up``'s banner curl answers).
    """

    def __init__(self, opts: UpOptions, *, hub_overrides: dict[str, Any] | None = None, demo: bool = True) -> None:
        self.opts = opts
        self.hub_overrides = dict(hub_overrides or {})
        self.demo = demo
        self.layout: topo_layout.Layout | None = None
        self.nodes: list[natsregions.Node] = []
        self.servers: dict[str, NatsServer] = {}
        self.paused_nodes: set[str] = set()
        self.hubs: list[HubChild] = []
        self.agents: list[Any] = []
        self.credentials: dict[str, str] = {}
        self._session: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        opts = self.opts
        data = opts.data_dir
        private_files.private_dir(data)
        private_files.tighten_tree(data)
        self.layout = loader.load(opts.layout) if opts.layout else loader.load_default()
        self.nodes = plan_nodes(opts.host, ["node-1", "node-2", "node-3"])
        creds = natsconf.derive_credentials([s.id for s in self.layout.sites], _secret(data))
        # With --tls-cert the gateways serve HTTPS, likely with a self-signed certificate: these calls
        # go to our own children on loopback, so their certificate is not checked here.
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15),
                                              connector=aiohttp.TCPConnector(ssl=False) if opts.tls_cert else None)
        await self._start_nats(creds)
        await self._wait_jetstream()
        stored = self._stored_credentials()
        self.hubs = self._plan_hubs(creds)
        admin = await self.hubs[0].start(create_admin_key=not stored)
        if stored and await self._works(self.hubs[0], stored["admin_key"], "/v1/cluster"):
            admin = stored["admin_key"]
        elif stored:  # the stored key no longer works (revoked, another record): make a new one
            await self.hubs[0].stop()
            admin = await self.hubs[0].start(create_admin_key=True)
        await asyncio.gather(*(h.start() for h in self.hubs[1:]))
        self.credentials = {"admin_key": admin}
        await self.wait_leader(3 * opts.ready_timeout_s)
        if self.demo:
            self.credentials["tenant_key"] = await self._demo_tenant(stored.get("tenant_key") if stored else None)
        if opts.agents:
            await self._start_agents(creds)
            await self._wait_registered()
        if self.demo:
            await self._deploy_demo()
            if opts.agents:
                await self._wait_demo_served()
            private_files.write_private(self.credentials_path, json.dumps(self.credentials, indent=2) + "\n")

    async def stop(self) -> None:
        for agent in reversed(self.agents):
            with contextlib.suppress(Exception):
                await agent.stop()
        self.agents.clear()
        await asyncio.gather(*(h.stop() for h in self.hubs), return_exceptions=True)
        for name in list(self.paused_nodes):
            await self.servers[name].resume()
        self.paused_nodes.clear()
        await asyncio.gather(*(s.stop() for s in self.servers.values()), return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def credentials_path(self) -> Path:
        return self.opts.data_dir / "demo-credentials.json"

    # ------------------------------------------------------------------ faults

    def hub(self, hub_id: str) -> HubChild:
        return next(h for h in self.hubs if h.hub_id == hub_id)

    async def kill_hub(self, hub_id: str) -> None:
        await self.hub(hub_id).kill()

    async def pause_hub(self, hub_id: str) -> None:
        h = self.hub(hub_id)
        h.signal(signal.SIGSTOP)
        h.paused = True

    async def resume_hub(self, hub_id: str) -> None:
        h = self.hub(hub_id)
        h.signal(signal.SIGCONT)
        h.paused = False

    async def restart_hub(self, hub_id: str) -> None:
        """Start a killed (or running: it is killed first) hub process again, same port and projection."""
        h = self.hub(hub_id)
        if h.running:
            await h.kill()
        await h.start()

    async def kill_node(self, name: str) -> None:
        if name in self.paused_nodes:
            await self.resume_node(name)
        await self.servers[name].kill()

    async def pause_node(self, name: str) -> None:
        await self.servers[name].pause()
        self.paused_nodes.add(name)

    async def resume_node(self, name: str) -> None:
        await self.servers[name].resume()
        self.paused_nodes.discard(name)

    async def restart_node(self, name: str) -> None:
        """Start a killed NATS node again (same ports and store)."""
        server = self.servers[name]
        if server.running:
            await self.kill_node(name)
        await server.start(timeout_s=self.opts.ready_timeout_s)

    # ------------------------------------------------------------------ who leads

    async def cluster_view(self, hub: HubChild) -> dict[str, Any] | None:
        """``GET /v1/cluster`` at one gateway (None: no answer)."""
        assert self._session is not None
        if not hub.running or hub.paused:
            return None
        try:
            async with self._session.get(hub.url(self.opts.host) + "/v1/cluster", timeout=aiohttp.ClientTimeout(total=2),
                                         headers={"Authorization": f"Bearer {self.credentials['admin_key']}"}) as resp:
                if resp.status != 200:
                    return None
                body: dict[str, Any] = await resp.json()
                return body
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def leader(self, *, among: list[HubChild] | None = None) -> tuple[str, int] | None:
        """(hub id, epoch) of the leader as the first answering gateway of ``among`` sees it, once a
        process that is up leads; None if no gateway names one."""
        for hub in among or self.hubs:
            view = await self.cluster_view(hub)
            if not view or not view.get("leader"):
                continue
            leading = [p["hub_id"] for p in view["processes"] if p.get("leading") and p.get("state") == "up"]
            if view["leader"]["hub_id"] in leading:
                return str(view["leader"]["hub_id"]), int(view["leader"]["epoch"])
        return None

    async def wait_leader(self, timeout_s: float, *, newer_than: int = -1, among: list[HubChild] | None = None,
                          interval_s: float = 0.05) -> tuple[str, int]:
        """Until a gateway of ``among`` names a leader with an epoch above ``newer_than``."""
        deadline = time.monotonic() + timeout_s
        while True:
            got = await self.leader(among=among)
            if got is not None and got[1] > newer_than:
                return got
            if time.monotonic() > deadline:
                raise RuntimeError(f"no leader with an epoch above {newer_than} within {timeout_s:g} s (last: {got})")
            await asyncio.sleep(interval_s)

    # ------------------------------------------------------------------ parts

    def _stored_credentials(self) -> dict[str, str] | None:
        try:
            creds = json.loads(self.credentials_path.read_text())
            self.credentials_path.unlink()  # written again once ready: its appearance means "ready"
            return {"admin_key": str(creds["admin_key"]), "tenant_key": str(creds["tenant_key"])}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _plan_hubs(self, creds: natsconf.CredentialSet) -> list[HubChild]:
        opts = self.opts
        data = opts.data_dir
        urls = [f"nats://{n.host}:{n.client_port}" for n in self.nodes]
        user, password = creds.hub.user, creds.hub.password
        hubs = []
        ports = [opts.port + i for i in range(HUBS)] if opts.port else [free_port(opts.host) for _ in range(HUBS)]
        for i, port in enumerate(ports):
            hub_id = f"hub-{i + 1}"
            home = data / "hubs" / hub_id
            private_files.private_dir(home)
            doc: dict[str, Any] = {
                "hub_id": hub_id, "role": "hub", "record": "nats", "nats_url": ",".join(urls),
                "nats_user": user, "nats_password": password,
                # the record's connection takes its identity from the URLs (the record has no user field)
                "record_nats_urls": [u.replace("nats://", f"nats://{user}:{password}@") for u in urls],
                "db_path": str(home / "hub.db"), "listen_host": opts.host, "listen_port": port,
                "sim_time_scale": opts.sim_time_scale, "strict_inboxes": True,
                "layout": opts.layout, "tls_cert": opts.tls_cert, "tls_key": opts.tls_key,
                "trusted_proxies": list(opts.trusted_proxies), **self.hub_overrides,
            }
            config = home / "hub.toml"
            private_files.write_private(config, msgspec.toml.encode({k: v for k, v in doc.items() if v is not None}))
            hubs.append(HubChild(hub_id, config, port, home / "hub.log"))
        return hubs

    async def _start_nats(self, creds: natsconf.CredentialSet) -> None:
        data = self.opts.data_dir
        confs = natsregions.supercluster_configs(creds, {REGION: self.nodes})[REGION]
        for node in self.nodes:
            path = data / "nats" / f"{node.name}.conf"
            private_files.private_dir(path.parent)
            private_files.write_private(path, confs[node.name])
            self.servers[node.name] = NatsServer(data / "nats" / node.name, port=node.client_port,
                                                 host=node.listen_host, config=path,
                                                 gomaxprocs=default_gomaxprocs())  # 1 on a small host
        # A clustered server is ready only once its routes are up: start them all together.
        await asyncio.gather(*(s.start(timeout_s=self.opts.ready_timeout_s) for s in self.servers.values()))

    def monitor_port(self, name: str) -> int:
        node = next(n for n in self.nodes if n.name == name)
        return int(str(node.monitor).rsplit(":", 1)[1])

    async def _wait_jetstream(self) -> None:
        await wait_meta_leader([self.monitor_port(n.name) for n in self.nodes], 3 * self.opts.ready_timeout_s)

    async def _start_agents(self, creds: natsconf.CredentialSet) -> None:
        from controlplane.runtime import WallClock
        from controlplane.tools.up import agent_config_for
        from edge_agent.agent import Agent

        assert self.layout is not None
        urls = [s.url for s in self.servers.values()]  # the agent takes one URL: spread over the nodes
        configs = [agent_config_for(site, urls[i % len(urls)], self.opts.data_dir,
                                    (creds.sites[site.id].user, creds.sites[site.id].password))
                   for i, site in enumerate(self.layout.sites)]
        clock = WallClock()
        self.agents = [Agent(c, clock=clock) for c in configs]
        await asyncio.gather(*(a.start() for a in self.agents))

    async def _call(self, hub: HubChild, method: str, path: str, key: str, body: Any = None) -> tuple[int, Any]:
        assert self._session is not None
        async with self._session.request(method, hub.url(self.opts.host) + path, json=body,
                                         headers={"Authorization": f"Bearer {key}"}) as resp:
            try:
                return resp.status, await resp.json(content_type=None)
            except ValueError:
                return resp.status, None

    async def _works(self, hub: HubChild, key: str, path: str) -> bool:
        status, _ = await self._call(hub, "GET", path, key)
        return status == 200

    async def _demo_tenant(self, stored: str | None) -> str:
        from controlplane.tools.up import DEMO_TENANT, _demo_origin

        assert self.layout is not None
        first, admin = self.hubs[0], self.credentials["admin_key"]
        if stored and await self._works(first, stored, "/v1/models"):
            return stored
        status, made = await self._call(first, "POST", "/v1/tenants", admin,
                                        {"id": DEMO_TENANT, "name": "Demo tenant", "default_origin": _demo_origin(self.layout)})
        if status == 201:
            return str(made["api_key"])
        status, made = await self._call(first, "POST", f"/v1/tenants/{DEMO_TENANT}/keys", admin, {"label": "cpn up --ha"})
        if status != 201:
            raise RuntimeError(f"the demo tenant's key: {status} {made}")
        return str(made.get("api_key") or made.get("key"))

    async def _deploy_demo(self) -> None:
        from controlplane.tools.up import DEMO_MODEL

        assert self.layout is not None
        key = self.credentials["tenant_key"]
        status, listing = await self._call(self.hubs[0], "GET", "/v1/deployments", key)
        if status == 200 and any(d.get("model") == DEMO_MODEL for d in listing.get("data", [])):
            return
        spec = {"model": DEMO_MODEL, "origins": [o.id for o in self.layout.origins], "budget_ms": 10.0,
                "cards_per_replica": 0.25, "min_cities": 2, "slots_per_replica": 8}
        status, made = await self._call(self.hubs[0], "POST", "/v1/deployments", key, spec)
        if status not in (200, 201, 202):
            raise RuntimeError(f"the demo deployment: {status} {made}")

    async def _wait_registered(self) -> None:
        assert self.layout is not None
        n = len(self.layout.sites)
        deadline = time.monotonic() + self.opts.ready_timeout_s
        admin = self.credentials["admin_key"]
        for hub in self.hubs:
            while True:
                status, body = await self._call(hub, "GET", "/v1/sites", admin)
                up = sum(1 for s in (body or {}).get("data", []) if s.get("state") == "up") if status == 200 else 0
                if up >= n:
                    break
                if time.monotonic() > deadline:
                    log.warning("event=not_all_sites_registered hub=%s up=%d of=%d", hub.hub_id, up, n)
                    return
                await asyncio.sleep(0.1)

    async def _wait_demo_served(self) -> None:
        """Until the demo model answers at every gateway (the banner's curl works at each)."""
        started = time.monotonic()
        next_warning = started + self.opts.ready_timeout_s
        for hub in self.hubs:
            while True:
                status, body = await self.chat(hub)
                if status == 200:
                    break
                if time.monotonic() >= next_warning:
                    next_warning += self.opts.ready_timeout_s
                    log.warning("event=demo_not_ready hub=%s waited_s=%.0f answer=%s %s", hub.hub_id,
                                time.monotonic() - started, status, body)
                await asyncio.sleep(0.1)

    async def chat(self, hub: HubChild) -> tuple[int, Any]:
        from controlplane.tools.up import DEMO_MODEL

        try:
            return await self._call(hub, "POST", "/v1/chat/completions", self.credentials["tenant_key"],
                                    {"model": DEMO_MODEL, "messages": [{"role": "user", "content": "hello"}]})
        except (aiohttp.ClientError, TimeoutError) as exc:
            return 0, repr(exc)

    # ------------------------------------------------------------------ what the user sees

    def banner(self, leader: tuple[str, int] | None) -> str:
        from controlplane.tools.up import DEMO_MODEL, DEMO_TENANT

        host = self.opts.host
        key = self.credentials.get("tenant_key", "")
        lines = ["", f"cpn is up (HA): {len(self.layout.sites) if self.layout else 0} sites, {len(self.hubs)} hub "
                     f"processes on the replicated record, a {len(self.servers)}-node NATS cluster"]
        for h in self.hubs:
            lead = f" (leads, epoch {leader[1]})" if leader and leader[0] == h.hub_id else ""
            lines.append(f"  hub {h.hub_id}: gateway at {h.url(host)} pid {h.pid}{lead}")
        lines.append(f"  leader:      {leader[0]} epoch {leader[1]}" if leader else "  leader:      none yet")
        lines.append(f"  NATS:        {', '.join(s.url for s in self.servers.values())}")
        lines += [
            f"  admin key:   {self.credentials.get('admin_key', '')}",
            f"  tenant key:  {key}   (tenant '{DEMO_TENANT}')",
            f"  credentials: {self.credentials_path}",
            f"  hub logs:    {self.opts.data_dir / 'hubs'}/<hub>/hub.log",
            "",
            "Try it at any gateway (OpenAI-compatible); who leads: GET /v1/cluster with the admin key:",
            "",
            f"  curl -s {self.hubs[0].url(host)}/v1/chat/completions -H 'Authorization: Bearer {key}' "
            f"-H 'Content-Type: application/json' -d '{{\"model\": \"{DEMO_MODEL}\", \"messages\": "
            f"[{{\"role\": \"user\", \"content\": \"hello\"}}]}}' -D - ",
            "",
            "Ctrl-C drains and stops everything.",
            "",
        ]
        return "\n".join(lines)


async def run(opts: UpOptions) -> None:
    """Start the HA network, print the banner, wait for cancellation, stop everything."""
    from edge_agent import gc_tuning

    net = HaNetwork(opts)
    try:
        await net.start()
        print(net.banner(await net.leader()), flush=True)
        gc_tuning.settle_after_startup()
        await asyncio.Event().wait()
    finally:
        await net.stop()


__all__ = ["HUBS", "HaNetwork", "HubChild", "run"]
