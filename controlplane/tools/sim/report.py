"""The report of ``cpn sim`` as stable JSON and as a one-screen text table.

``to_json(report, timing)`` sorts keys and puts the run time under ``timing`` only, so two runs with
the same seed give byte-identical JSON once ``timing`` is removed (docs/sim.md, "Determinism").
"""

from __future__ import annotations

import json
from typing import Any

from controlplane.market.money import cny_text


def _cny(fen: int) -> str:
    return cny_text(fen)  # exact, from integer fen


def to_json(report: dict[str, Any], timing: dict[str, Any] | None = None) -> str:
    """Stable JSON: sorted keys, two-space indent; ``timing`` (wall-clock figures) under its own key."""
    data = dict(report)
    if timing is not None:
        data["timing"] = timing
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f}%"


def text(report: dict[str, Any], timing: dict[str, Any] | None = None) -> str:
    """The summary table an operator reads on a terminal."""
    lines: list[str] = []
    add = lines.append
    add(f"cpn sim: scenario {report['scenario']} on layout {report['layout']} ({report['sites']} sites, "
        f"{report['origins']} origins), {report['hours']:g} h from {report['start']}, seed {report.get('seed', 0)}")
    inf = report["inference"]
    if inf["requests"]:
        add("")
        add(f"inference: {inf['requests']:,} requests; replicas {', '.join(f'{m} {n}' for m, n in inf['replicas'].items())}")
        add(f"  {'policy':<14} {'within budget':>13} {'failed':>9} {'RTT/oracle':>10} {'p95 ≤':>6} {'mean RTT':>9} "
            f"{'rerouted':>8} {'lost':>6}")
        for name, p in inf["policies"].items():
            add(f"  {name:<14} {_pct(p['within_budget_share']):>13} {p['failed']:>9,} {p['rtt_ratio_mean']:>10.2f} "
                f"{p['rtt_ratio_p95_at_most']:>6.1f} {p['mean_rtt_ms']:>7.2f}ms {p['rerouted']:>8,} {p['failed_outage']:>6,}")
        orc = inf["oracle"]
        add(f"  {'bound':<12} {_pct(orc['feasible_share']):>13}   physical: a site up, any tier, within budget, with the "
            "cards the model needs (load ignored)")
        add(f"  {'replica set':<12} {_pct(orc.get('replica_feasible_share', 0.0)):>13}   the fixed replicas' reach "
            f"(load ignored); RTT/oracle is against the nearest of them ({orc['mean_rtt_ms']:.2f} ms)")
        cpn = inf["policies"].get("cpn")
        if cpn:
            gaps = [100.0 * (b - a) for a, b in zip(cpn["hourly_within_share"], orc["hourly_feasible_share"])]
            add(f"  cpn vs bound: {100.0 * (orc['feasible_share'] - cpn['within_budget_share']):.2f} pp short over the "
                f"day, worst hour {max(gaps, default=0.0):.2f} pp")
        for name, st in inf.get("ingress", {}).get("sets", {}).items():
            gws = st["gateways"]
            add(f"  {st['policy']}: entering at the nearest of {len(gws)} gateway{'s' if len(gws) != 1 else ''} "
                f"({', '.join(gws[:6])}{', ...' if len(gws) > 6 else ''}); RTT and budget on the full path")
        for m, sc in inf.get("scaling", {}).items():
            add(f"  scaling {m}: out " + ", ".join(f"{t} {n}" for t, n in sc["scale_outs_by_tier"].items())
                + f"; in {sc['scale_ins']}; replicas by hour {min(sc['replicas_hourly_max'], default=0)}-"
                f"{max(sc['replicas_hourly_max'], default=0)} (max {sc['max_replicas']})")
        slo = inf.get("slo")
        if slo:
            err = slo["predictor_error_ms"]
            add(f"  TTFT SLO {slo['slo_ttft_ms']:g} ms on {_pct(slo['share'])} of requests (cpn): "
                f"{slo['admitted']:,} admitted ({slo['admitted_to_a_queue']:,} to a queue), "
                f"{100.0 * slo['met_share']:.2f}% met; refused {slo['refused']:,} ("
                + ", ".join(f"{k} {n:,}" for k, n in slo["refused_by_reason"].items())
                + f"), {slo['no_replica_within_budget']:,} no replica within budget; predictor error "
                f"p50 {err['p50']:+.1f} ms, p95 {err['p95']:+.1f} ms")
        worst = sorted(((o, v) for o, v in inf["per_origin"].items() if v["requests"]),
                       key=lambda kv: (kv[1].get("cpn_within_share", 0.0), kv[0]))[:5]
        if worst:
            add("  lowest origins (cpn within budget / feasible): " + ", ".join(
                f"{o} {_pct(v.get('cpn_within_share', 0.0))}/{_pct(v['feasible_share'])}" for o, v in worst))
        for o in inf["outages"]:
            during = o.get("city_within_share_during", {})
            add(f"  outage {o['site']} at {o['at_h']:g} h for {o['duration_h']:g} h: {o.get('in_flight', 0)} in flight, "
                f"{o['rerouted']} rerouted, {o['failed']} failed (cpn); its city's requests within budget meanwhile: "
                + ", ".join(f"{k} {_pct(v)}" for k, v in during.items()))
    u = report["utilisation"]
    add("")
    add("utilisation (cards busy, cpn): " + ", ".join(f"{t} {_pct(v)} of {u['cards'][t]:,}" for t, v in u["mean_by_tier"].items())
        + f"; overall {_pct(u['overall_mean'])}")
    held = u.get("hourly_inference_held_by_tier")
    if held:
        add("  cards held by inference replicas, peak hour: " + ", ".join(
            f"{t} {_pct(max(v, default=0.0))}" for t, v in held.items()))
    tr = report["training"]
    if tr["jobs"]:
        add("")
        add(f"training: {tr['jobs']:,} jobs (mean {tr['cards_requested_mean']:g} cards); "
            f"{tr['completed_by_every_policy']:,} completed under every policy")
        add(f"  {'policy':<12} {'done':>5} {'energy CNY':>11} {'CNY/A800-h':>10} {'common CNY':>11} {'goodput':>8} "
            f"{'wait p50/p95/p99 h':>19} {'idle-wait':>9} {'fail':>5} {'W meas/exp/min':>16} {'recovery p50 s':>14}")
        for name, p in tr["policies"].items():
            yd = p["young_daly"]
            add(f"  {name:<12} {p['completed']:>5,} {p['energy_cny']:>11,.0f} {p['cny_per_a800_card_hour']:>10.3f} "
                f"{p['completed_in_common_cny']:>11,.0f} {_pct(p['goodput']):>8} "
                f"{p['queue_delay_h']['p50']:>6.2f}/{p['queue_delay_h']['p95']:.2f}/{p['queue_delay_h'].get('p99', 0.0):<6.2f} "
                f"{_pct(p.get('idle_while_waiting_share', 0.0)):>9} "
                f"{p['failures']['card'] + p['failures']['site_outage']:>5} "
                f"{yd['measured_waste_per_useful']:.3f}/{yd['expected_waste_for_intervals_used']:.3f}/"
                f"{yd['minimum_sqrt_2c_over_m_plus_r_over_m']:.3f} {p['recovery_s']['p50']:>14,.0f}")
        add("  idle-wait = card-hours of waiting jobs that could have started (free cards of a type they accept) "
            "÷ card-hours waited")
        if any(p.get("lent_card_hours") for p in tr["policies"].values()):
            add("  lent inference cards (card-hours used / jobs stopped at reclaim or preempted): " + ", ".join(
                f"{n} {p['lent_card_hours']:,.0f}/{p['failures']['preempted_or_reclaimed']}" for n, p in tr["policies"].items()))
        ld = report.get("lending")
        if ld:
            add(f"  tidal lending (rule core/lending.py at {ld['sites']} sites, forecast {ld.get('forecast', 'declared')}): "
                "lent card-hours / attempts reclaimed "
                "(of which at once) / offers: " + ", ".join(
                    f"{n} {p['lent_card_hours']:,.0f}/{p['attempts_reclaimed']}({p['attempts_reclaimed_at_once']})/"
                    f"{p['offers']:,}" for n, p in ld["policies"].items()))
            add(f"  inference requests failed for lack of a reclaimed card: {ld['inference_failed_for_lack_of_a_reclaimed_card']:,} "
                f"(cpn scale decisions short of a lent card: {ld['cpn_scale_decisions_short_for_lack_of_a_lent_card']:,})")
        if any("market" in p for p in tr["policies"].values()):
            add("  the day priced (CNY; offers = energy cost + markup): tenant spend / providers earn / network kept "
                "(of which commission) / margin over energy / tidal lending earned")
            for name, p in tr["policies"].items():
                m = p.get("market")
                if m:
                    add(f"  {name:<12} {_cny(m['tenant_spend_fen'])} / {_cny(m['provider_earnings_fen'])} / "
                        f"{_cny(m['operator_kept_fen'])} ({_cny(m['operator_margin_fen'])}) / "
                        f"{_cny(m['margin_over_energy_fen'])} / {_cny(m['lending_earned_fen'])}")
        add(f"  {'oracle':<12} {'':>5} {tr['oracle']['all_jobs_cny']:>11,.0f} {'':>10} "
            f"{tr['oracle']['completed_in_common_cny']:>11,.0f}   (cheapest pool and window, no queueing, no failures)")
        b = tr.get("bound")
        if b:
            add(f"  bound CNY/A800-h: {b['cny_per_a800_card_hour_windowed']:.3f} with the best window a deadline allows, "
                f"{b['cny_per_a800_card_hour_at_once']:.3f} starting at once (every job on its cheapest pool, all "
                f"cards free); target 0.75 x nearest-hub = {b['target_cny_per_a800_card_hour']:.3f}")
            if "capacity_cny_per_a800_card_hour_at_best_baseline_work" in b:
                add(f"  capacity floor: {b['capacity_cny_per_a800_card_hour_at_best_baseline_work']:.3f} CNY/A800-h to do "
                    f"the best baseline's {b['best_baseline_work_a800_card_hours']:,.0f} A800-card-hours in the day's "
                    "training cards, cheapest card-hours first")
            add("  " + "; ".join(
                f"{n}: cost {p.get('cost_vs_nearest_hub', 0.0):.2f}x nearest-hub ("
                f"{p.get('common_vs_nearest_hub', 0.0):.2f}x on the jobs all completed; floor of its own hourly load "
                f"{p.get('hourly_floor_cny_per_a800_card_hour', 0.0):.3f}, on its jobs' accelerators "
                f"{p.get('accelerator_floor_cny_per_a800_card_hour', 0.0):.3f}, of its useful work alone "
                f"{p.get('useful_work_floor_cny_per_a800_card_hour', 0.0):.3f}), common jobs "
                f"{p.get('common_vs_bound', 0.0):.2f}x bound ({p.get('common_vs_bound_at_once', 0.0):.2f}x starting at once, "
                f"{p.get('common_vs_capacity_bound', 0.0):.2f}x capacity-aware)"
                for n, p in tr["policies"].items()))
        if any("by_gang_size" in p for p in tr["policies"].values()):
            add("  CNY/A800-h by gang size in cards (share of the policy's cost):")
            for n, p in tr["policies"].items():
                if "by_gang_size" in p:
                    add(f"  {n:<12} " + ", ".join(f"{g['cards'][0]}-{g['cards'][1]} {g['cny_per_a800_card_hour']:.3f} "
                                                  f"({_pct(g['share_of_cost'])})" for g in p["by_gang_size"]))
        cw = tr["policies"].get("cpn", {}).get("waits")
        if cw:
            add(f"  cpn waits: {cw['jobs_waited']:,} jobs waited ({cw['jobs_waited_without_reason']:,} without a reason): "
                + ", ".join(f"{k} {n:,}" for k, n in cw["jobs_by_kind"].items()))
    if timing:
        add("")
        add(f"run time {timing['wall_s']:.1f} s ({timing.get('requests_per_s', 0):,} requests/s simulated)")
    return "\n".join(lines) + "\n"
