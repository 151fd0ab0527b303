"""``cpn bench regions``: what a tenant gets entering at its region's gateway vs at one central gateway.

Method:

- ``cpn up --regions N``'s network in this process (the shipped layout's first N regions as a NATS
  super-cluster, a controller and a gateway per region, every site's simulated agent).
- WAN made real with fault proxies: every gateway connection between two regional clusters is
  delayed by half the layout's RTT between their cluster cities each way (floor ``--floor-ms``), and
  each (origin, gateway) tenant leg by half the layout's RTT origin -> gateway city each way.
- Origins: the ``--origins`` heaviest of each region. Each sends ``--requests`` ``POST /v1/infer``
  (``policy: nearest``, so the central gateway serves and the table shows by how much it misses)
  alternately to its own region's gateway and to the home region's ("central") gateway: same run,
  interleaved.
- Figure: client-measured latency minus the site's ``service_ms`` (what the network and cpn add),
  p50 and p99 per region and mode, against the budget (10 ms).
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
from controlplane.tools.faultproxy import FaultProxy
from controlplane.tools.up import DEMO_MODEL, UpOptions
from controlplane.tools.upregions import RegionalNetwork, free_port
from topology import latency, loader
from topology.ingress import city_rtt_ms

BUDGET_MS = 10.0


class Wan:
    """Fault proxies on the links between regional clusters, delayed by the layout's RTT."""

    def __init__(self, one_way_ms: dict[tuple[str, str], float]) -> None:
        self.one_way_ms = one_way_ms
        self.proxies: list[FaultProxy] = []
        self.refused_address = f"127.0.0.1:{free_port()}"

    async def link(self, dialer: str, target: str, url: str) -> str:
        proxy = FaultProxy(url)
        await proxy.start()
        proxy.delay_for = self.one_way_ms[(dialer, target)]  # type: ignore[attr-defined]
        self.proxies.append(proxy)
        return proxy.url

    def delay(self) -> None:
        """The WAN delays on (after start-up: what is measured is the requests, not the start)."""
        for p in self.proxies:
            p.set_delay(p.delay_for)  # type: ignore[attr-defined]

    async def close(self) -> None:
        for p in self.proxies:
            await p.close()


async def run(n_regions: int, n_origins: int, requests: int, floor_ms: float) -> dict[str, Any]:
    layout = loader.load_default()
    index = latency.RttIndex.build(layout)
    kept = layout.regions[:n_regions]
    one_way = {(a.id, b.id): max(floor_ms, city_rtt_ms(index, a.cluster, b.cluster) / 2)
               for a in kept for b in kept if a is not b}
    wan = Wan(one_way)
    tenant_legs: list[FaultProxy] = []
    with tempfile.TemporaryDirectory(prefix="cpn-bench-regions-") as tmp:
        net = RegionalNetwork(UpOptions(data_dir=Path(tmp), port=0, regions=n_regions, ready_timeout_s=60.0), wan=wan,
                              fold_sites=False)
        try:
            t0 = time.monotonic()
            await net.start()
            started_s = time.monotonic() - t0
            wan.delay()
            key = net.credentials["tenant_key"]
            central = net.regions[0]
            samples: dict[tuple[str, str], list[float]] = {}
            errors: dict[tuple[str, str], int] = {}
            async with aiohttp.ClientSession() as session:
                for region in net.regions:
                    rid = region.plan.id
                    origins = sorted((o for o in layout.origins if layout.region_of_province(o.region) == rid),
                                     key=lambda o: -o.weight)[:n_origins]
                    for origin in origins:
                        legs = {}
                        for mode, gw in (("regional", region), ("central", central)):
                            proxy = FaultProxy(net.gateway_url(gw).replace("http://", "nats://"))
                            await proxy.start()
                            proxy.set_delay(max(floor_ms / 10, city_rtt_ms(index, origin.id, gw.plan.gateway_city) / 2))
                            tenant_legs.append(proxy)
                            legs[mode] = f"http://127.0.0.1:{proxy.port}"
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
                                samples.setdefault((rid, mode), []).append(took_ms - float(data["service_ms"]))
        finally:
            await net.stop()
            for p in tenant_legs:
                await p.close()
            await wan.close()
    rows = []
    for (rid, mode), values in sorted(samples.items()):
        values.sort()
        rows.append({"region": rid, "mode": mode, "n": len(values), "errors": errors.get((rid, mode), 0),
                     "p50_ms": round(common.percentile(values, 50), 2),
                     "p99_ms": round(common.percentile(values, 99), 2),
                     "within_budget_p99": common.percentile(values, 99) <= BUDGET_MS})
    return {"bench": "regions", "machine": common.machine(), "regions": n_regions, "origins_per_region": n_origins,
            "requests_per_origin_and_mode": requests, "budget_ms": BUDGET_MS, "wan_one_way_ms": {
                f"{a}->{b}": round(v, 2) for (a, b), v in one_way.items()}, "started_s": round(started_s, 1),
            "rows": rows}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="cpn bench regions")
    p.add_argument("--regions", type=int, default=3)
    p.add_argument("--origins", type=int, default=3, help="origins per region (the heaviest)")
    p.add_argument("--requests", type=int, default=40, help="requests per origin and mode")
    p.add_argument("--floor-ms", type=float, default=1.0, help="least one-way delay between two clusters")
    args = p.parse_args(argv)
    result = asyncio.run(run(args.regions, args.origins, args.requests, args.floor_ms))
    print(f"cpn bench regions: client latency minus service time, ms (budget {BUDGET_MS:g} ms); "
          f"started in {result['started_s']} s")
    print(f"{'region':<12}{'mode':<10}{'n':>5}{'err':>5}{'p50':>9}{'p99':>9}  p99 in budget")
    for r in result["rows"]:
        print(f"{r['region']:<12}{r['mode']:<10}{r['n']:>5}{r['errors']:>5}{r['p50_ms']:>9}{r['p99_ms']:>9}  "
              f"{'yes' if r['within_budget_p99'] else 'no'}")
    print(f"written to {common.write('regions', result)}")
    return 0
