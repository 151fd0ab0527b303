"""``cpn bench regions``: what a tenant gets entering at its region's gateway vs at one central gateway.

Method:

- ``cpn up --regions N``'s network in this process (the shipped layout's first N regions as a NATS
  super-cluster, a controller and a gateway per region), with ``--sites`` sites per region (those
  nearest its gateway city; the other sites are not run).
- WAN made real with fault proxies **in a child process of their own**
  (:mod:`controlplane.tools.proxyhost`), so the delays they add do not wait on this process's event
  loop: every gateway connection between two regional clusters is delayed by half the layout's RTT
  between their cluster cities each way (floor ``--floor-ms``), every site's access link by half
  the RTT between its region's cluster city and it, a gateway's link to its cluster by half the RTT
  between its city and the cluster's (only the north-west's, at Xi'an, is not in its cluster city),
  and each (origin, gateway) tenant leg by half the layout's RTT origin -> gateway city each way.
- Origins, per region: the ``--origins`` heaviest **with an in-region site of the run within the
  budget** on the full path the router counts (origin -> the region's gateway city -> site), and,
  reported apart and never mixed into the in-region figures, the ``--origins`` heaviest without one
  (in the shipped layout, e.g., Nanyang: ~12 ms to Wuhan's gateway's nearest site; and the whole
  north-west, whose gateway at Xi'an reaches Xi'an's pools through Zhongwei in 16.3 ms). Each sends ``--warmup``
  requests (not counted: a new connection through a new proxy) then ``--requests`` ``POST /v1/infer``
  (``policy: nearest``, so the central gateway serves and the table shows by how much it misses)
  alternately to its own region's gateway and to the home region's ("central") gateway: same run,
  interleaved.
- Figure: client-measured latency minus what the bench itself adds: the site's ``service_ms``, the
  tenant's floor (:func:`tenant_floor`: the same client through the same kind of proxy to a server
  answering at once, :mod:`bench.regions_floor`: the client's aiohttp, the proxy and loopback, none
  of it cpn's, measured end to end in the same run), and on the relay's links
  the proxies' own cost per crossing (their forwarding and timer error: a WAN has no Python proxy),
  calibrated in the same run by round trips to an echo server through a delaying proxy and directly,
  interleaved (a leg without delay, e.g. a tenant in its gateway's city, costs less: no timer, and
  is calibrated apart); 1 crossing for a site in the gateway's region (its access link), 2 across
  two clusters. The raw p99 (only ``service_ms`` subtracted) is shown next to it. What is left is
  the network's delays and cpn's own processing (hub, NATS, agent: ~1.3 ms at c=1 on a loaded
  2-core machine, measured with ``--wan none``), against the budget (10 ms); next to it the RTT the
  hub promised (``rtt_ms``, the ``X-CPN-RTT-Ms`` figure) and how far beyond it the figure is.
- The promise: ``X-CPN-RTT-Ms`` + ``X-CPN-Overhead-Ms`` (cpn's own time the gateway measured on its
  recent answers from that site, docs/topology.md "The latency a tenant gets"). "Beyond promise" is
  the client's latency less ``service_ms``, the tenant's floor and the promise. The
  gateway measures its relay with the proxies on it (it cannot tell them from a WAN), so only the
  tenant's floor is subtracted there; target ~0 at p50. Beside it, "proxy only": the same with the
  tenant leg's proxy crossing subtracted instead of the floor (how it was measured before).
- The client runs in a process of its own (:mod:`bench.regions_client`): in this one it shared
  the event loop with four hubs and the agents, and read each answer only after whatever else that
  loop had queued, a delay no tenant has.
- ``--wan zero`` (proxies, no delay) and ``--wan none`` (no proxies) show where the time goes.
  The proxies' child waits on ``select``, not epoll: epoll rounds every timer up to a whole
  millisecond, which had put ~4 ms per request of the proxies' own error into the figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import common
from bench import regions_client
from bench.regions_floor import FloorServer
from controlplane.core import overhead
from controlplane.tools.proxyhost import ProxyHost
from controlplane.tools.up import DEMO_MODEL, UpOptions
from controlplane.tools.upregions import RefusingPort, RegionalNetwork
from edge_agent import gc_tuning, wire
from topology import latency, loader
from topology import layout as topo_layout
from topology.ingress import ClusterPaths, city_rtt_ms

BUDGET_MS = 10.0


class Wan:
    """The links between regional clusters, each through a proxy of the child, delayed by the layout's RTT."""

    def __init__(self, host: ProxyHost, one_way_ms: dict[tuple[str, str], float],
                 site_one_way_ms: dict[str, float], mode: str = "layout",
                 gateway_one_way_ms: dict[str, float] | None = None) -> None:
        self.host = host
        self.one_way_ms = one_way_ms
        self.site_one_way_ms = site_one_way_ms
        self.gateway_one_way_ms = gateway_one_way_ms or {}
        """Region -> half the RTT between its gateway city and its cluster city (0: the same city)."""
        self.proxies: list[tuple[int, float]] = []
        self._refusing = RefusingPort()  # held for the run: a port merely picked free could be taken
        self.refused_address = self._refusing.address
        self.off = mode == "none"
        """No proxies at all (``--wan none``): the agents and the tenant dial the servers themselves."""
        self.scale = 0.0 if mode == "zero" else 1.0
        """What the layout's delays are multiplied by (``--wan zero``: proxies that delay nothing)."""

    async def gateway(self, region: str, url: str) -> str:
        """The region's gateway's link to its cluster, delayed by half the RTT between the gateway
        city and the cluster city (none when they are one city)."""
        ms = self.gateway_one_way_ms.get(region, 0.0)
        if self.off or ms <= 0:
            return url
        pid, port = await self.host.add(url)
        self.proxies.append((pid, ms))
        return f"nats://127.0.0.1:{port}"

    async def site(self, site: str, region: str, url: str) -> str:
        """The site's access link, delayed by half the RTT between its region's cluster city and it."""
        if self.off:
            return url
        pid, port = await self.host.add(url)
        self.proxies.append((pid, self.site_one_way_ms[site]))
        return f"nats://127.0.0.1:{port}"

    async def link(self, dialer: str, target: str, url: str) -> str:
        pid, port = await self.host.add(url)
        self.proxies.append((pid, self.one_way_ms[(dialer, target)]))
        return f"nats://127.0.0.1:{port}"

    def close(self) -> None:
        self._refusing.close()

    async def delay(self) -> None:
        """The WAN delays on (after start-up: what is measured is the requests, not the start)."""
        for pid, ms in self.proxies:
            await self.host.set_mode([pid], "delay", ms * self.scale)


class Probe:
    """Where each request's time went, read inside this process, where the gateways and the agents
    run: when a gateway's connection read each request and its handler finished the answer (its
    ``relayed`` call, the overhead measurement's own endpoints), and when an agent started and finished answering it,
    by request id, on ``time.monotonic()``, the clock the client process stamps too. Bench-only: the
    methods are wrapped on the instances of this run."""

    def __init__(self) -> None:
        self.gateway: dict[str, tuple[float, float]] = {}
        self.agent: dict[str, tuple[float, float]] = {}

    def attach(self, net: RegionalNetwork) -> None:
        for region in net.regions:
            assert region.gateway is not None
            self._wrap_gateway(region.gateway.services.inference)
            for agent in region.agents:
                self._wrap_agent(agent.inference)

    def _wrap_gateway(self, inference: Any) -> None:
        relayed = inference.relayed
        spans = self.gateway

        def timed(served: Any, origin: str, took_ms: float) -> None:
            now = time.monotonic()
            if served.result is not None:
                spans[served.result.request_id] = (now - took_ms / 1000.0, now)
            relayed(served, origin, took_ms)

        inference.relayed = timed

    def _wrap_agent(self, inference: Any) -> None:
        # Every request message reaches ``answer_now`` first (the agent's NATS callback), served at
        # once or not; every answer is encoded by ``_result``, then published.
        answer_now, result = inference.answer_now, inference._result
        started: dict[str, float] = {}
        spans = self.agent

        def first(msg: Any) -> bytes | None:
            t0 = time.monotonic()
            with contextlib.suppress(Exception):
                started[wire.infer_request_decoder.decode(msg.data).request_id] = t0
            out: bytes | None = answer_now(msg)
            return out

        def encoded(request: wire.InferRequest, completion: Any, service_ms: float) -> bytes:
            out: bytes = result(request, completion, service_ms)
            t0 = started.pop(request.request_id, None)
            if t0 is not None:
                spans[request.request_id] = (t0, time.monotonic())
            return out

        inference.answer_now = first
        inference._result = encoded


class LoopWatch:
    """How late this process's event loop (the gateways', the agents' and the controller's) woke a
    timer, and whether it was busy meanwhile: a wake-up every :attr:`every_s`, its lateness, and the
    process's CPU time over the same interval. A late wake-up with the CPU time to match is work in
    this process (the hubs and agents of the run); without it the process waited for a core (the
    other processes of the machine)."""

    def __init__(self, every_s: float = 0.02) -> None:
        self.every_s = every_s
        self.samples: list[tuple[float, float]] = []
        """(lateness ms, the process's CPU ms over the interval) per wake-up"""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            t0, c0 = time.monotonic(), time.process_time()
            await asyncio.sleep(self.every_s)
            t1, c1 = time.monotonic(), time.process_time()
            self.samples.append(((t1 - t0 - self.every_s) * 1000, (c1 - c0) * 1000))

    async def stop(self) -> dict[str, float]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if not self.samples:  # not started
            return {"wakeups": 0}
        late = sorted(v for v, _ in self.samples)
        stalls = [(v, c) for v, c in self.samples if v > 1.0]
        return {"wakeups": len(late), "late_ms_p50": _p(late, 50), "late_ms_p99": _p(late, 99),
                "late_ms_max": round(late[-1], 2) if late else 0.0,
                "stalls_over_1ms": len(stalls),
                # of the time those stalls lasted (the interval), how much this process was on a core
                "stall_busy_share": round(sum(c for _, c in stalls)
                                          / max(1e-9, sum(v + self.every_s * 1000 for v, _ in stalls)), 3)}


PARTS = ("tenant_in", "to_agent", "agent", "from_agent", "tenant_out")
"""A request's time beyond what the layout's delays and the site's service time account for, in five
parts: ``tenant_in`` (client sent -> the gateway's connection read it, where the gateway's measurement
starts: the client writing it, the tenant leg's proxy beyond its delay, loopback), ``to_agent`` (-> the
agent started on it: aiohttp parsing it and the gateway's loop getting to its handler, the gateway
routing and publishing, the NATS servers, the site link's proxy beyond its delay, the agent's loop
waking), ``agent`` (its answer, less ``service_ms``), ``from_agent`` (-> the gateway's answer
encoded: NATS back, the gateway waking and encoding), ``tenant_out`` (-> the client read it:
aiohttp writing, the proxy back, the client waking)."""


def parts_of(sent: float, received: float, gateway: tuple[float, float], agent: tuple[float, float],
             service_ms: float, tenant_one_way_ms: float, relay_one_way_ms: float) -> dict[str, float]:
    """The :data:`PARTS` of one request (ms), from the stamps of the client, the gateway and the agent
    and the layout's one-way delays of the tenant's leg and of the relay (gateway -> site)."""
    (h0, h1), (a0, a1) = gateway, agent
    return {"tenant_in": (h0 - sent) * 1000 - tenant_one_way_ms,
            "to_agent": (a0 - h0) * 1000 - relay_one_way_ms,
            "agent": (a1 - a0) * 1000 - service_ms,
            "from_agent": (h1 - a1) * 1000 - relay_one_way_ms,
            "tenant_out": (received - h1) * 1000 - tenant_one_way_ms}


def _site_rtt_ms(index: latency.RttIndex, city: str, site: str) -> float:
    return next(rtt for s, rtt in index.ranked(city) if s == site)


@dataclass(frozen=True)
class Origin:
    """A measured origin of a region: its full path through its own region's gateway to the nearest
    in-region site of the run (the layout's figure), and whether that path is within the budget."""

    id: str
    region: str
    path_ms: float

    @property
    def in_budget(self) -> bool:
        """Whether the promise the router checks fits the budget: the path + cpn's own time, here the
        gateway's figure before it has measured any (``overhead.FLOOR_MS``); an origin whose measured
        promise then exceeds the budget is moved to the "outside" rows (:func:`run`)."""
        return self.path_ms + overhead.FLOOR_MS <= BUDGET_MS


def choose_origins(layout: topo_layout.Layout, index: latency.RttIndex, gateway_city: str, region: str,
                   sites: tuple[str, ...], n: int) -> tuple[list[Origin], list[Origin]]:
    """The ``n`` heaviest origins of ``region`` with an in-region site of the run within the budget
    on the full path (origin -> the region's gateway -> site, as the router counts it), and the ``n``
    heaviest without one (their leg to the gateway alone can exceed the budget: reported apart)."""
    paths = ClusterPaths(layout, index)
    own = [rtt for s, rtt in paths.ranked_from(gateway_city) if s in sites and layout.region_of_site(s) == region]
    nearest = own[0] if own else float("inf")
    ranked = sorted((o for o in layout.origins if layout.region_of_province(o.region) == region),
                    key=lambda o: (-o.weight, o.id))
    origins = [Origin(o.id, region, city_rtt_ms(index, o.id, gateway_city) + nearest) for o in ranked]
    return [o for o in origins if o.in_budget][:n], [o for o in origins if not o.in_budget][:n]


async def calibrate(host: ProxyHost, rounds: int, delay_ms: float) -> list[float]:
    """What one proxy crossing (a request through it and its answer back) costs beyond the delay it
    was asked for: round trips of a 1 KiB message to an echo server in this process, directly and
    through a proxy of the child delaying ``delay_ms`` each way, interleaved; each pair's difference
    minus 2 x ``delay_ms``. It is the bench's own cost (a WAN has no Python proxy on it). A proxy
    without delay costs less (no timer): it is calibrated apart, with ``delay_ms`` 0."""
    async with echo_server() as upstream:
        pid, proxy_port = await host.add(upstream)
        await host.set_mode([pid], "delay", delay_ms)
        port = int(upstream.rsplit(":", 1)[1])
        conns = [await asyncio.open_connection("127.0.0.1", p) for p in (port, proxy_port)]
        payload = b"x" * 1024
        out = []
        try:
            for _ in range(rounds):
                took = []
                for reader, writer in conns:
                    t0 = time.perf_counter()
                    writer.write(payload)
                    got = 0
                    while got < len(payload):
                        got += len(await reader.read(65536))
                    took.append((time.perf_counter() - t0) * 1000)
                out.append(took[1] - took[0] - 2 * delay_ms)
        finally:
            for _, writer in conns:
                writer.close()
            await host.remove([pid])
    return out


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[str]:
    """A TCP server on loopback that sends back what it reads, as a proxy's upstream URL
    (``nats://127.0.0.1:PORT``); closed on exit."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield f"nats://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


async def run(n_regions: int, n_origins: int, requests: int, floor_ms: float, sites: int,
              wan_mode: str = "layout", warmup: int = 3, client_mode: str = "process",
              with_parts: bool = False) -> dict[str, Any]:
    layout = loader.load_default()
    index = latency.RttIndex.build(layout)
    kept = layout.regions[:n_regions]
    one_way = {(a.id, b.id): max(floor_ms, city_rtt_ms(index, a.cluster, b.cluster) / 2)
               for a in kept for b in kept if a is not b}
    # A site's access link carries what the layout puts between its region's cluster city and it,
    # a gateway's link to its cluster what it puts between the two cities (no floor: the promise
    # counts the layout's figures, the NATS path gateway city -> cluster city -> site, and so do the
    # proxies; the two differ only for a gateway away from its cluster, the north-west's at Xi'an).
    site_one_way = {s.id: _site_rtt_ms(index, r.cluster, s.id) / 2
                    for r in kept for s in layout.sites if layout.region_of_site(s.id) == r.id}
    gateway_one_way = {r.id: city_rtt_ms(index, r.gateways[0] if r.gateways else r.cluster, r.cluster) / 2
                       for r in kept}
    load_before = round(os.getloadavg()[0], 2)
    host = ProxyHost()
    await host.start()
    wan = Wan(host, one_way, site_one_way, wan_mode, gateway_one_way)
    measured: dict[str, list[Origin]] = {}
    outside: dict[str, list[Origin]] = {}
    proxy_cost: dict[str, list[float]] = {"delayed": [], "undelayed": []}
    floors: dict[str, list[float]] = {}
    """The tenant's floor (:func:`tenant_floor`): "delayed", "undelayed" or "direct" -> round trips (ms)"""
    lateness: dict[str, float] = {}
    not_served: dict[str, str] = {}
    promise_over: dict[str, float] = {}
    """Origins chosen in budget whose measured promise (RTT + overhead, p50) was not: moved outside."""
    with tempfile.TemporaryDirectory(prefix="cpn-bench-regions-") as tmp:
        net = RegionalNetwork(UpOptions(data_dir=Path(tmp), port=0, regions=n_regions, ready_timeout_s=60.0),
                              wan=None if wan.off else wan, fold_sites=False, max_sites=sites)
        try:
            t0 = time.monotonic()
            await net.start()
            started_s = time.monotonic() - t0
            not_served = net.not_served
            # What `cpn up --regions` does once up: the start-up heap frozen, young collections rarer
            # (without it ~3% of the answers overlapped a collection, 4.5 ms slower on average: the p99).
            gc_tuning.settle_after_startup()
            probe = Probe()
            watch = LoopWatch()
            if with_parts:  # off by default: the figures are then taken exactly as without them
                probe.attach(net)
                watch.start()
            await wan.delay()
            key = net.credentials["tenant_key"]
            central = net.regions[0]
            samples: dict[tuple[str, str, str], list[tuple[float, int, int, float, float, str]]] = {}
            """(origin kind, region, mode) -> (client ms - service ms, crossings beyond the tenant's leg
            through a delaying proxy, through one without delay, promised rtt, stated overhead, the
            tenant's leg: "delayed", "undelayed" or "direct" (no proxy)) per answer"""
            by_origin: dict[tuple[str, str, str], list[float]] = {}
            parts: dict[tuple[str, str, str, str], list[dict[str, float]]] = {}
            """(origin kind, region, origin, mode) -> each answer's :data:`PARTS` and its total"""
            tenant_late: dict[tuple[str, str, str], dict[str, float]] = {}
            """(region, origin, mode) -> how late the tenant leg's proxy's delayed chunks left"""
            promised_of: dict[tuple[str, str, str], float] = {}
            in_region: dict[tuple[str, str, str], int] = {}
            errors: dict[tuple[str, str, str], int] = {}
            client: regions_client.Client | regions_client.InlineClient = (
                regions_client.Client() if client_mode == "process" else regions_client.InlineClient())
            await client.start()
            floor = FloorServer()
            await floor.start()
            try:
                for region in net.regions:
                    rid = region.plan.id
                    measured[rid], outside[rid] = choose_origins(layout, index, region.plan.gateway_city, rid,
                                                                 region.plan.sites, n_origins)
                    for origin in list(measured[rid] + outside[rid]):
                        legs = {}
                        leg_ms = {}
                        leg_ids = []
                        leg_pid: dict[str, int] = {}
                        for mode, gw in (("regional", region), ("central", central)):
                            if wan.off:
                                legs[mode] = net.gateway_url(gw)
                                continue
                            pid, port = await host.add(net.gateway_url(gw).replace("http://", "nats://"))
                            leg_ids.append(pid)
                            leg_pid[mode] = pid
                            leg_ms[mode] = wan.scale * city_rtt_ms(index, origin.id, gw.plan.gateway_city) / 2
                            await host.set_mode([pid], "delay", leg_ms[mode])
                            legs[mode] = f"http://127.0.0.1:{port}"
                        body = {"model": DEMO_MODEL, "input": "hi", "origin": origin.id, "policy": "nearest",
                                "max_tokens": 1}
                        answers = await client.origin({"key": key, "legs": legs, "warmup": warmup,
                                                   "requests": requests, "body": body})
                        # In budget is what the gateway promised at its own door: RTT + its measured
                        # overhead (p50 over the counted answers), as the router now checks it.
                        promised = sorted(rtt + over for mode, i, status, _, _, _, rtt, over, *_ in answers
                                          if mode == "regional" and i >= warmup and status == 200)
                        kind = "in_budget" if origin.in_budget else "outside"
                        if kind == "in_budget" and promised and common.percentile(promised, 50) > BUDGET_MS:
                            kind = "outside"
                            measured[rid].remove(origin)
                            outside[rid].append(Origin(origin.id, rid, common.percentile(promised, 50)))
                            promise_over[f"{rid}/{origin.id}"] = round(common.percentile(promised, 50), 2)
                        for mode, i, status, took_ms, service_ms, site, rtt_ms, overhead_ms, rid_, sent, got in answers:
                            if i < warmup:
                                continue
                            k = (kind, rid, mode)
                            if status != 200:
                                errors[k] = errors.get(k, 0) + 1
                                continue
                            served_in = layout.region_of_site(site)
                            gw_region = rid if mode == "regional" else central.plan.id
                            # proxies crossed there and back beyond the tenant's leg (the floor's):
                            # the site's access link, and a link between two clusters when the site
                            # is in another region
                            delays = [] if wan.off else [wan.scale * site_one_way[site]]
                            if not wan.off and gateway_one_way[gw_region] > 0:
                                delays.append(wan.scale * gateway_one_way[gw_region])
                            if not wan.off and served_in != gw_region:
                                delays.append(wan.scale * floor_ms)
                            samples.setdefault(k, []).append(
                                (took_ms - service_ms, sum(d > 0 for d in delays),
                                 sum(d <= 0 for d in delays), rtt_ms, overhead_ms,
                                 "direct" if wan.off else "delayed" if leg_ms[mode] > 0 else "undelayed"))
                            by_origin.setdefault((rid, origin.id, mode), []).append(took_ms - service_ms)
                            g, a = probe.gateway.pop(rid_, None), probe.agent.pop(rid_, None)
                            if g is not None and a is not None:
                                relay = 0.0 if wan.off else wan.scale * (
                                    site_one_way[site] + gateway_one_way[gw_region]
                                    + (one_way[(gw_region, served_in)] if served_in and served_in != gw_region else 0.0))
                                split = parts_of(sent, got, g, a, service_ms, 0.0 if wan.off else leg_ms[mode], relay)
                                split["total"] = took_ms - service_ms
                                parts.setdefault((kind, rid, origin.id, mode), []).append(split)
                            promised_of[(rid, origin.id, mode)] = rtt_ms
                            if served_in == rid:
                                in_region[k] = in_region.get(k, 0) + 1
                        for mode, pid in leg_pid.items():
                            tenant_late[(rid, origin.id, mode)] = await host.stats([pid])
                        if leg_ids:  # done with this origin: its legs' descriptors back
                            await host.remove(leg_ids)
                        if not wan.off:
                            proxy_cost["delayed"] += await calibrate(host, 10, 1.0)
                            proxy_cost["undelayed"] += await calibrate(host, 10, 0.0)
                        for mode, ms in (await tenant_floor(client, host, floor.port, wan.off, 10)).items():
                            floors.setdefault(mode, []).extend(ms)
            finally:
                await client.close()
                await floor.close()
                loop_lag = await watch.stop()
            if not wan.off:
                lateness = await host.stats()
        finally:
            await net.stop()
            await host.close()
            wan.close()
    cost = {k: common.percentile(sorted(v), 50) if v else 0.0 for k, v in proxy_cost.items()}
    cost["direct"] = 0.0
    tenant = {k: common.percentile(sorted(v), 50) for k, v in floors.items() if v}
    rows = []
    for (kind, rid, mode), got in sorted(samples.items(), key=lambda kv: (kv[0][0] != "in_budget", kv[0][1:])):
        raw = sorted(v for v, *_ in got)
        # What the bench adds: the tenant's floor (its client, the leg's proxy, loopback: measured
        # end to end against a server that answers at once) and the relay's proxies' own cost.
        net_ms = sorted(v - tenant.get(leg, cost[leg]) - d * cost["delayed"] - u * cost["undelayed"]
                        for v, d, u, _, _, leg in got)
        beyond_rtt = sorted(v - tenant.get(leg, cost[leg]) - d * cost["delayed"] - u * cost["undelayed"] - p
                            for v, d, u, p, _, leg in got)
        # The promise is X-CPN-RTT-Ms + X-CPN-Overhead-Ms. The overhead is what the gateway measured
        # on its relay, proxies on that relay included (it cannot tell them from a WAN): only the
        # tenant's floor is the bench's own cost here.
        beyond = sorted(v - tenant.get(leg, cost[leg]) - p - o for v, _, _, p, o, leg in got)
        # As measured before the floor: only the tenant leg's proxy subtracted (its echo calibration)
        beyond_proxy = sorted(v - cost[leg] - p - o for v, _, _, p, o, leg in got)
        rows.append({"origins": kind, "region": rid, "mode": mode, "n": len(got),
                     "errors": errors.get((kind, rid, mode), 0),
                     "served_in_region": in_region.get((kind, rid, mode), 0),
                     "p50_ms": round(common.percentile(net_ms, 50), 2),
                     "p99_ms": round(common.percentile(net_ms, 99), 2),
                     "raw_p50_ms": round(common.percentile(raw, 50), 2),
                     "raw_p99_ms": round(common.percentile(raw, 99), 2),
                     "promised_rtt_p50_ms": round(common.percentile(sorted(p for _, _, _, p, *_ in got), 50), 2),
                     "stated_overhead_p50_ms": round(common.percentile(sorted(o for *_, o, _ in got), 50), 2),
                     "beyond_rtt_p50_ms": round(common.percentile(beyond_rtt, 50), 2),
                     "beyond_promise_p50_ms": round(common.percentile(beyond, 50), 2),
                     "beyond_promise_p99_ms": round(common.percentile(beyond, 99), 2),
                     "beyond_promise_proxy_only_p50_ms": round(common.percentile(beyond_proxy, 50), 2),
                     # The stated overhead is the 90th percentile of recent relays: about 10% of the
                     # answers beyond the promise is the estimate doing its job; many more, it lags.
                     "share_beyond_promise": round(sum(1 for v in beyond if v > 0) / len(beyond), 3),
                     "within_budget_p99": common.percentile(net_ms, 99) <= BUDGET_MS,
                     # which answer the p99 is: of 80 answers, the 2nd slowest (two hiccups set it)
                     "p99_nth_slowest": len(net_ms) - _rank(len(net_ms), 99)})
    origin_rows = [{"region": rid, "origin": oid, "mode": mode, "n": len(v),
                    "in_budget": any(o.id == oid for o in measured.get(rid, [])),
                    "p50_ms": round(common.percentile(sorted(v), 50), 2),
                    "p99_ms": round(common.percentile(sorted(v), 99), 2),
                    "promised_rtt_ms": round(promised_of[(rid, oid, mode)], 2)}
                   for (rid, oid, mode), v in sorted(by_origin.items())]
    return {"bench": "regions", "machine": common.machine(), "date": time.strftime("%Y-%m-%d"),
            "regions": n_regions, "sites_per_region": sites, "origins_per_region": n_origins,
            "requests_per_origin_and_mode": requests, "warmup_per_origin_and_mode": warmup,
            "budget_ms": BUDGET_MS, "proxies": "child process", "wan": wan_mode, "client": client_mode,
            "subtracted": {"service_ms": "the site's own service time (its answer's service_ms)",
                           "proxy_ms_per_crossing": round(cost["delayed"], 3),
                           "proxy_ms_per_crossing_undelayed": round(cost["undelayed"], 3),
                           "proxy_cost_samples": len(proxy_cost["delayed"]) + len(proxy_cost["undelayed"]),
                           "tenant_floor_ms": {k: round(v, 3) for k, v in tenant.items()},
                           "tenant_floor_p99_ms": {k: round(common.percentile(sorted(v), 99), 3)
                                                   for k, v in floors.items() if v},
                           "tenant_floor_samples": sum(len(v) for v in floors.values())},
            "proxy_lateness_ms": {k: round(v, 3) for k, v in lateness.items()},
            "measured_origins": {rid: [o.id for o in os] for rid, os in measured.items()},
            "outside_origins": {rid: {o.id: round(o.path_ms, 2) for o in os} for rid, os in outside.items()},
            "wan_one_way_ms": {f"{a}->{b}": round(v, 2) for (a, b), v in one_way.items()},
            "site_one_way_ms": {k: round(v, 2) for k, v in sorted(site_one_way.items())},
            "gateway_one_way_ms": {k: round(v, 2) for k, v in gateway_one_way.items()},
            "not_served": not_served, "promise_over_budget": promise_over,
            "started_s": round(started_s, 1), "rows": rows, "origins": origin_rows,
            "parts": parts_rows(parts, tenant_late), "loop_lag": loop_lag,
            "load_before": load_before, "load_after": round(os.getloadavg()[0], 2)}


async def tenant_floor(client: regions_client.Client | regions_client.InlineClient, host: ProxyHost, port: int,
                       direct: bool, requests: int) -> dict[str, list[float]]:
    """What the bench's own tenant costs a request, none of it cpn's: the same client, through a
    proxy of the same child delaying 1 ms each way and through one without delay (``direct``: no
    proxy, as ``--wan none``'s tenant), to :mod:`bench.regions_floor`, which answers at once; each
    round trip less the delay asked for. Interleaved, 3 warm-up round trips each not counted."""
    legs: dict[str, str] = {}
    delay = {"delayed": 1.0, "undelayed": 0.0, "direct": 0.0}
    pids = []
    if direct:
        legs["direct"] = f"http://127.0.0.1:{port}"
    else:
        for mode in ("delayed", "undelayed"):
            pid, proxy_port = await host.add(f"nats://127.0.0.1:{port}")
            pids.append(pid)
            await host.set_mode([pid], "delay", delay[mode])
            legs[mode] = f"http://127.0.0.1:{proxy_port}"
    try:
        answers = await client.origin({"key": "", "legs": legs, "warmup": 3, "requests": requests,
                                       "body": {"model": "floor", "input": "hi"}})
    finally:
        if pids:
            await host.remove(pids)
    out: dict[str, list[float]] = {}
    for mode, i, status, took_ms, *_ in answers:
        if i >= 3 and status == 200:
            out.setdefault(mode, []).append(took_ms - 2 * delay[mode])
    return out


def _rank(n: int, q: float) -> int:
    """The index :func:`common.percentile` takes for the ``q`` percentile of ``n`` sorted values."""
    return min(n - 1, max(0, round(q / 100 * (n - 1))))


def _nth(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 < 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _p(values: list[float], q: float) -> float:
    return round(common.percentile(sorted(values), q), 2)


def parts_rows(parts: dict[tuple[str, str, str, str], list[dict[str, float]]],
               tenant_late: dict[tuple[str, str, str], dict[str, float]]) -> dict[str, Any]:
    """Per origin and per region (its in-budget origins together): p50 and p99 of each of
    :data:`PARTS`, and the slowest answers of each region's in-budget origins with their parts."""
    by_origin = []
    for (kind, rid, oid, mode), got in sorted(parts.items()):
        late = tenant_late.get((rid, oid, mode), {})
        by_origin.append({"origins": kind, "region": rid, "origin": oid, "mode": mode, "n": len(got),
                          **{f"{k}_p50": _p([g[k] for g in got], 50) for k in (*PARTS, "total")},
                          **{f"{k}_p99": _p([g[k] for g in got], 99) for k in (*PARTS, "total")},
                          "tenant_proxy_late_p50": round(late.get("late_ms_p50", 0.0), 2),
                          "tenant_proxy_late_p99": round(late.get("late_ms_p99", 0.0), 2)})
    by_region = []
    slowest = []
    for rid, mode in sorted({(rid, mode) for (kind, rid, _, mode) in parts if kind == "in_budget"}):
        pooled = [(oid, g) for (kind, r, oid, m), gs in parts.items() if kind == "in_budget" and r == rid and m == mode
                  for g in gs]
        by_region.append({"region": rid, "mode": mode, "n": len(pooled),
                          **{f"{k}_p50": _p([g[k] for _, g in pooled], 50) for k in (*PARTS, "total")},
                          **{f"{k}_p99": _p([g[k] for _, g in pooled], 99) for k in (*PARTS, "total")}})
        for oid, g in sorted(pooled, key=lambda og: -og[1]["total"])[:3]:
            slowest.append({"region": rid, "mode": mode, "origin": oid, **{k: round(v, 2) for k, v in g.items()}})
    return {"by_origin": by_origin, "by_region": by_region, "slowest": slowest}


def print_parts(split: dict[str, Any]) -> None:
    names = ("in", "to agent", "agent", "from agent", "out")
    print("\nwhere the time went beyond the layout's delays and service_ms, p50 / p99 ms (tenant_in: client -> "
          "the gateway's connection read it; to/from agent: the gateway, NATS and the site link; tenant_out: "
          "handler -> client)")
    print(f"  {'region':<9}{'origin':<14}{'mode':<10}{'n':>4}" + "".join(f"{n:>14}" for n in (*names, "total"))
          + f"{'tenant proxy late':>19}")
    for r in split["by_region"]:
        print(f"  {r['region']:<9}{'(in budget)':<14}{r['mode']:<10}{r['n']:>4}"
              + "".join(f"{r[k + '_p50']:>7}/{r[k + '_p99']:<6}" for k in (*PARTS, "total")))
    for r in split["by_origin"]:
        print(f"  {r['region']:<9}{r['origin']:<14}{r['mode']:<10}{r['n']:>4}"
              + "".join(f"{r[k + '_p50']:>7}/{r[k + '_p99']:<6}" for k in (*PARTS, "total"))
              + f"{r['tenant_proxy_late_p50']:>9}/{r['tenant_proxy_late_p99']:<6}"
              + ("" if r["origins"] == "in_budget" else " (outside)"))
    print("  slowest in-budget answers: " + "; ".join(
        f"{s['region']}/{s['mode']}/{s['origin']} {s['total']} (" + ", ".join(f"{k} {s[k]}" for k in PARTS) + ")"
        for s in split["slowest"]))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="cpn bench regions")
    p.add_argument("--regions", type=int, default=3)
    p.add_argument("--origins", type=int, default=3, help="origins per region (the heaviest)")
    p.add_argument("--requests", type=int, default=40, help="requests per origin and mode")
    p.add_argument("--floor-ms", type=float, default=1.0, help="least one-way delay between two clusters")
    p.add_argument("--sites", type=int, default=2, help="sites run per region (nearest its gateway city)")
    p.add_argument("--wan", choices=("layout", "zero", "none"), default="layout",
                   help="layout: the layout's delays; zero: the proxies without delay; none: no proxies "
                        "(where the time goes)")
    p.add_argument("--warmup", type=int, default=3, help="requests per origin and gateway not counted")
    p.add_argument("--parts", action="store_true",
                   help="stamp each request in the gateway and the agent: where its time went, per origin, and "
                        "how late this process's loop woke (docs/benchmarks.md)")
    p.add_argument("--client", choices=("process", "inline"), default="process",
                   help="process: the tenant in a process of its own; inline: in the bench's event loop")
    args = p.parse_args(argv)
    if args.warmup < 0:
        p.error(f"--warmup: {args.warmup}: at least 0")
    for name in ("regions", "origins", "requests", "sites"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: {getattr(args, name)}: at least 1")
    result = asyncio.run(run(args.regions, args.origins, args.requests, args.floor_ms, args.sites, args.wan,
                             args.warmup, args.client, args.parts))
    sub = result["subtracted"]
    late = result["proxy_lateness_ms"]
    print(f"cpn bench regions: client latency minus what the bench adds, ms (budget {BUDGET_MS:g} ms); "
          f"started in {result['started_s']} s; WAN: {result['wan']}; client: {result['client']}; "
          f"load average {result['load_before']} before, {result['load_after']} after")
    print(f"  subtracted from each answer: the site's service_ms, and per proxy crossed there and back "
          f"{sub['proxy_ms_per_crossing']} ms ({sub['proxy_ms_per_crossing_undelayed']} ms for a leg without delay): "
          f"the proxies' own cost, calibrated in this run ({sub['proxy_cost_samples']} interleaved round trips "
          f"through a proxy vs direct; on the relay: 1 crossing in-region, 2 across two clusters)")
    print(f"  the tenant's leg: the bench's floor instead, p50 {sub['tenant_floor_ms']} ms (p99 "
          f"{sub['tenant_floor_p99_ms']}) over {sub['tenant_floor_samples']} round trips: the same client through "
          f"the same kind of proxy to a server that answers at once, less the delay (the client's aiohttp, the "
          f"proxy, loopback: the bench's own, not cpn's; a tenant's own client costs what it costs)")
    if late:
        print(f"  proxies' timer lateness per delayed chunk, whole run: p50 {late['late_ms_p50']} / "
              f"p99 {late['late_ms_p99']} ms over {late['delayed']:.0f} chunks")
    print(f"  the first {result['warmup_per_origin_and_mode']} requests of each origin and gateway are not "
          f"counted (a new connection through a new proxy)")
    print(f"  in-budget origins: those with an in-region site of the run whose promise (the full path through "
          f"their region's gateway + cpn's own time) is within {BUDGET_MS:g} ms: {result['measured_origins']}")
    print(f"  outside: origins whose full path through their region's gateway exceeds it (ms): "
          f"{result['outside_origins']}")
    if result["promise_over_budget"]:
        print(f"  moved outside: in budget by the path + {overhead.FLOOR_MS:g} ms, but the gateway's promise "
              f"(RTT + measured overhead, p50) was over it: {result['promise_over_budget']}")
    for rid, why in result["not_served"].items():
        print(f"  region {rid}: {why}: its origins are all in the 'outside' rows")
    print("  promised: X-CPN-RTT-Ms + X-CPN-Overhead-Ms (p50 of each); beyond rtt: p50 of the figure minus the "
          "RTT alone; beyond promise: p50 / p99 of the client's latency minus service_ms, the tenant's floor "
          "and the promise (proxy only: p50 with the tenant leg's proxy subtracted instead of the floor); share: "
          "of the answers, how many got more than the promise (the stated overhead is a p90: about 10% expected)")
    print(f"{'origins':<11}{'region':<11}{'mode':<10}{'n':>5}{'err':>5}{'p50':>8}{'p99':>8}{'raw p99':>9}"
          f"{'rtt':>8}{'overhead':>9}{'beyond rtt':>11}{'beyond promise':>16}{'proxy only':>11}{'share':>8}"
          f"  p99 in budget")
    for r in result["rows"]:
        print(f"{r['origins']:<11}{r['region']:<11}{r['mode']:<10}{r['n']:>5}{r['errors']:>5}{r['p50_ms']:>8}"
              f"{r['p99_ms']:>8}{r['raw_p99_ms']:>9}{r['promised_rtt_p50_ms']:>8}{r['stated_overhead_p50_ms']:>9}"
              f"{r['beyond_rtt_p50_ms']:>11}{r['beyond_promise_p50_ms']:>9} / {r['beyond_promise_p99_ms']:<6}"
              f"{r['beyond_promise_proxy_only_p50_ms']:>11}"
              f"{r['share_beyond_promise']:>7.1%}  {'yes' if r['within_budget_p99'] else 'no'}"
              f" (p99: the {_nth(r['p99_nth_slowest'])} slowest)")
    print(f"\nby origin (client latency - service_ms, proxies not subtracted): {'origin':<14}{'mode':<10}"
          f"{'p50':>8}{'p99':>8}{'promised':>10}")
    for o in result["origins"]:
        print(f"  {o['region']:<9}{o['origin']:<14}{o['mode']:<10}{o['p50_ms']:>8}{o['p99_ms']:>8}"
              f"{o['promised_rtt_ms']:>10}{'' if o['in_budget'] else '  (outside)'}")
    lag = result["loop_lag"]
    if lag["wakeups"]:
        print_parts(result["parts"])
        print(f"  this process's event loop (gateways, agents, controller): a {LoopWatch().every_s * 1000:g} ms timer "
              f"woke late by p50 {lag['late_ms_p50']} / p99 {lag['late_ms_p99']} / max {lag['late_ms_max']} ms; over "
              f"the {lag['stalls_over_1ms']} stalls beyond 1 ms the process was on a core "
              f"{lag['stall_busy_share']:.0%} of the time (the rest: waiting for one)")
    print(f"written to {common.write('regions', result)}")
    return 0
