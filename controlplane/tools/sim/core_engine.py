"""The discrete-event loop of ``cpn sim`` and the report as plain data. Pure.

``run(layout, rtt, scenario, streams)`` returns the report dict (schema ``cpn.sim.report/1``,
docs/sim.md). Time is a float of epoch seconds passed to the core as ``now``; nothing sleeps and no
clock is read. Two event sources are merged in time order: inference arrivals, generated lazily
(``core_workload.arrivals``), whose completions live in the inference heap; and the slower events
(utilisation samples, outages and their detection, lending decisions) in a heap of
``(time, seq, kind, payload)``. Training sims keep their own heaps and are advanced to each slow
event's time, so every component sees events in time order.

Same scenario, layout and seeds give the same report, to the byte once encoded with sorted keys
(floats are rounded here). The report holds no wall-clock figures.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypedDict

import msgspec

from controlplane.core import autoscale, placement, replicas
from controlplane.core import deployments as decide
from controlplane.core.replicas import Candidate
from controlplane.market import offers
from controlplane.tools.sim import core_inference, core_lending, core_market, core_scenario, core_training, core_workload
from controlplane.tools.sim.core_scenario import Scenario, start_epoch_s
from controlplane.tools.sim.core_workload import Rng
from topology import ingress, latency
from topology import layout as tlayout

SCHEMA = "cpn.sim.report/1"
TIERS = ("hub", "regional", "edge")


class Streams(Protocol):
    """Independent seeded random streams (``random.Random`` instances, made by the runner)."""

    # Read-only members: the runner's dataclass holds ``random.Random``, which
    # satisfies ``Rng``; a mutable ``Rng`` attribute would have to match it exactly.
    @property
    def workload(self) -> Rng: ...
    @property
    def jobs(self) -> Rng: ...
    @property
    def faults(self) -> Rng: ...
    @property
    def router(self) -> Rng: ...
    @property
    def baseline(self) -> Rng: ...
    @property
    def fixed(self) -> Rng: ...
    @property
    def ingress(self) -> Rng: ...
    @property
    def slo(self) -> Rng: ...


class _SimArgs(TypedDict):
    """The keyword arguments every ``TrainingSim`` of a run shares."""

    start_s: float
    tick_s: float
    failure_scale: float
    reserved_cards: Mapping[str, float]
    lent: Sequence[str]
    detection_s: float
    reserved_by_acc: Mapping[tuple[str, str], float]


def r(x: float, nd: int = 4) -> float:
    """Round for the report (stable JSON); NaN and infinities become 0.0 and are never reported."""
    return round(x, nd) if math.isfinite(x) else 0.0


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (0 when empty)."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100.0 * len(s)) - 1))]


def _share(a: float, b: float) -> float:
    return r(a / b) if b else 0.0


def outage_sites(s: Scenario, lay: tlayout.Layout, rng: Rng, hours: float) -> list[tuple[float, float, str]]:
    """Outages as ``(at_s after start, duration_s, site id)``: the scenario's, then random ones."""
    out: list[tuple[float, float, str]] = []
    known = {site.id for site in lay.sites}
    for i, o in enumerate(s.faults.outages):
        ids = [x for x in o.sites]
        for x in ids:
            if x not in known:
                raise ValueError(f"faults.outages[{i}].sites: unknown site {x!r} in layout {lay.name!r}")
        if o.city:
            ids += [site.id for site in lay.sites if site.city == o.city and (not o.tiers or site.tier in o.tiers)]
            if not ids:
                raise ValueError(f"faults.outages[{i}]: no site in city {o.city!r} of tiers {o.tiers or 'any'}")
        if o.at_hour >= hours:
            continue  # starts after the run ends (e.g. a shortened --hours)
        for x in sorted(set(ids)):
            out.append((o.at_hour * 3600.0, o.duration_h * 3600.0, x))
    if s.faults.random_outages > 0:
        t = 0.0
        lam = s.faults.random_outages / (hours * 3600.0)
        while True:
            t += rng.expovariate(lam)
            if t >= hours * 3600.0:
                break
            site = lay.sites[int(rng.random() * len(lay.sites))].id
            out.append((t, rng.expovariate(1.0 / (s.faults.random_outage_h * 3600.0)), site))
    return out


def run(lay: tlayout.Layout, rtt: latency.RttIndex, s: Scenario, streams: Streams,
        progress: Callable[[float], None] | None = None) -> dict[str, Any]:
    """Simulate ``s`` on ``lay`` and return the report (plain data, floats rounded)."""
    start_s = start_epoch_s(s.start)
    end_s = start_s + s.hours * 3600.0
    n_hours = max(1, math.ceil(s.hours - 1e-9))
    det = s.faults.detection_s

    dep = core_inference.deploy(lay, rtt, s, start_s) if s.inference.requests > 0 else core_inference.Deployment()
    inf = core_inference.InferenceSim(lay, rtt, s, dep, start_s, n_hours, streams.router, streams.baseline,
                                      streams.fixed, streams.ingress, streams.slo)
    draws = core_workload.jobs(s, lay, start_s, end_s, streams.jobs, streams.faults)

    tr = s.training
    lend = s.lending
    lent_ids = [site.id for site in lay.sites
                if lend.enabled and site.tier in lend.tiers and site.tier not in tr.tiers]
    train_sites = [site for site in lay.sites if site.tier in tr.tiers or site.id in lent_ids]
    reserved = dep.cards_by_site()
    common = _SimArgs(start_s=start_s, tick_s=tr.tick_s, failure_scale=tr.failure_rate_scale, reserved_cards=reserved,
                      lent=lent_ids, detection_s=det, reserved_by_acc=dep.cards_by_site_acc())
    cpn_model = msgspec.structs.replace(placement.DEFAULT_MODEL, min_wait_saving=tr.min_wait_saving_pct / 100.0)
    sims = [core_training.TrainingSim("cpn", core_training.cpn_planner, lay, train_sites, draws, model=cpn_model,
                                      **common)]
    if tr.baselines and draws:
        hubs = {site.id for site in train_sites if site.tier == "hub"}
        by_origin: dict[str, list[str]] = {}
        home: dict[str, list[str]] = {}
        for d in draws:
            lst = by_origin.get(d.origin)
            if lst is None:
                lst = by_origin[d.origin] = [sid for sid, _ in rtt.ranked(d.origin) if sid in hubs]
            home[d.id] = lst
        sims.append(core_training.TrainingSim("nearest-hub", core_training.nearest_hub_planner(home), lay,
                                              train_sites, draws, **common))
        sims.append(core_training.TrainingSim("random", core_training.random_planner(streams.baseline), lay,
                                              train_sites, draws, **common))

    scaler = _Scaler(lay, rtt, s, inf, sims[0]) if inf.autoscaling else None

    # ---------------------------------------------------------------- slow events
    slow: list[tuple[float, int, str, Any]] = []
    seq = 0

    def push(t: float, kind: str, payload: Any) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(slow, (t, seq, kind, payload))

    t = start_s
    while t <= end_s + 1e-9:
        push(t, "sample", None)
        t += s.sample_s
    if scaler is not None:
        t = start_s + s.inference.autoscale_s
        while t <= end_s + 1e-9:
            push(t, "scale", None)
            t += s.inference.autoscale_s
    outages = outage_sites(s, lay, streams.faults, s.hours)
    outage_log: list[dict[str, Any]] = []
    for at, dur, sid in outages:
        log: dict[str, Any] = {"site": sid, "at_h": r(at / 3600.0, 3), "duration_h": r(dur / 3600.0, 3),
                               "rerouted": 0, "failed": 0}
        outage_log.append(log)
        push(start_s + at, "fail", (sid, log))
        push(start_s + at + min(det, dur), "detect", (sid, log, start_s + at))
        push(start_s + at + dur, "back", (sid, log))
    lender = None
    lend_wakes: set[float] = set()
    if lent_ids:
        held_src: Callable[[], Mapping[tuple[str, str], float]] = (
            (lambda: scaler.held) if scaler is not None else (lambda: dep.cards_by_site_acc()))
        origin_region = [o.region for o in lay.origins]
        seen = [0] * len(lay.origins)

        def region_demand() -> dict[str, float]:
            """Requests per region since the last call (what the live demand counts give)."""
            out: dict[str, float] = {}
            for i, n in enumerate(inf.requests_by_origin):
                if n != seen[i]:
                    out[origin_region[i]] = out.get(origin_region[i], 0.0) + n - seen[i]
                    seen[i] = n
            return out

        lender = core_lending.Lender(s, [site for site in train_sites if site.id in lent_ids], sims, held_src,
                                     region_demand)
        t = start_s
        while t <= end_s + 1e-9:
            push(t, "lendtick", True)
            t += lend.tick_s

    ns = len(lay.sites)
    site_idx = inf.idx
    tier_of = [site.tier for site in lay.sites]
    tier_cards = {tier: float(sum(site.cards for site in lay.sites if site.tier == tier)) for tier in TIERS}
    busy_tier_hour = {tier: [0.0] * n_hours for tier in TIERS}
    busy_inf_tier_hour = {tier: [0.0] * n_hours for tier in TIERS}
    held_inf_tier_hour = {tier: [0.0] * n_hours for tier in TIERS}
    replicas_hour = {m: [0] * n_hours for m in inf.models}
    samples_hour = [0] * n_hours
    busy_site_sum = [0.0] * ns
    n_samples = 0
    tier_of_id = {site.id: site.tier for site in lay.sites}
    train_busy = {sim.name: {tier: [0.0] * n_hours for tier in TIERS} for sim in sims}
    """Card-samples held by each policy's training attempts, by tier and hour."""
    dead_now: set[str] = set()

    def sample(t: float) -> None:
        nonlocal n_samples
        hour = min(n_hours - 1, int((t - start_s) / 3600.0))
        inf_busy = [0.0] * ns
        inf.busy_cards(inf_busy)
        inf_held = [0.0] * ns
        inf.replica_cards_now(inf_held)
        for i in range(ns):
            if inf_held[i]:
                held_inf_tier_hour[tier_of[i]][hour] += inf_held[i]
        for mi, m in enumerate(inf.models):
            replicas_hour[m][hour] = max(replicas_hour[m][hour], sum(n for _, n in inf.live_replicas(mi)))
        for sim in sims:
            idle, waiting = sim.idle_while_waiting()
            sim.idle_waiting_card_s += idle * s.sample_s
            sim.waiting_card_s += waiting * s.sample_s
            mine: dict[str, float] = {}
            sim.held_cards(mine)
            by_tier = train_busy[sim.name]
            for sid, c in mine.items():
                by_tier[tier_of_id[sid]][hour] += c
        held: dict[str, float] = {}
        sims[0].held_cards(held)
        tot = list(inf_busy)
        for sid, c in held.items():
            tot[site_idx[sid]] += c
        for i in range(ns):
            if tot[i]:
                busy_tier_hour[tier_of[i]][hour] += tot[i]
                busy_site_sum[i] += tot[i]
            if inf_busy[i]:
                busy_inf_tier_hour[tier_of[i]][hour] += inf_busy[i]
        samples_hour[hour] += 1
        n_samples += 1

    def slow_event(t: float, kind: str, payload: Any) -> None:
        inf.drain(t)
        for sim in sims:
            sim.advance(t)
        if kind == "sample":
            sample(t)
            if progress is not None:
                progress(min(1.0, (t - start_s) / (end_s - start_s)))
        elif kind == "fail":
            sid, log = payload
            if sid not in dead_now:
                dead_now.add(sid)
                inf.fail(site_idx[sid], t)
            log["in_flight"] = sum(1 for e in inf.heap if e[4] == site_idx[sid] and e[5] != inf.epoch[site_idx[sid]])
            city = lay.site(sid).city
            log["_origins"] = [i for i, o in enumerate(lay.origins) if o.id == city]
            log["_before"] = _origin_counts(inf, log["_origins"])
        elif kind == "detect":
            sid, log, failed_at = payload
            if sid in dead_now and inf.up[site_idx[sid]]:
                inf.detect(site_idx[sid], t, log)
                for sim in sims:
                    sim.site_lost(sid, t, failed_at)
        elif kind == "back":
            sid, log = payload
            if "_origins" in log:
                after = _origin_counts(inf, log.pop("_origins"))
                before = log.pop("_before")
                req = after[0] - before[0]
                log["city_requests_during"] = req
                log["city_within_share_during"] = {
                    name: _share(a - b, req) for name, a, b in zip(inf.policies, after[1:], before[1:])}
            if sid in dead_now:
                dead_now.discard(sid)
                inf.recover(site_idx[sid], t)
                for sim in sims:
                    sim.site_back(sid, t)
        elif kind == "lendtick":
            assert lender is not None
            lend_wakes.discard(t)
            wake = lender.tick(t, bool(payload))
            if wake is not None and wake > t and wake not in lend_wakes:
                lend_wakes.add(wake)  # one decision per due time, however often it is reported
                push(wake, "lendtick", False)
        elif kind == "scale":
            assert scaler is not None
            for at, site, m in scaler.tick(t):
                push(at, "ready", (site, m))
        elif kind == "ready":
            site_i, model_i = payload
            inf.replica_ready(site_i, model_i, now=t)

    # ---------------------------------------------------------------- the loop
    drain, request = inf.drain, inf.request
    for a in core_workload.arrivals(s, lay, start_s, end_s, streams.workload):
        ta = a[0]
        while slow and slow[0][0] <= ta:
            te, _, kind, payload = heapq.heappop(slow)
            slow_event(te, kind, payload)
        drain(ta)
        request(*a)
    while slow:
        te, _, kind, payload = heapq.heappop(slow)
        if te > end_s + 1e-9:
            break
        slow_event(te, kind, payload)
    for sim in sims:
        sim.advance(end_s)
        sim.close(end_s)

    # ---------------------------------------------------------------- the report
    pools_all = [placement.pool_from_site(site, lay.accelerators) for site in train_sites]
    oracle = core_training.oracle_energy(draws, pools_all) if draws else {}
    oracle_now = core_training.oracle_energy(draws, pools_all, windows=False) if draws else {}
    train_pools = [sims[0]._pool(site.id) for site in train_sites] if sims else []
    train_cards = {tier: float(sum(site.cards for site in train_sites if site.tier == tier)) for tier in TIERS}
    train_util = {name: {tier: [r(v / (n * train_cards[tier])) if n and train_cards[tier] else 0.0
                                for v, n in zip(vals, samples_hour)]
                         for tier, vals in by_tier.items() if train_cards[tier]}
                  for name, by_tier in train_busy.items()}
    return {
        "schema": SCHEMA,
        "scenario": s.name,
        "layout": lay.name,
        "sites": ns,
        "origins": len(lay.origins),
        "hours": r(s.hours, 3),
        "start": s.start,
        "inference": _inference_report(inf, lay, dep, outage_log, scaler, replicas_hour),
        "utilisation": _utilisation_report(lay, busy_tier_hour, busy_inf_tier_hour, held_inf_tier_hour, samples_hour,
                                           busy_site_sum, n_samples, tier_cards),
        "training": _training_report(sims, draws, oracle, s.hours,
                                     core_market.offers_for(train_sites, lay.accelerators, s.market), s.market,
                                     oracle_now=oracle_now, train_util=train_util,
                                     capacity=lambda work: core_training.capacity_bound(train_pools, start_s, n_hours,
                                                                                        work),
                                     floors=[(sim.name, core_training.hourly_floor(
                                         train_pools, start_s, n_hours, sim.metered,
                                         {a: spec.units for a, spec in lay.accelerators.items()})) for sim in sims],
                                     type_floor=lambda rows: core_training.hourly_floor(
                                         train_pools, start_s, n_hours, rows,
                                         {a: spec.units for a, spec in lay.accelerators.items()},
                                         core_training.accelerator_groups(draws)),
                                     train_cards={t: int(c) for t, c in train_cards.items() if c},
                                     size_bins=sorted((b.cards[0], b.cards[1]) for b in s.training.sizes)),
        **({"lending": _lending_report(lender, sims, scaler, inf)} if lender is not None else {}),
    }


def _origin_counts(inf: core_inference.InferenceSim, origins: list[int]) -> list[int]:
    """Requests, then each policy's within-budget count, summed over ``origins`` (so far)."""
    return [sum(inf.requests_by_origin[i] for i in origins)] + \
        [sum(st.within_by_origin[i] for i in origins) for st in inf.stats]


def _inference_report(inf: core_inference.InferenceSim, lay: tlayout.Layout, dep: core_inference.Deployment,
                      outage_log: list[dict[str, Any]], scaler: _Scaler | None,
                      replicas_hour: dict[str, list[int]]) -> dict[str, Any]:
    n = sum(inf.requests)
    pols: dict[str, Any] = {}
    for name, st in zip(inf.policies, inf.stats):
        within = sum(st.within)
        acc = 0
        p95 = 0.0
        for k, c in enumerate(st.ratio_hist):
            acc += c
            if st.ratio_n and acc >= 0.95 * st.ratio_n:
                p95 = 1.0 + (k + 1) / 10.0
                break
        pols[name] = {
            "served_within_budget": within,
            "served_over_budget": sum(st.over),
            "failed": sum(st.failed),
            "within_budget_share": _share(within, n),
            "mean_rtt_ms": r(st.rtt_sum_ms / max(1, within + sum(st.over)), 3),
            "rtt_ratio_mean": r(st.ratio_sum / st.ratio_n) if st.ratio_n else 0.0,
            "rtt_ratio_p95_at_most": r(p95, 2),
            "rerouted": st.rerouted,
            "failed_outage": st.failed_outage,
            "hourly_within_share": [_share(a, b) for a, b in zip(st.within, inf.requests)],
        }
    per_origin = {}
    for i, o in enumerate(lay.origins):
        req = inf.requests_by_origin[i]
        per_origin[o.id] = {
            "requests": req,
            "feasible_share": _share(inf.feasible_by_origin[i], req),
            **{f"{name}_within_share": _share(st.within_by_origin[i], req) for name, st in zip(inf.policies, inf.stats)},
        }
    gateways = {name[len("cpn@"):]: {"policy": name, "gateways": list(src.gateways)}
                for name, rt in zip(inf.policies, inf.routers)
                if name.startswith("cpn@") and isinstance(src := rt.rtt, ingress.NearestIngressRtt)}
    return {
        "requests": n,
        "hourly_requests": list(inf.requests),
        "policies": pols,
        **({"ingress": {"what": "the fixed replicas routed from each origin's nearest gateway of a set; RTT and "
                                "budget on the full path origin -> gateway -> site ('cpn' is the direct path)",
                        "sets": gateways}} if gateways else {}),
        "oracle": {
            "what": "physical bound: some site up at that moment, any tier, within the request's budget, with "
                    "cards_per_replica cards of an accepted type (load, replicas and training ignored)",
            "feasible_share": _share(sum(inf.feasible), n),
            "hourly_feasible_share": [_share(a, b) for a, b in zip(inf.feasible, inf.requests)],
            "replica_feasible_share": _share(sum(inf.replica_feasible), n),
            "hourly_replica_feasible_share": [_share(a, b) for a, b in zip(inf.replica_feasible, inf.requests)],
            "mean_rtt_ms": r(inf.oracle_rtt_sum_ms / inf.oracle_n, 3) if inf.oracle_n else 0.0,
        },
        "replicas": {m: len(v) for m, v in sorted(dep.placements.items())},
        "scaling": scaler.report(replicas_hour) if scaler is not None else {},
        **({"slo": _slo_report(inf)} if inf.slo is not None else {}),
        "uncovered_origins": dict(sorted(dep.uncovered.items())),
        "per_origin": per_origin,
        "outages": outage_log,
    }


def _slo_report(inf: core_inference.InferenceSim) -> dict[str, Any]:
    """Policy cpn's requests with a TTFT SLO (docs/sim.md, "Admission by predicted time to first token")."""
    slo = inf.slo
    assert slo is not None
    started = slo.met + slo.missed
    errs = slo.errors_ms
    absolute = [abs(x) for x in errs]
    queued = slo.queued_errors_ms
    return {
        "what": "policy cpn: a share of requests carries a TTFT SLO; ttft.admit over the sites within budget "
                "admits (a free slot or a replica's queue) or refuses (429); actual TTFT = RTT + the queue wait "
                "it saw + prefill for its prompt on the replica's accelerator",
        "slo_ttft_ms": r(inf.slo_ms, 1),
        "share": r(inf.slo_share),
        "requests": slo.requests,
        "admitted": slo.admitted,
        "admitted_to_a_queue": slo.queued,
        "admitted_to_a_queue_met": slo.queued_met,
        "first_token": started - slo.lost,
        "met": slo.met,
        "missed": slo.missed,
        "met_share": r(slo.met / started, 6) if started else 0.0,
        "lost_in_outage": slo.lost,
        "waiting_at_end": slo.admitted - started,
        "refused": sum(slo.refused.values()),
        "refused_by_reason": dict(slo.refused),
        "refusal_examples": list(slo.examples),
        "no_replica_within_budget": slo.no_candidate,
        "predictor_error_ms": {
            "what": "actual - predicted TTFT of admitted requests that got their first token",
            "p5": r(pct(errs, 5), 2), "p50": r(pct(errs, 50), 2), "p95": r(pct(errs, 95), 2),
            "abs_p50": r(pct(absolute, 50), 2), "abs_p95": r(pct(absolute, 95), 2),
            "queued_p50": r(pct(queued, 50), 2), "queued_p95": r(pct(queued, 95), 2),
        },
        "ttft_ms": {"p50": r(pct(slo.ttft_ms, 50), 2), "p95": r(pct(slo.ttft_ms, 95), 2),
                    "p99": r(pct(slo.ttft_ms, 99), 2)},
        "profiles_prefill_tokens_per_s": {m: {a: r(p.prefill_tokens_per_s, 1) for a, p in sorted(per.items())}
                                          for m, per in sorted(inf.profiles.items())},
    }


def _lending_report(lender: core_lending.Lender, sims: list[core_training.TrainingSim], scaler: _Scaler | None,
                    inf: core_inference.InferenceSim) -> dict[str, Any]:
    out = lender.report({sim.name: r(sim.lent_card_s / 3600.0, 1) for sim in sims})
    out["cpn_scale_decisions_short_for_lack_of_a_lent_card"] = scaler.blocked_decisions if scaler is not None else 0
    out["inference_failed_for_lack_of_a_reclaimed_card"] = scaler.blocked_failed if scaler is not None else 0
    days = max(1, math.ceil((len(inf.requests) - 1e-9) / 24))
    out["inference_failed_for_lack_of_a_reclaimed_card_by_day"] = [
        scaler.blocked_by_day.get(d, 0) if scaler is not None else 0 for d in range(days)]
    return out


def _utilisation_report(lay: tlayout.Layout, busy: dict[str, list[float]], busy_inf: dict[str, list[float]],
                        held_inf: dict[str, list[float]], samples: list[int], site_sum: list[float], n: int,
                        tier_cards: dict[str, float]) -> dict[str, Any]:
    hourly = {tier: [r(b / (k * tier_cards[tier])) if k and tier_cards[tier] else 0.0 for b, k in zip(busy[tier], samples)]
              for tier in TIERS}
    hourly_inf = {tier: [r(b / (k * tier_cards[tier])) if k and tier_cards[tier] else 0.0
                         for b, k in zip(busy_inf[tier], samples)] for tier in TIERS}
    hourly_held = {tier: [r(b / (k * tier_cards[tier])) if k and tier_cards[tier] else 0.0
                          for b, k in zip(held_inf[tier], samples)] for tier in TIERS}
    total_cards = sum(tier_cards.values())
    mean_tier = {tier: r(sum(busy[tier]) / (n * tier_cards[tier])) if n and tier_cards[tier] else 0.0 for tier in TIERS}
    return {
        "cards": {tier: int(c) for tier, c in tier_cards.items()},
        "hourly_by_tier": hourly,
        "hourly_inference_by_tier": hourly_inf,
        "hourly_inference_held_by_tier": hourly_held,
        "mean_by_tier": mean_tier,
        "overall_mean": r(sum(site_sum) / (n * total_cards)) if n and total_cards else 0.0,
        "mean_by_pool": {site.id: r(site_sum[i] / (n * site.cards)) if n and site.cards else 0.0
                         for i, site in enumerate(lay.sites)},
    }


def _training_report(sims: list[core_training.TrainingSim], draws: Sequence[core_workload.JobDraw],
                     oracle: dict[str, float], hours: float,
                     priced: Mapping[tuple[str, str], tuple[offers.Offer, placement.Pool]] | None = None,
                     market: core_scenario.Market | None = None, *, oracle_now: dict[str, float] | None = None,
                     train_util: dict[str, dict[str, list[float]]] | None = None,
                     train_cards: dict[str, int] | None = None,
                     capacity: Callable[[float], float] | None = None,
                     floors: Sequence[tuple[str, float]] = (),
                     type_floor: Callable[[Sequence[tuple[str, str, int, str, str, float, float, float]]], float] | None = None,
                     size_bins: Sequence[tuple[int, int]] = (),
                     ) -> dict[str, Any]:
    pols: dict[str, Any] = {}
    done_all = None
    for sim in sims:
        done = {jid for jid, j in sim.jobs.items() if j.done_at is not None}
        done_all = done if done_all is None else done_all & done
    common_done = sorted(done_all or ())  # sorted: a set's order varies between processes (hash seed)
    for sim in sims:
        jobs = sim.jobs.values()
        w = sim.waste
        card_s = sum(j.card_s for j in jobs)
        cost = sum(j.cost_cny for j in jobs)
        work = sum(j.work_a800_card_h for j in jobs)
        useful = w.useful
        measured_w = (w.checkpoint + w.lost + w.setup_restart) / useful if useful else 0.0
        waiting = [sim.now - j.draw.submitted_at for j in jobs if j.first_start is None and not j.infeasible]
        pols[sim.name] = {
            "started": sum(1 for j in jobs if j.first_start is not None),
            "completed": sum(1 for j in jobs if j.done_at is not None),
            "infeasible": sum(1 for j in jobs if j.infeasible),
            "never_started": len(waiting),
            "energy_cny": r(cost, 2),
            "card_hours": r(card_s / 3600.0, 1),
            "work_a800_card_hours": r(work, 1),
            # A800-equivalent card-hours held (attempts' whole time: work + checkpoints, failures, set-up)
            "held_a800_card_hours": r(sum(c * sim.accels[a].units * (t1 - t0) for *_, a, c, t0, t1 in sim.metered)
                                      / 3600.0, 1),
            "cny_per_a800_card_hour": r(cost / work) if work else 0.0,
            "completed_in_common_cny": r(sum(sim.jobs[j].cost_cny for j in common_done), 2),
            "goodput": _share(useful, card_s),
            "waste_card_hours": {
                "checkpoint": r(w.checkpoint / 3600.0, 1), "lost_to_failures": r(w.lost / 3600.0, 1),
                "restart_after_failure": r(w.setup_restart / 3600.0, 1), "first_setup": r(w.setup_first / 3600.0, 1),
                "checkpoint_moves": r(w.move / 3600.0, 1),
            },
            "young_daly": {
                "measured_waste_per_useful": r(measured_w),
                "expected_waste_for_intervals_used": r(w.expected_w_x_useful / useful) if useful else 0.0,
                "minimum_sqrt_2c_over_m_plus_r_over_m": r(w.min_w_x_useful / useful) if useful else 0.0,
            },
            "queue_delay_h": {"mean": r(sum(sim.queue_delay_s) / len(sim.queue_delay_s) / 3600.0, 3) if sim.queue_delay_s else 0.0,
                              "p50": r(pct(sim.queue_delay_s, 50) / 3600.0, 3),
                              "p95": r(pct(sim.queue_delay_s, 95) / 3600.0, 3),
                              "p99": r(pct(sim.queue_delay_s, 99) / 3600.0, 3),
                              "waiting_at_end_mean": r(sum(waiting) / len(waiting) / 3600.0, 3) if waiting else 0.0},
            "failures": {"card": sim.card_failures, "site_outage": sim.outage_failures, "preempted_or_reclaimed": sim.stops},
            "recovery_s": {"restarts": len(sim.recovery_s), "mean": r(sum(sim.recovery_s) / len(sim.recovery_s), 1) if sim.recovery_s else 0.0,
                           "p50": r(pct(sim.recovery_s, 50), 1), "max": r(max(sim.recovery_s, default=0.0), 1)},
            "scheduler_ticks": sim.ticks,
            "lent_card_hours": r(sim.lent_card_s / 3600.0, 1),
            "idle_while_waiting_card_hours": r(sim.idle_waiting_card_s / 3600.0, 1),
            "waiting_card_hours": r(sim.waiting_card_s / 3600.0, 1),
            "idle_while_waiting_share": _share(sim.idle_waiting_card_s, sim.waiting_card_s),
        }
        # Waited: not started within one tick of arriving (the planner runs at most every tick_s).
        waited = [j for j in jobs if not j.infeasible and
                  (sim.now if j.first_start is None else j.first_start) > j.draw.submitted_at + sim.tick_s + 1e-6]
        pols[sim.name]["waits"] = {
            "jobs_waited": len(waited),
            "jobs_waited_without_reason": sum(1 for j in waited if not j.wait_kinds),
            "jobs_by_kind": {k: sum(1 for j in waited if k in j.wait_kinds)
                             for k in sorted({k for j in waited for k in j.wait_kinds})},
        }
        if size_bins:  # where the money went, by gang size (docs/sim.md, "Training targets")
            pols[sim.name]["by_gang_size"] = core_training.cost_by_gang_size(sim, size_bins)
        if train_util is not None and sim.name in train_util:
            pols[sim.name]["training_busy_hourly_by_tier"] = train_util[sim.name]
        if priced is not None and market is not None:  # the day priced (docs/market.md)
            pols[sim.name]["market"] = core_market.price_policy(sim.metered, priced, market, sim.lent)
    if type_floor is not None:
        common_set = set(common_done)
        for sim in sims:
            p = pols[sim.name]
            work = p["work_a800_card_hours"]
            # The hourly floor again, each hour's load only on cards of the types its jobs accept
            # (H800 jobs on H800 cards, A800/910B jobs on A800 and 910B cards; no load on a type no
            # job accepts): what no placement of this load at these hours can go below.
            p["accelerator_floor_cny_per_a800_card_hour"] = r(type_floor(sim.metered) / work) if work else 0.0
            # The same floor of the useful work alone (each attempt's card time times its job's
            # useful share): what that work would cost at those hours with no checkpoints, failures,
            # set-up or gangs. Below the floor above by more than the overhead (the load it drops
            # is the dearest of each hour); approximate (a job's useful share taken as even).
            useful_rows = [(j, t, n, pool, acc, cards * sim.jobs[j].useful_s / sim.jobs[j].card_s, t0, t1)
                           for j, t, n, pool, acc, cards, t0, t1 in sim.metered if sim.jobs[j].card_s > 0]
            p["useful_work_floor_cny_per_a800_card_hour"] = r(type_floor(useful_rows) / work) if work else 0.0
            # The capacity-aware bound of the jobs all completed: their own card-hours as this policy
            # ran them (attempts, failures and all), each hour on the cheapest cards of their types
            # that hour, at most the cards there are (the bound gives every job all cards free).
            floor = type_floor([m for m in sim.metered if m[0] in common_set])
            p["common_vs_capacity_bound"] = r(p["completed_in_common_cny"] / floor) if floor else 0.0
    common_bound = sum(oracle.get(j, 0.0) for j in common_done)
    common_now = sum((oracle_now or {}).get(j, 0.0) for j in common_done)
    for p in pols.values():
        p["common_vs_bound"] = r(p["completed_in_common_cny"] / common_bound) if common_bound else 0.0
        # Against the bound without waiting (what a job that is not cost-first may have).
        p["common_vs_bound_at_once"] = r(p["completed_in_common_cny"] / common_now) if common_now else 0.0
    return {
        "jobs": len(draws),
        "cards_requested_mean": r(sum(d.cards for d in draws) / len(draws), 1) if draws else 0.0,
        "completed_by_every_policy": len(common_done),
        "policies": pols,
        "training_cards_by_tier": train_cards or {},
        "bound": _bound(draws, oracle, oracle_now or {}, pols, capacity, floors),
        "oracle": {
            "completed_in_common_cny": r(sum(oracle.get(j, 0.0) for j in common_done), 2),
            "all_jobs_cny": r(sum(oracle.values()), 2),
            "what": "cheapest feasible energy per job: best pool and start window its deadline allows, "
                    "all cards free, no queueing, no failures",
        },
    }


def _bound(draws: Sequence[core_workload.JobDraw], oracle: dict[str, float], oracle_now: dict[str, float],
           pols: dict[str, Any], capacity: Callable[[float], float] | None = None,
           floors: Sequence[tuple[str, float]] = ()) -> dict[str, Any]:
    """The cheapest-feasible cost per A800-hour (every job on its cheapest pool, all cards free, no
    failures) with the best window its deadline allows and starting at once, beside the target the
    issue set (0.75 × nearest-hub) and each policy's ratios to them."""
    work = sum(d.cards * d.est_hours for d in draws if d.id in oracle)
    work_now = sum(d.cards * d.est_hours for d in draws if d.id in oracle_now)
    windowed = sum(oracle.values()) / work if work else 0.0
    at_once = sum(oracle_now.values()) / work_now if work_now else 0.0
    nh = pols.get("nearest-hub", {}).get("cny_per_a800_card_hour", 0.0)
    out: dict[str, Any] = {
        "cny_per_a800_card_hour_windowed": r(windowed),
        "cny_per_a800_card_hour_at_once": r(at_once),
        "target_cny_per_a800_card_hour": r(0.75 * nh) if nh else 0.0,
        "what": "energy of every job on its cheapest pool (no queueing, no failures): with the best start window "
                "its deadline allows (windowed) and starting when submitted (at_once, the floor of a policy that "
                "never waits); the target is 0.75 x nearest-hub",
    }
    base_work = max((p["work_a800_card_hours"] for n, p in pols.items() if n != "cpn"), default=0.0)
    for name, floor_cny in floors:
        work = pols[name]["work_a800_card_hours"]
        # The floor of this policy's own hour-by-hour load on the cheapest cards of each hour.
        pols[name]["hourly_floor_cny_per_a800_card_hour"] = r(floor_cny / work) if work else 0.0
    if capacity is not None and base_work:
        # The floor for any policy doing the best baseline's work in the day, within the training cards.
        out["capacity_cny_per_a800_card_hour_at_best_baseline_work"] = r(capacity(base_work))
        out["best_baseline_work_a800_card_hours"] = r(base_work, 1)
    best_done = max((p["completed"] for n, p in pols.items() if n != "cpn"), default=0)
    nh_common = pols.get("nearest-hub", {}).get("completed_in_common_cny", 0.0)
    for name, p in pols.items():
        p["cost_vs_nearest_hub"] = r(p["cny_per_a800_card_hour"] / nh) if nh else 0.0
        # The same comparison like for like: the jobs every policy completed are the same work for
        # each (their cards x est_hours), so this is also their CNY per A800-hour ÷ nearest-hub's.
        # cost_vs_nearest_hub divides by different work: a policy that keeps more cards busy does
        # more of it, and the more it does in a day, the dearer the cards the rest must take.
        p["common_vs_nearest_hub"] = r(p["completed_in_common_cny"] / nh_common) if nh_common else 0.0
        p["completed_vs_best_baseline"] = p["completed"] - best_done if name == "cpn" else 0
    return out


class _CachedReach:
    """``nearest(origin, budget)`` memoised: the simulated network's RTTs do not change during a run
    (a lost site is unhealthy in the candidates, not removed from the graph)."""

    def __init__(self, rtt: latency.RttIndex) -> None:
        self.rtt = rtt
        self.cache: dict[tuple[str, float], list[tuple[str, float]]] = {}

    def nearest(self, origin: str, budget_ms: float) -> list[tuple[str, float]]:
        key = (origin, budget_ms)
        hit = self.cache.get(key)
        if hit is None:
            hit = self.cache[key] = list(self.rtt.nearest(origin, budget_ms))
        return hit


class _Scaler:
    """Policy ``cpn``'s replica scaling: ``autoscale.decide`` per autoscaled model every ``autoscale_s``.

    Free cards: an edge (or any site outside the training pools) has its cards minus cpn's replicas
    there; a training pool (regional, hub, lent edge) has what cpn's training simulation has free, so
    a spill replica takes cards training is not using, and training cannot take a replica's cards.
    """

    def __init__(self, lay: tlayout.Layout, rtt: latency.RttIndex, s: Scenario, inf: core_inference.InferenceSim,
                 train: core_training.TrainingSim) -> None:
        self.lay = lay
        self.reach = _CachedReach(rtt)
        self.inf = inf
        self.train = train
        self.models = [mi for mi, m in enumerate(s.inference.models) if m.max_replicas is not None]
        self.specs = {mi: autoscale.ScaleSpec(
            model=m.name, cards_per_replica=m.cards_per_replica, slots_per_replica=m.slots_per_replica,
            accelerators=m.accelerators, min_replicas=m.min_replicas, max_replicas=m.max_replicas,
            max_per_site=m.max_replicas_per_site)
            for mi, m in enumerate(s.inference.models) if m.max_replicas is not None}
        self.load_s = [m.load_s for m in s.inference.models]
        # With lending on, a replica takes the types inference keeps first, then those no queued
        # gang accepts, before lendable ones (autoscale.decide's ``prefer``; live: the hub's
        # ``[lending] inference_first``).
        self.lending = s.lending.enabled
        self.inference_first = tuple(s.lending.inference_first)
        self.types = sorted({a for site in lay.sites for a in site.accelerators})
        self.deployments = {mi: decide.Deployment(id=f"sim-{m.name}", tenant="sim", model=m.name,
                                                  spec=replicas.DeploymentSpec(
                                                      model=m.name, origins=[o.id for o in lay.origins],
                                                      cards_per_replica=m.cards_per_replica,
                                                      slots_per_replica=m.slots_per_replica,
                                                      accelerators=m.accelerators))
                            for mi, m in enumerate(s.inference.models) if m.max_replicas is not None}
        self.meters = {mi: autoscale.DemandMeter() for mi in self.models}
        self.memory = {mi: autoscale.Memory() for mi in self.models}
        self.reach_cache = {mi: autoscale.ReachMemo() for mi in self.models}
        self.held: dict[tuple[str, str], float] = {}  # cpn's replica cards by (site, accelerator)
        for f in inf.fixed_flats:
            key = (inf.site_ids[f // inf.nm], inf.rep_acc[f])
            self.held[key] = self.held.get(key, 0.0) + inf.slots[f] * inf.card_per_slot[f]
        self.outs = {mi: {t: 0 for t in TIERS} for mi in self.models}
        self.ins = {mi: 0 for mi in self.models}
        self.short = {mi: 0 for mi in self.models}
        self.reasons: dict[int, list[str]] = {mi: [] for mi in self.models}
        self.decisions = 0
        # Tidal lending's promise, checked: a decision short of cards that would not have been short
        # with the lent cards back ("blocked"), and cpn's requests not served within budget at those
        # origins until the next decision (an upper bound on what lending cost inference).
        self.blocked_decisions = 0
        self.blocked_failed = 0
        self.blocked_by_day: dict[int, int] = {}
        self._blocked: dict[int, tuple[list[int], int]] = {}
        self._origin_idx = {o.id: i for i, o in enumerate(lay.origins)}

    def __repr__(self) -> str:
        return f"<_Scaler models={len(self.models)} decisions={self.decisions}>"

    def _candidates(self) -> list[Candidate]:
        inf, train = self.inf, self.train
        out = []
        for i, site in enumerate(self.lay.sites):
            free: dict[str, float] = {}
            for acc, n in site.accelerators.items():
                h = self.held.get((site.id, acc), 0.0)
                if (site.id, acc) in train.free:
                    free[acc] = train.free[(site.id, acc)] + (math.ceil(h - 1e-9) - h)
                else:
                    free[acc] = n - h
            out.append(Candidate(id=site.id, city=site.city, region=site.region, tier=site.tier,
                                 healthy=inf.up[i], free_cards=free))
        return out

    def _hold(self, sid: str, acc: str, cards: float) -> None:
        h = self.held.get((sid, acc), 0.0)
        self.held[(sid, acc)] = h + cards
        self.train.hold(sid, acc, math.ceil(h + cards - 1e-9) - math.ceil(h - 1e-9))

    def _release(self, sid: str, acc: str, cards: float) -> None:
        h = self.held.get((sid, acc), 0.0)
        self.held[(sid, acc)] = max(0.0, h - cards)
        self.train.release(sid, acc, math.ceil(h - 1e-9) - math.ceil(max(0.0, h - cards) - 1e-9))

    def tick(self, now: float) -> list[tuple[float, int, int]]:
        """Decide for every autoscaled model; return ``(ready_at, site index, model index)`` of new replicas."""
        inf = self.inf
        ready: list[tuple[float, int, int]] = []
        cands = self._candidates()
        prefer = self._prefer()
        for mi in self.models:
            was = self._blocked.pop(mi, None)
            if was is not None:
                n = self._not_within(was[0]) - was[1]
                self.blocked_failed += n
                day = int((now - inf.start_s) // 86400.0)
                self.blocked_by_day[day] = self.blocked_by_day.get(day, 0) + n
            counts, svc = inf.take_counts(mi)
            meter = self.meters[mi]
            meter.observe(now, counts, svc)
            nm = inf.nm
            per = inf.slots
            replicas = [autoscale.Replica(site=inf.site_ids[si], tier=inf.tiers[si], slots=n * per[si * nm + mi],
                                          count=n, accelerator=inf.rep_acc[si * nm + mi],
                                          added_at=inf.added_at[si * nm + mi], protected=inf.protected[si * nm + mi])
                        for si, n in inf.live_replicas(mi) if inf.up[si]]
            demand = meter.demand()
            plan = autoscale.decide(now, self.specs[mi], demand, replicas, cands, self.reach, self.memory[mi],
                                    self.reach_cache[mi], prefer=prefer)
            if plan.short and self.train.lent:
                self._check_lending(now, mi, plan, demand, replicas, cands, prefer)
            self.decisions += 1
            self.memory[mi] = plan.memory
            self.short[mi] += bool(plan.short)
            # Carried out as the hub's deployments rule for scaling says (the commands it would send).
            loads, unloads = decide.autoscaler_asks(self.deployments[mi], plan)
            for a, load in zip(plan.add, loads):
                si = inf.idx[load.site]
                inf.add_replica(si, mi, load.command.accelerator, load.command.cards, now)
                self._hold(load.site, load.command.accelerator, load.command.cards)
                ready.append((now + self.load_s[mi], si, mi))
                self.outs[mi][inf.tiers[si]] += 1
                if len(self.reasons[mi]) < 6:
                    self.reasons[mi].append(f"{(now - inf.start_s) / 3600:.2f} h add {a.reason}")
            for rm, unload in zip(plan.remove, unloads):
                si = inf.idx[unload.site]
                f = si * nm + mi
                inf.remove_replica(si, mi)
                self._release(unload.site, inf.rep_acc[f], inf.slots[f] * inf.card_per_slot[f])
                self.ins[mi] += 1
                if len(self.reasons[mi]) < 10:
                    self.reasons[mi].append(f"{(now - inf.start_s) / 3600:.2f} h remove {rm.site}: {rm.reason}")
            if plan.add or plan.remove:
                cands = self._candidates()
        return ready

    def _prefer(self) -> tuple[str, ...]:
        """``autoscale.decide``'s ``prefer``: lending's ``inference_first``, then the types no gang
        waiting in cpn's training queue accepts (none without lending)."""
        if not self.lending:
            return ()
        wanted = {a for j in self.train.queue.values() if not j.infeasible for a in j.spec.accelerators}
        return autoscale.lending_preference(self.inference_first, self.types, wanted)

    def _not_within(self, origins: list[int]) -> int:
        st = self.inf.stats[0]
        return sum(self.inf.requests_by_origin[o] - st.within_by_origin[o] for o in origins)

    def _check_lending(self, now: float, mi: int, plan: autoscale.ScalePlan, demand: Sequence[autoscale.Demand],
                       replicas: Sequence[autoscale.Replica], cands: list[Candidate],
                       prefer: Sequence[str] = ()) -> None:
        """Was ``plan`` short for lack of cards lent to training? The same decision with the lent
        cards free: an origin short now but not then, with a lent site within its budget, was."""
        busy: dict[tuple[str, str], int] = {}
        for _, _, sid, acc, cards, _ in self.train.lent_attempts():
            busy[(sid, acc)] = busy.get((sid, acc), 0) + cards
        if not busy:
            return
        lent_at = {sid for sid, _ in busy}

        def short(plan_short: Sequence[str]) -> set[tuple[str, float]]:
            out = set()
            for x in plan_short:
                origin, _, rest = x.split(":", 1)[0].removeprefix("origin ").partition(" (")
                out.add((origin, float(rest.split(" ms", 1)[0])))
            return out

        near_lent = {(o, b) for o, b in short(plan.short) if any(sid in lent_at for sid, _ in self.reach.nearest(o, b))}
        if not near_lent:
            return  # no short origin has lent cards within its budget: nothing to ask again
        alt_cands = [Candidate(id=c.id, city=c.city, region=c.region, tier=c.tier, healthy=c.healthy,
                               draining=c.draining,
                               free_cards={a: f + busy.get((c.id, a), 0) for a, f in c.free_cards.items()})
                     if c.id in lent_at else c for c in cands]
        alt = autoscale.decide(now, self.specs[mi], demand, replicas, alt_cands, self.reach, self.memory[mi],
                               autoscale.ReachMemo(), prefer=prefer)
        blocked = {o for o, b in near_lent - short(alt.short)}
        if blocked:
            self.blocked_decisions += 1
            idx = sorted(self._origin_idx[o] for o in blocked if o in self._origin_idx)
            self._blocked[mi] = (idx, self._not_within(idx))

    def report(self, replicas_hour: dict[str, list[int]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for mi in self.models:
            name = self.inf.models[mi]
            spec = self.specs[mi]
            out[name] = {
                "min_replicas": spec.min_replicas, "max_replicas": spec.max_replicas,
                "scale_outs_by_tier": dict(self.outs[mi]), "scale_ins": self.ins[mi],
                "short_decisions": self.short[mi],
                "replicas_hourly_max": list(replicas_hour.get(name, [])),
                "first_reasons": list(self.reasons[mi]),
            }
        return out
