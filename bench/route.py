"""``cpn bench route``: routing decisions on a synthetic 3,000-site / 300-origin layout.

Reports the RTT index's precompute time and memory, one link-change recompute, and decision
p50/p99 with the ratio to one nats-py request/reply measured in the same run (target ≤ 0.1×,
architecture §10: p99 ≤ 50 µs).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import tracemalloc

from bench import common, natsfloor
from controlplane.core.registry import SiteView
from controlplane.core.router import Route, Router, RouteRequest
from edge_agent import wire
from topology import latency, synth


def run(n_sites: int = 3000, n_origins: int = 300, decisions: int = 50_000, seed: int = 0) -> dict[str, object]:
    layout = synth.generate(n_sites, n_origins, seed)
    tracemalloc.start()
    t = time.perf_counter()
    index = latency.RttIndex.build(layout)
    build_s = time.perf_counter() - t
    mem_bytes = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    edge = [s for s in layout.sites if s.tier == "edge"]
    hubs = [s for s in layout.sites if s.tier != "edge"]
    link_changes = []
    if hubs and len(hubs) > 1:
        a, b = hubs[0].id, hubs[1].id
        for up in (False, True):
            t = time.perf_counter()
            try:
                index.set_link_up(a, b, up)
            except KeyError:
                break
            link_changes.append(time.perf_counter() - t)
    t = time.perf_counter()
    index.set_site_up(edge[0].id, False)
    site_down_s = time.perf_counter() - t
    index.set_site_up(edge[0].id, True)

    rng = random.Random(seed)
    views: dict[str, SiteView] = {}
    for s in layout.sites:
        v = SiteView(id=s.id, tier=s.tier, city=s.city)
        v.replicas = {"m": wire.ReplicaStatus(model="m", slots=8, busy=rng.randrange(0, 8))}
        views[s.id] = v
    router = Router(index)
    origins = [o.id for o in layout.origins]
    requests = [RouteRequest(origin=rng.choice(origins), model="m", budget_ms=rng.choice((5.0, 10.0)), policy="nearest")
                for _ in range(decisions)]
    for r in requests[:2000]:  # warm the per-origin caches
        router.route(r, views, 0, rng)
    lat = []
    routed = 0
    perf = time.perf_counter
    for r in requests:
        t0 = perf()
        d = router.route(r, views, 0, rng)
        lat.append(perf() - t0)
        routed += isinstance(d, Route)
    lat.sort()
    floor = asyncio.run(natsfloor.measure(2000))
    nats_p50 = common.percentile(floor, 50)
    p50, p99 = common.percentile(lat, 50), common.percentile(lat, 99)
    return {
        "sites": n_sites, "origins": n_origins, "decisions": decisions, "routed": routed,
        "index_build_s": round(build_s, 3), "index_peak_mem_mb": round(mem_bytes / 2**20, 1),
        "link_recompute_s": [round(x, 4) for x in link_changes], "site_down_recompute_s": round(site_down_s, 4),
        "decision_p50_us": round(p50 * 1e6, 2), "decision_p99_us": round(p99 * 1e6, 2),
        "nats_request_p50_us": round(nats_p50 * 1e6, 1),
        "ratio_p99_to_nats_p50": round(p99 / nats_p50, 4),
        "targets": {"decision_p99_us": 50, "ratio": 0.1},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cpn bench route")
    p.add_argument("--sites", type=int, default=3000)
    p.add_argument("--origins", type=int, default=300)
    p.add_argument("--decisions", type=int, default=50_000)
    args = p.parse_args(argv)
    res = run(args.sites, args.origins, args.decisions)
    print(f"route: {res['sites']} sites / {res['origins']} origins; index built in {res['index_build_s']} s, "
          f"peak {res['index_peak_mem_mb']} MB; link change recompute {res['link_recompute_s']} s")
    print(f"  decision p50 {res['decision_p50_us']} µs, p99 {res['decision_p99_us']} µs "
          f"(target ≤ 50 µs); nats-py request/reply p50 {res['nats_request_p50_us']} µs; "
          f"p99/nats = {res['ratio_p99_to_nats_p50']} (target ≤ 0.1)")
    print(f"  wrote {common.write('route', res)}")
    return 0
