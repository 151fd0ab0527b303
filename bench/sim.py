"""``python -m bench.sim``: the ``cpn sim`` speed budget (architecture §10).

Runs the ``national-day`` scenario (24 simulated hours, ≥ 1,000,000 inference requests and
≥ 2,000 training jobs, every baseline in the same pass) on the shipped national layout, then the
same scenario on the synthetic 3,000-site / 300-origin layout, prints run times and writes
``bench/results/sim.json`` (target: the national run in ≤ 60 s on 2 cores).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench import common
from controlplane.tools.sim import runner
from topology import synth

TARGET_S = 60.0


def one(layout_name: str, hours: float, seed: int, sites: int | None) -> dict[str, Any]:
    scenario = runner.load_scenario("national-day")
    t = time.perf_counter()
    lay = synth.generate(sites, max(1, sites // 10)) if sites else None
    gen_s = time.perf_counter() - t
    res = runner.simulate(scenario, layout=lay, seed=seed, hours=hours)
    rep = res.report
    inf = rep["inference"]["policies"]
    tr = rep["training"]["policies"]
    out = {
        "layout": rep["layout"],
        "sites": rep["sites"],
        "origins": rep["origins"],
        "hours": rep["hours"],
        "requests": rep["inference"]["requests"],
        "jobs": rep["training"]["jobs"],
        "wall_s": round(res.timing["wall_s"] + gen_s, 2),
        "simulate_s": res.timing["simulate_s"],
        "requests_per_s": res.timing["requests_per_s"],
        "cpn_within_budget_share": inf["cpn"]["within_budget_share"],
        "oracle_feasible_share": rep["inference"]["oracle"]["feasible_share"],
        "cpn_rtt_ratio": inf["cpn"]["rtt_ratio_mean"],
        "random_rtt_ratio": inf.get("random", {}).get("rtt_ratio_mean"),
        "cny_per_a800_card_hour": {name: p["cny_per_a800_card_hour"] for name, p in tr.items()},
        "utilisation_overall": rep["utilisation"]["overall_mean"],
    }
    print(f"{layout_name}: {out['sites']} sites, {out['hours']:g} h, {out['requests']:,} requests, {out['jobs']:,} jobs "
          f"in {out['wall_s']:.1f} s ({out['requests_per_s']:,} requests/s); cpn within budget "
          f"{100 * out['cpn_within_budget_share']:.1f}% (oracle {100 * out['oracle_feasible_share']:.1f}%), "
          f"RTT×{out['cpn_rtt_ratio']} vs random ×{out['random_rtt_ratio']}; training CNY/A800-h "
          + ", ".join(f"{k} {v}" for k, v in out["cny_per_a800_card_hour"].items()))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench sim", description=__doc__)
    p.add_argument("--hours", type=float, default=24.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sites", type=int, default=3000, help="synthetic layout size (0 skips it)")
    args = p.parse_args(argv)
    national = one("national", args.hours, args.seed, None)
    synthetic = one("synthetic", args.hours, args.seed, args.sites) if args.sites else None
    ok = national["wall_s"] <= TARGET_S and national["requests"] >= 1_000_000 * args.hours / 24 \
        and national["jobs"] >= 2000 * args.hours / 24
    summary = (f"national {national['hours']:g} h: {national['requests']:,} requests + {national['jobs']:,} jobs in "
               f"{national['wall_s']:.1f} s" + (f"; {synthetic['sites']:,}-site synthetic in {synthetic['wall_s']:.1f} s"
                                                 if synthetic else ""))
    common.write("sim", {
        "what": "`cpn sim`, 24 simulated hours, national layout, ≥ 1 M requests, ≥ 2,000 jobs (all baselines in the same run)",
        "summary": summary,
        "target_s": TARGET_S,
        "within_target": ok,
        "national": national,
        "synthetic": synthetic,
    })
    print(("OK " if ok else "OVER BUDGET ") + summary)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
