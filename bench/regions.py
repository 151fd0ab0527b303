"""``cpn bench regions``: what a tenant gets entering at its region's gateway vs at one central gateway.

Method:

- ``cpn up --regions N``'s network in this process (the shipped layout's first N regions as a NATS
  super-cluster, a controller and a gateway per region), with ``--sites`` sites per region (those
  nearest its gateway city; the other sites are not run).
- WAN made real with fault proxies **in a child process of their own**
  (:mod:`controlplane.tools.proxyhost`), so the delays they add do not wait on this process's event
  loop: every gateway connection between two regional clusters is delayed by half the layout's RTT
  between their cluster cities each way (floor ``--floor-ms``), and each (origin, gateway) tenant leg
  by half the layout's RTT origin -> gateway city each way.
- Origins: the ``--origins`` heaviest of each region. Each sends ``--requests`` ``POST /v1/infer``
  (``policy: nearest``, so the central gateway serves and the table shows by how much it misses)
  alternately to its own region's gateway and to the home region's ("central") gateway: same run,
  interleaved.
- Figure: client-measured latency minus the site's ``service_ms`` (what the network and cpn add),
  p50 and p99 per region and mode, against the budget (10 ms); next to it the RTT the hub promised
  (``rtt_ms``, the ``X-CPN-RTT-Ms`` figure), so the table shows whether the headers tell the truth.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench import common
from controlplane.tools.proxyhost import ProxyHost
from controlplane.tools.up import DEMO_MODEL, UpOptions
from controlplane.tools.upregions import RegionalNetwork, free_port
from topology import latency, loader
from topology.ingress import city_rtt_ms

BUDGET_MS = 10.0


class Wan:
    """The links between regional clusters, each through a proxy of the child, delayed by the layout's RTT."""

    def __init__(self, host: ProxyHost, one_way_ms: dict[tuple[str, str], float],
                 site_one_way_ms: dict[str, float]) -> None:
        self.host = host
        self.one_way_ms = one_way_ms
        self.site_one_way_ms = site_one_way_ms
        self.proxies: list[tuple[int, float]] = []
        self.refused_address = f"127.0.0.1:{free_port()}"

    async def site(self, site: str, region: str, url: str) -> str:
        """The site's access link, delayed by half the RTT between its region's gateway city and it."""
        pid, port = await self.host.add(url)
        self.proxies.append((pid, self.site_one_way_ms[site]))
        return f"nats://127.0.0.1:{port}"

    async def link(self, dialer: str, target: str, url: str) -> str:
        pid, port = await self.host.add(url)
        self.proxies.append((pid, self.one_way_ms[(dialer, target)]))
        return f"nats://127.0.0.1:{port}"

    async def delay(self) -> None:
        """The WAN delays on (after start-up: what is measured is the requests, not the start)."""
        for pid, ms in self.proxies:
            await self.host.set_mode([pid], "delay", ms)


def _site_rtt_ms(index: latency.RttIndex, city: str, site: str) -> float:
    return next(rtt for s, rtt in index.ranked(city) if s == site)


async def run(n_regions: int, n_origins: int, requests: int, floor_ms: float, sites: int) -> dict[str, Any]:
    layout = loader.load_default()
    index = latency.RttIndex.build(layout)
    kept = layout.regions[:n_regions]
    one_way = {(a.id, b.id): max(floor_ms, city_rtt_ms(index, a.cluster, b.cluster) / 2)
               for a in kept for b in kept if a is not b}
    # A site's access link carries what the layout puts between its region's gateway city and it.
    site_one_way = {s.id: max(floor_ms / 10, _site_rtt_ms(index, r.gateways[0] if r.gateways else r.cluster, s.id) / 2)
                    for r in kept for s in layout.sites if layout.region_of_site(s.id) == r.id}
    host = ProxyHost()
    await host.start()
    wan = Wan(host, one_way, site_one_way)
    with tempfile.TemporaryDirectory(prefix="cpn-bench-regions-") as tmp:
        net = RegionalNetwork(UpOptions(data_dir=Path(tmp), port=0, regions=n_regions, ready_timeout_s=60.0), wan=wan,
                              fold_sites=False, max_sites=sites)
        try:
            t0 = time.monotonic()
            await net.start()
            started_s = time.monotonic() - t0
            await wan.delay()
            key = net.credentials["tenant_key"]
            central = net.regions[0]
            samples: dict[tuple[str, str], list[float]] = {}
            promised: dict[tuple[str, str], list[float]] = {}
            in_region: dict[tuple[str, str], int] = {}
            over: dict[tuple[str, str], list[float]] = {}
            by_origin: dict[tuple[str, str, str], list[float]] = {}
            promised_of: dict[tuple[str, str, str], float] = {}
            errors: dict[tuple[str, str], int] = {}
            async with aiohttp.ClientSession() as session:
                for region in net.regions:
                    rid = region.plan.id
                    origins = sorted((o for o in layout.origins if layout.region_of_province(o.region) == rid),
                                     key=lambda o: -o.weight)[:n_origins]
                    for origin in origins:
                        legs = {}
                        for mode, gw in (("regional", region), ("central", central)):
                            pid, port = await host.add(net.gateway_url(gw).replace("http://", "nats://"))
                            await host.set_mode([pid], "delay", max(floor_ms / 10, city_rtt_ms(
                                index, origin.id, gw.plan.gateway_city) / 2))
                            legs[mode] = f"http://127.0.0.1:{port}"
                        for i in range(requests):
                            for mode in (("regional", "central") if i % 2 == 0 else ("central", "regional")):
                                body = {"model": DEMO_MODEL, "input": "hi", "origin": origin.id, "policy": "nearest",
                                        "max_tokens": 1}
                                started = time.monotonic()
                                async with session.post(legs[mode] + "/v1/infer", json=body,
                                                        headers={"Authorization": f"Bearer {key}"}) as resp:
                                    data = await resp.json()
                                    took_ms = (time.monotonic() - started) * 1000
                                if resp.status != 200:
                                    errors[(rid, mode)] = errors.get((rid, mode), 0) + 1
                                    continue
                                net_ms = took_ms - float(data["service_ms"])
                                samples.setdefault((rid, mode), []).append(net_ms)
                                promised.setdefault((rid, mode), []).append(float(data["rtt_ms"]))
                                over.setdefault((rid, mode), []).append(net_ms - float(data["rtt_ms"]))
                                by_origin.setdefault((rid, origin.id, mode), []).append(net_ms)
                                promised_of[(rid, origin.id, mode)] = float(data["rtt_ms"])
                                if layout.region_of_site(data["site"]) == rid:
                                    in_region[(rid, mode)] = in_region.get((rid, mode), 0) + 1
        finally:
            await net.stop()
            await host.close()
    rows = []
    for (rid, mode), values in sorted(samples.items()):
        values.sort()
        rows.append({"region": rid, "mode": mode, "n": len(values), "errors": errors.get((rid, mode), 0),
                     "served_in_region": in_region.get((rid, mode), 0),
                     "p50_ms": round(common.percentile(values, 50), 2),
                     "p99_ms": round(common.percentile(values, 99), 2),
                     "promised_rtt_p50_ms": round(common.percentile(sorted(promised[(rid, mode)]), 50), 2),
                     "beyond_promise_p50_ms": round(common.percentile(sorted(over[(rid, mode)]), 50), 2),
                     "within_budget_p99": common.percentile(values, 99) <= BUDGET_MS})
    origin_rows = [{"region": rid, "origin": oid, "mode": mode, "n": len(v),
                    "p50_ms": round(common.percentile(sorted(v), 50), 2),
                    "p99_ms": round(common.percentile(sorted(v), 99), 2),
                    "promised_rtt_ms": round(promised_of[(rid, oid, mode)], 2)}
                   for (rid, oid, mode), v in sorted(by_origin.items())]
    return {"bench": "regions", "machine": common.machine(), "date": time.strftime("%Y-%m-%d"),
            "regions": n_regions, "sites_per_region": sites, "origins_per_region": n_origins,
            "requests_per_origin_and_mode": requests, "budget_ms": BUDGET_MS, "proxies": "child process",
            "wan_one_way_ms": {f"{a}->{b}": round(v, 2) for (a, b), v in one_way.items()},
            "site_one_way_ms": {k: round(v, 2) for k, v in sorted(site_one_way.items())},
            "started_s": round(started_s, 1), "rows": rows, "origins": origin_rows}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="cpn bench regions")
    p.add_argument("--regions", type=int, default=3)
    p.add_argument("--origins", type=int, default=3, help="origins per region (the heaviest)")
    p.add_argument("--requests", type=int, default=40, help="requests per origin and mode")
    p.add_argument("--floor-ms", type=float, default=1.0, help="least one-way delay between two clusters")
    p.add_argument("--sites", type=int, default=2, help="sites run per region (nearest its gateway city)")
    args = p.parse_args(argv)
    for name in ("regions", "origins", "requests", "sites"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: {getattr(args, name)}: at least 1")
    result = asyncio.run(run(args.regions, args.origins, args.requests, args.floor_ms, args.sites))
    print(f"cpn bench regions: client latency minus service time, ms (budget {BUDGET_MS:g} ms); "
          f"started in {result['started_s']} s")
    print(f"{'region':<12}{'mode':<10}{'n':>5}{'err':>5}{'p50':>9}{'p99':>9}{'promised':>10}{'beyond':>8}  p99 in budget")
    for r in result["rows"]:
        print(f"{r['region']:<12}{r['mode']:<10}{r['n']:>5}{r['errors']:>5}{r['p50_ms']:>9}{r['p99_ms']:>9}"
              f"{r['promised_rtt_p50_ms']:>10}{r['beyond_promise_p50_ms']:>8}  {'yes' if r['within_budget_p99'] else 'no'}")
    print(f"\nby origin: {'origin':<14}{'mode':<10}{'p50':>9}{'p99':>9}{'promised':>10}")
    for o in result["origins"]:
        print(f"  {o['region']:<9}{o['origin']:<14}{o['mode']:<10}{o['p50_ms']:>9}{o['p99_ms']:>9}{o['promised_rtt_ms']:>10}")
    print(f"written to {common.write('regions', result)}")
    return 0
