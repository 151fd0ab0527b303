"""Inference on a simulated clock: the hub's replica placement and router, with baselines. Pure.

What it promises:

- Replicas come from ``deployments.reconcile`` (one deployment per model covering every origin), the
  hub's own decision for ``/v1/deployments``: its ``LoadModel`` commands are the sim's replicas.
- Each request of the cpn policy is decided by ``router.Router.route`` over ``registry.SiteView``
  objects; the simulator raises and lowers ``replicas[model].busy`` as requests start and finish,
  which is what the router reads live from heartbeats. No second routing implementation.
- Policy ``cpn`` scales its replicas (``autoscale.decide``, driven by the engine through
  :meth:`InferenceSim.scale_state` / :meth:`add_replica` / :meth:`remove_replica`) when a model has
  ``max_replicas``; ``cpn-fixed`` is today's behaviour: the same router over the fixed replicas.
- Baselines decide the *same* requests on their own copies of slot state over the fixed replicas:
  ``random`` (a uniformly random start among the sites holding the model within budget, then the
  first with a free slot) and ``round-robin`` (per origin, model and budget, the next site in turn
  with a free slot).
- The oracle is the physical bound, not a policy: a request is feasible when some site that is up
  *at that moment*, of any tier, within the request's budget, has ``cards_per_replica`` cards of an
  accepted type (load, replicas and training ignored: an upper bound on any policy). The nearest
  *replica* within budget is kept as a second figure (``replica_feasible``) and as the reference of
  chosen ÷ nearest-replica RTT (detours).
- Admission by predicted time to first token (``Inference.slo_share`` > 0): a share of the
  requests carries an SLO. Policy ``cpn`` decides them as the live inference service does: the
  router's sites within budget (``Router.within_budget``), each seen by ``ttft.candidate`` of its
  ``SiteView`` (busy slots, the site's queue depth, the model's mean service time there learnt from
  cpn's completions as the hub learns it from answers, else the p50 of the site's last 256 service
  times refreshed once a simulated second as heartbeats are), and ``ttft.admit``; a refusal is a 429 (counted by
  ``ttft.refusal_kind``). An admitted request takes a free slot or waits in that replica's queue
  (FIFO; a finishing request hands its slot to the queue first). Its actual TTFT = RTT + the wait it
  saw + its prefill (``Model.prompt_tokens_mean``); the prediction and the actual are both kept,
  and the measured prefill calibrates the accelerator's profile as live (``ttft.calibrate``). The
  other policies serve SLO requests like any other (they know no SLO).
- Site loss: the site dies at ``fail`` but the hub only learns it ``detection_s`` later (as live:
  heartbeats stop). Requests in flight there, and requests sent there meanwhile, are re-decided at
  detection by the same policy (counted ``rerouted``), or counted ``failed_outage`` when nothing fits.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections import deque

import msgspec

from controlplane.core import deployments as decide
from controlplane.core import replicas as rep_mod
from controlplane.core import ttft
from controlplane.core.registry import SiteState, SiteView
from controlplane.core.router import Route, Router, RouteRequest, RttSource
from controlplane.tools.sim.core_scenario import Model, Scenario
from controlplane.tools.sim.core_workload import Rng
from edge_agent import wire
from topology import ingress, latency
from topology import layout as tlayout

POLICIES = ("cpn", "cpn-fixed", "random", "round-robin")
ROUTED = 2
"""Policies 0 .. ROUTED-1 are decided by ``Router.route`` over their own ``SiteView``s."""
RATIO_BINS = 41
"""Histogram of chosen ÷ oracle RTT: bins of 0.1 from 1.0; the last bin holds ≥ 5.0."""
SERVICE_RING = 256
"""Service times a simulated site keeps for its heartbeat's p50 (an agent keeps 1,024)."""
HEARTBEAT_S = 1.0
"""How often a simulated site's service-time p50 is refreshed (its heartbeat)."""


class Deployment:
    """Where each model's replicas are: ``placements[model] = [(site, accelerator, cards)]``;
    ``coverage[model]`` the sites the coverage plan alone needs (never scaled in)."""

    def __init__(self) -> None:
        self.placements: dict[str, list[tuple[str, str, float]]] = {}
        self.coverage: dict[str, list[str]] = {}
        self.uncovered: dict[str, int] = {}

    def cards_by_site_acc(self) -> dict[tuple[str, str], float]:
        """Cards each (site, accelerator) gives to inference replicas."""
        out: dict[tuple[str, str], float] = {}
        for lst in self.placements.values():
            for site, acc, cards in lst:
                out[(site, acc)] = out.get((site, acc), 0.0) + cards
        return out

    def cards_by_site(self) -> dict[str, float]:
        """Cards each site gives to inference replicas."""
        out: dict[str, float] = {}
        for lst in self.placements.values():
            for site, _, cards in lst:
                out[site] = out.get(site, 0.0) + cards
        return out


def deploy(lay: tlayout.Layout, rtt: latency.RttIndex, s: Scenario, now: float = 0.0) -> Deployment:
    """One deployment per model over every origin, decided by the hub's own ``deployments.reconcile``
    (every site up with all its cards free, as at the start of the day): its ``LoadModel``s are the
    replicas. The coverage replicas (never scaled in) are ``replicas.plan_replicas`` with the floor."""
    dep = Deployment()
    origins = [o.id for o in lay.origins]
    weights = {o.id: o.weight for o in lay.origins}
    regions: dict[str, list[str]] = {}
    for o in lay.origins:
        regions.setdefault(o.region, []).append(o.id)
    views = {site.id: SiteView(id=site.id, tier=site.tier, city=site.city, provider=site.provider, region=site.region,
                               accelerators=dict(site.accelerators), heartbeats=1, registered=True,
                               free_cards={a: float(n) for a, n in site.accelerators.items()})
             for site in lay.sites}
    specs = {m.name: rep_mod.DeploymentSpec(
        # Placed for the promise the router checks: the network's share of the budget.
        model=m.name, origins=origins, budget_ms=max(1e-3, m.deploy_budget_ms - s.inference.overhead_ms),
        cards_per_replica=m.cards_per_replica,
        min_cities=m.min_cities, replicas=m.replicas, slots_per_replica=m.slots_per_replica,
        accelerators=m.accelerators) for m in s.inference.models}
    deps = [decide.Deployment(id=f"sim-{m.name}", tenant="sim", model=m.name, spec=specs[m.name])
            for m in s.inference.models]
    # With lending on, replicas take the types inference keeps first (the hub's Settings, live too).
    prefer = tuple(s.lending.inference_first) if s.lending.enabled else ()
    plan = decide.reconcile(decide.Snapshot(deployments=deps, replicas={}, sites=lay.sites, views=views, rtt=rtt,
                                            regions=regions, weights=weights,
                                            settings=decide.Settings(prefer_accelerators=prefer)), now)
    planned = dict(plan.planned)
    cands = decide.planning_candidates(lay.sites, views, ())
    for m in s.inference.models:
        dep.placements[m.name] = [(x.site, x.command.accelerator, x.command.cards)
                                  for x in plan.loads if x.command.model == m.name]
        floor = m.min_replicas if m.max_replicas is not None else m.replicas
        cover = rep_mod.plan_replicas(msgspec.structs.replace(specs[m.name], replicas=floor), cands, rtt,
                                      origin_weights=weights)
        dep.coverage[m.name] = [p.site for p in cover.add]
        dep.uncovered[m.name] = len(planned[f"sim-{m.name}"].uncovered)
        cands = rep_mod.apply_debits(cands, planned[f"sim-{m.name}"])
    return dep


def _can_host(site: tlayout.Site, lay: tlayout.Layout, m: Model) -> bool:
    """Physically: the site has ``cards_per_replica`` cards of a type the model accepts (any tier)."""
    return any(n + 1e-9 >= m.cards_per_replica for a, n in site.accelerators.items()
               if m.accelerators is None or a in m.accelerators)


class PolicyStats:
    """Counters of one routing policy over the run (hourly and per origin)."""

    def __init__(self, hours: int, origins: int) -> None:
        self.within = [0] * hours
        self.over = [0] * hours
        self.failed = [0] * hours
        self.within_by_origin = [0] * origins
        self.rtt_sum_ms = 0.0
        self.ratio_sum = 0.0
        self.ratio_n = 0
        self.ratio_hist = [0] * RATIO_BINS
        self.rerouted = 0
        self.failed_outage = 0


class SloStats:
    """Policy ``cpn``'s requests with a TTFT SLO: admitted, refused by kind, met, predictor error."""

    def __init__(self) -> None:
        self.requests = 0
        self.admitted = 0
        self.queued = 0
        """... of which admitted to a full replica (they waited in its queue)."""
        self.met = 0
        self.missed = 0
        self.lost = 0
        """Admitted, then the site died before their first token (rerouted or failed, counted missed)."""
        self.refused = {k: 0 for k in ttft.REFUSAL_KINDS if k != "no_candidate"}
        self.no_candidate = 0
        """No site within budget holds the model (live: the router's 503, not a 429)."""
        self.examples: list[str] = []
        self.errors_ms: list[float] = []
        """Actual − predicted TTFT of every admitted request that got its first token."""
        self.ttft_ms: list[float] = []
        self.queued_errors_ms: list[float] = []
        self.queued_met = 0


class InferenceSim:
    """Slot state of every policy, the completion heap, and outage handling."""

    def __init__(self, lay: tlayout.Layout, rtt: latency.RttIndex, s: Scenario, dep: Deployment,
                 start_s: float, hours: int, router_rng: Rng, baseline_rng: Rng, fixed_rng: Rng | None = None,
                 ingress_rng: Rng | None = None, slo_rng: Rng | None = None) -> None:
        inf = s.inference
        self.start_s = start_s
        self.models = [m.name for m in inf.models]
        self.model_specs = list(inf.models)
        self.budgets = list(inf.budgets_ms)
        self.overhead_ms = inf.overhead_ms
        """cpn's own time charged on every request (a declared constant: the simulator has no model of
        its gateways' processing): a request is within budget when RTT + this is."""
        ov = self.overhead_ms
        self.overhead = (lambda _site: ov) if ov > 0 else None
        """What the router adds to the RTT for the budget (``Router.route``'s ``overhead``)."""
        self.policy = inf.policy
        self.autoscaled = [m.max_replicas is not None for m in inf.models]
        # cpn scales whenever a model has max_replicas; cpn-fixed (today's fixed replicas) is a
        # baseline, run only with the baselines (it would be cpn, request for request, without scaling).
        fixed = any(self.autoscaled) and inf.baselines
        sources: list[RttSource] = [rtt] * (2 if fixed else 1)
        names = list(POLICIES[:len(sources)])
        if inf.ingress:
            for name, cities in ingress.gateway_sets(lay, rtt).items():
                names.append(f"cpn@{name}")
                sources.append(ingress.NearestIngressRtt(lay, rtt, cities))
        self.policies: tuple[str, ...] = tuple(names) + (POLICIES[2:] if inf.baselines else ())
        self.autoscaling = any(self.autoscaled)
        """Policy 0 scales; policy 1 (cpn-fixed, when the baselines run) keeps the day's first replicas."""
        self.site_ids = [site.id for site in lay.sites]
        self.tiers = [site.tier for site in lay.sites]
        idx = {sid: i for i, sid in enumerate(self.site_ids)}
        self.idx = idx
        nm = len(self.models)
        ns = len(self.site_ids)
        self.nm = nm
        # Router-decided policies: index 0 (cpn, scaled), with autoscaling 1 (cpn-fixed), then the
        # gateway sets (fixed replicas); the baselines after them.
        self.routed = len(sources)
        self.pviews: list[dict[str, SiteView]] = []
        self.preps: list[list[wire.ReplicaStatus | None]] = []
        for _ in range(self.routed):
            self.pviews.append({
                site.id: SiteView(id=site.id, tier=site.tier, city=site.city, provider=site.provider, region=site.region,
                                  accelerators=dict(site.accelerators),
                                  free_cards={a: float(n) for a, n in site.accelerators.items()},
                                  tee=site.tee, backends=["sim"], registered=True)
                for site in lay.sites
            })
            self.preps.append([None] * (ns * nm))
        self.views = self.pviews[0]
        self.reps = self.preps[0]
        self.slots = [0] * (ns * nm)
        self.card_per_slot = [0.0] * (ns * nm)
        self.rep_acc = [""] * (ns * nm)
        self.added_at = [start_s] * (ns * nm)
        self.units = [0] * (ns * nm)        # cpn's replicas per (site, model), loading ones included
        self.ready_units = [0] * (ns * nm)  # ... of which ready
        self.protected = [False] * (ns * nm)
        for mi, m in enumerate(inf.models):
            cover = set(dep.coverage.get(m.name, ()))
            for site, acc, cards in dep.placements.get(m.name, []):
                f = idx[site] * nm + mi
                for p in range(self.routed):
                    st = wire.ReplicaStatus(model=m.name, deployment=f"sim-{m.name}", state="ready", cards=cards,
                                            slots=m.slots_per_replica, busy=0, accelerator=acc)
                    self.pviews[p][site].replicas[m.name] = st
                    self.preps[p][f] = st
                self.slots[f] = m.slots_per_replica
                self.card_per_slot[f] = cards / m.slots_per_replica
                self.rep_acc[f] = acc
                self.protected[f] = site in cover
                self.units[f] = self.ready_units[f] = 1
        self.fixed_flats = [f for f, r in enumerate(self.reps) if r is not None]
        self.replica_flats = list(self.fixed_flats)  # cpn's, grows as it scales out
        self.replica_cards = [0.0] * ns
        for f in self.fixed_flats:
            self.replica_cards[f // nm] += self.slots[f] * self.card_per_slot[f]
        self.routers = [Router(src, window=inf.window) for src in sources]
        self.router = self.routers[0]
        self.versions = [1] * self.routed
        self.rngs: list[Rng] = [router_rng] + [fixed_rng or router_rng] * fixed + [
            ingress_rng or router_rng] * (self.routed - 1 - fixed)
        self.router_rng = router_rng
        self.baseline_rng = baseline_rng
        self.busy = [[0] * (ns * nm) for _ in self.policies]  # routed policies keep theirs in preps
        self.up = [True] * ns      # as the hub sees it
        self.dead = [False] * ns   # the truth
        self.epoch = [0] * ns
        self.pending: dict[int, list[tuple[int, int, int, int, float]]] = {}
        self.rr: dict[int, int] = {}
        self.requests = [0] * hours
        self.feasible = [0] * hours
        self.replica_feasible = [0] * hours
        self.requests_by_origin = [0] * len(lay.origins)
        self.feasible_by_origin = [0] * len(lay.origins)
        self.oracle_rtt_sum_ms = 0.0
        self.oracle_n = 0
        self.stats = [PolicyStats(hours, len(lay.origins)) for _ in self.policies]
        self.heap: list[tuple[float, int, int, int, int, int, int, int, int, float]] = []
        self.seq = itertools.count()
        # Demand seen since the last scaling decision, per (origin, model, budget) key, and service time.
        self.counts: list[int] = []
        self.svc_sum = [0.0] * nm
        self.svc_n = [0] * nm
        # Admission by predicted TTFT (policy cpn only): per (site, model) queues, per-site service
        # times for the heartbeat p50, the accelerator profiles the service calibrates.
        self.slo: SloStats | None = SloStats() if inf.slo_share > 0 and inf.requests > 0 else None
        self.slo_share = inf.slo_share
        self.slo_ms = inf.slo_ttft_ms
        self.slo_rng = slo_rng
        self.queues: dict[int, deque[tuple[float, int, int, int, float, float, float, float, int, float, str]]] = {}
        self.ring: list[list[float]] = [[] for _ in range(ns)]
        self.ring_sorted: list[list[float]] = [[] for _ in range(ns)]
        self.svc_mean = [0.0] * (ns * nm)
        self.ring_at = [0] * ns
        self.hb_at = [-math.inf] * ns
        self.profiles: dict[str, dict[str, ttft.Profile]] = {m.name: {} for m in inf.models}
        """Prefill profiles per model and accelerator, calibrated from first tokens (as live)."""
        self.acc_units = {a: spec.units for a, spec in lay.accelerators.items()}
        self.prefill_base = [m.ttft_ms / m.prompt_tokens_mean for m in inf.models]
        self.prompt_mean = [m.prompt_tokens_mean for m in inf.models]
        # Route requests are immutable: build each (origin, model, budget) once.
        nb = len(self.budgets)
        self.nb = nb
        self.origin_ids = [o.id for o in lay.origins]
        self.reqs: list[RouteRequest] = []
        self.cands: list[list[tuple[int, int, float]]] = []   # within budget, RTT order
        self.holders: list[list[tuple[int, int, float]]] = []  # (o, m): every holder, RTT order
        self.physical: list[list[int]] = []  # (o, m, b): sites within budget able to host the model
        able = [[_can_host(site, lay, m) for site in lay.sites] for m in inf.models]
        for o in lay.origins:
            ranked = rtt.ranked(o.id)
            for mi, model in enumerate(self.models):
                hold = [(idx[sid], idx[sid] * nm + mi, r) for sid, r in ranked if self.reps[idx[sid] * nm + mi] is not None]
                self.holders.append(hold)
                for b in self.budgets:
                    self.reqs.append(RouteRequest(origin=o.id, model=model, budget_ms=b, policy=self.policy))
                    self.cands.append([c for c in hold if c[2] + ov <= b])
                    self.physical.append([idx[sid] for sid, r in ranked if r + ov <= b and able[mi][idx[sid]]])
                    self.counts.append(0)

    def __repr__(self) -> str:
        return f"<InferenceSim sites={len(self.site_ids)} replicas={len(self.replica_flats)} in_flight={len(self.heap)}>"

    # ------------------------------------------------------------------ picking

    def _pick_routed(self, p: int, key: int) -> tuple[int, float]:
        d = self.routers[p].route(self.reqs[key], self.pviews[p], self.versions[p], self.rngs[p], self.overhead)
        if d.__class__ is Route:
            return self.idx[d.site], d.rtt_ms
        return -1, 0.0

    def _pick_baseline(self, p: int, key: int, okey: int) -> tuple[int, float]:
        cands = self.cands[key]
        n = len(cands)
        busy, slots, up = self.busy[p], self.slots, self.up
        if n:
            if self.policies[p] == "random":
                start = int(self.baseline_rng.random() * n)
            else:
                start = self.rr.get(key, 0)
            for k in range(n):
                i = start + k
                if i >= n:
                    i -= n
                s, f, r = cands[i]
                if up[s] and busy[f] < slots[f]:
                    if self.policies[p] == "round-robin":
                        self.rr[key] = i + 1 if i + 1 < n else 0
                    return s, r
        if self.policy == "nearest":
            for s, f, r in self.holders[okey]:
                if up[s] and busy[f] < slots[f]:
                    return s, r
        return -1, 0.0

    def _pick(self, p: int, key: int, okey: int) -> tuple[int, float]:
        return self._pick_routed(p, key) if p < self.routed else self._pick_baseline(p, key, okey)

    def _take(self, p: int, f: int) -> None:
        if p < self.routed:
            self.preps[p][f].busy += 1  # type: ignore[union-attr]
        else:
            self.busy[p][f] += 1

    # ------------------------------------------------------------------ the hot path

    def drain(self, t: float) -> None:
        """Finish every request that ends by ``t``."""
        heap, epoch, preps, busy, routed = self.heap, self.epoch, self.preps, self.busy, self.routed
        pop = heapq.heappop
        slo = self.slo is not None
        while heap and heap[0][0] <= t:
            e = pop(heap)
            if e[5] == epoch[e[4]]:
                if e[2] < routed:
                    if slo and e[2] == 0:
                        self._finished(e)
                    else:
                        preps[e[2]][e[3]].busy -= 1  # type: ignore[union-attr]
                else:
                    busy[e[2]][e[3]] -= 1

    def _finished(self, e: tuple[float, int, int, int, int, int, int, int, int, float]) -> None:
        """A cpn request ends (TTFT admission on): its service time joins the site's ring, and its
        slot goes to the replica's queue first."""
        s, f = e[4], e[3]
        ring, ordered, ms = self.ring[s], self.ring_sorted[s], e[9] * 1000.0
        if len(ring) < SERVICE_RING:
            ring.append(ms)
        else:
            k = self.ring_at[s]
            del ordered[bisect.bisect_left(ordered, ring[k])]
            ring[k] = ms
            self.ring_at[s] = k + 1 if k + 1 < SERVICE_RING else 0
        bisect.insort(ordered, ms)
        self.svc_mean[f] = ttft.service_update(self.svc_mean[f], ms)  # what the hub learns from answers
        q = self.queues.get(f)
        if q:
            self._start(q.popleft(), f, s, e[0])
        else:
            self.reps[f].busy -= 1  # type: ignore[union-attr]

    def _start(self, w: tuple[float, int, int, int, float, float, float, float, int, float, str], f: int, s: int,
               t: float) -> None:
        """A queued SLO request takes the slot just freed at ``t``: its first token is now known."""
        self.views[self.site_ids[s]].queue_depth -= 1
        heapq.heappush(self.heap, (t + w[4], next(self.seq), 0, f, s, self.epoch[s], w[1], w[2], w[3], w[4]))
        self._first_token(w, t, queued=True)

    def _first_token(self, w: tuple[float, int, int, int, float, float, float, float, int, float, str], t: float,
                     queued: bool) -> None:
        """Actual TTFT = RTT + the wait it saw + its prefill; kept beside the prediction. The measured
        prefill (actual less the predicted RTT and queue) calibrates the profile, as the live service
        does with a stream's first token."""
        slo = self.slo
        assert slo is not None
        actual = w[6] + (t - w[0]) * 1000.0 + w[7]
        err = actual - w[5]
        slo.errors_ms.append(err)
        if queued:
            slo.queued_errors_ms.append(err)
        slo.ttft_ms.append(actual)
        if actual <= self.slo_ms:
            slo.met += 1
            slo.queued_met += queued
        else:
            slo.missed += 1
        if w[8] >= ttft.CALIBRATE_MIN_TOKENS:
            acc = w[10]
            per = self.profiles[self.models[w[2]]]
            per[acc] = ttft.calibrate(per.get(acc) or ttft.Profile(accelerator=acc), w[8],
                                                actual - w[6] - w[9])

    def _heartbeat(self, s: int, t: float) -> None:
        """Refresh site ``s``'s service-time p50 (nearest rank) at most once a simulated second."""
        if t - self.hb_at[s] < HEARTBEAT_S:
            return
        self.hb_at[s] = t
        ordered = self.ring_sorted[s]  # the ring, kept sorted as it changes
        if ordered:
            self.views[self.site_ids[s]].service_ms_p50 = ordered[max(0, math.ceil(0.5 * len(ordered)) - 1)]

    def _admit(self, t: float, key: int, o: int, m: int, b: int, svc: float) -> tuple[int, float]:
        """Policy cpn on a request with an SLO: ``ttft.admit`` over the sites within budget. Returns
        the chosen site index and its RTT (the request holds a slot or waits in its queue), or -1
        (refused)."""
        slo = self.slo
        assert slo is not None and self.slo_rng is not None
        slo.requests += 1
        tokens = max(1, int(self.slo_rng.expovariate(1.0 / self.prompt_mean[m])))
        views, idx = self.views, self.idx
        model = self.models[m]
        cands = []
        for sid, rtt_ms in self.routers[0].within_budget(self.reqs[key], views, self.versions[0],
                                                            overhead=self.overhead):
            self._heartbeat(idx[sid], t)
            c = ttft.candidate(views[sid], model, rtt_ms, self.svc_mean[idx[sid] * self.nm + m])
            if c is not None:
                cands.append(c)
        if not cands:
            slo.no_candidate += 1
            return -1, 0.0
        verdict = ttft.admit(cands, tokens, self.slo_ms, self.profiles[model])
        if isinstance(verdict, ttft.Refuse):
            slo.refused[ttft.refusal_kind(verdict, self.slo_ms)] += 1
            if len(slo.examples) < 4:
                slo.examples.append(f"{(t - self.start_s) / 3600.0:.2f} h {self.origin_ids[o]}: {verdict.reason}")
            return -1, 0.0
        best = verdict.prediction
        slo.admitted += 1
        s = idx[best.site]
        f = s * self.nm + m
        acc = self.rep_acc[f]
        prefill = self.prefill_base[m] * tokens / self.acc_units.get(acc, 1.0)
        pred_acc = ttft.accelerator_of(views[best.site], model)
        w = (t, o, m, b, svc, best.ttft_ms, best.rtt_ms, prefill, tokens, best.queue_ms, pred_acc)
        rep = self.reps[f]
        assert rep is not None
        if self.dead[s]:  # the hub does not know yet: lost with the site, rerouted at detection
            rep.busy += 1
            self.pending.setdefault(s, []).append((0, o, m, b, svc))
            slo.lost += 1
            slo.missed += 1
            return s, best.rtt_ms
        q = self.queues.get(f)
        if rep.busy < rep.slots and not q:
            rep.busy += 1
            heapq.heappush(self.heap, (t + svc, next(self.seq), 0, f, s, self.epoch[s], o, m, b, svc))
            self._first_token(w, t, queued=False)
        else:
            if q is None:
                q = self.queues[f] = deque()
            q.append(w)
            views[best.site].queue_depth += 1
            slo.queued += 1
        return s, best.rtt_ms

    def request(self, t: float, o: int, m: int, b: int, svc: float) -> None:
        """Decide one request under every policy and start it where chosen."""
        hour = int((t - self.start_s) / 3600.0)
        nm = self.nm
        okey = o * nm + m
        key = okey * self.nb + b
        budget = self.budgets[b]
        self.requests[hour] += 1
        self.requests_by_origin[o] += 1
        with_slo = self.slo is not None and self.slo_rng is not None and self.slo_rng.random() < self.slo_share
        self.counts[key] += 1
        self.svc_sum[m] += svc
        self.svc_n[m] += 1
        dead = self.dead
        for s in self.physical[key]:
            if not dead[s]:
                self.feasible[hour] += 1
                self.feasible_by_origin[o] += 1
                break
        orc = 0.0
        for s, _, r in self.holders[okey]:
            if not dead[s]:
                orc = r
                break
        if orc > 0.0:
            self.oracle_rtt_sum_ms += orc
            self.oracle_n += 1
            if orc + self.overhead_ms <= budget:
                self.replica_feasible[hour] += 1
        push, seq, heap, epoch = heapq.heappush, self.seq, self.heap, self.epoch
        end = t + svc
        routed, preps = self.routed, self.preps
        for p in range(len(self.policies)):
            st = self.stats[p]
            if with_slo and p == 0:
                s, r = self._admit(t, key, o, m, b, svc)
                if s < 0:
                    st.failed[hour] += 1
                    continue
            else:
                s, r = self._pick_routed(p, key) if p < routed else self._pick_baseline(p, key, okey)
                if s < 0:
                    st.failed[hour] += 1
                    continue
                f = s * nm + m
                if p < routed:
                    preps[p][f].busy += 1  # type: ignore[union-attr]
                else:
                    self.busy[p][f] += 1
                if dead[s]:
                    self.pending.setdefault(s, []).append((p, o, m, b, svc))
                else:
                    push(heap, (end, next(seq), p, f, s, epoch[s], o, m, b, svc))
            if r + self.overhead_ms <= budget:
                st.within[hour] += 1
                st.within_by_origin[o] += 1
            else:
                st.over[hour] += 1
            st.rtt_sum_ms += r
            if orc > 0.0:
                q = r / orc
                st.ratio_sum += q
                st.ratio_n += 1
                k = int((q - 1.0) * 10.0)  # < 0: a scaled-out replica nearer than any fixed one
                st.ratio_hist[0 if k < 0 else k if k < RATIO_BINS - 1 else RATIO_BINS - 1] += 1

    # ------------------------------------------------------------------ faults

    def fail(self, s: int, t: float) -> None:
        """Site ``s`` dies now; the hub does not know yet. Its requests in flight are lost."""
        if self.dead[s]:
            return
        self.dead[s] = True
        old = self.epoch[s]
        self.epoch[s] = old + 1
        lost = self.pending.setdefault(s, [])
        for e in self.heap:
            if e[4] == s and e[5] == old:
                lost.append((e[2], e[6], e[7], e[8], e[9]))
        if self.slo is not None:  # cpn's SLO requests waiting there never get their first token
            nm = self.nm
            for f in range(s * nm, s * nm + nm):
                for w in self.queues.pop(f, ()):
                    lost.append((0, w[1], w[2], w[3], w[4]))
                    self.slo.lost += 1
                    self.slo.missed += 1
            self.views[self.site_ids[s]].queue_depth = 0

    def detect(self, s: int, t: float, log: dict[str, object]) -> None:
        """The hub declares ``s`` lost: nothing more goes there; its requests are re-decided."""
        sid = self.site_ids[s]
        for p in range(self.routed):
            view = self.pviews[p][sid]
            view.state = SiteState.LOST
            view.lost_at = t
            view.sent = 0
            self.versions[p] += 1
        self.up[s] = False
        nm = self.nm
        for f in range(s * nm, s * nm + nm):
            for reps in self.preps:
                if reps[f] is not None:
                    reps[f].busy = 0  # type: ignore[union-attr]
            for busy in self.busy:
                busy[f] = 0
        rerouted = failed = 0
        for p, o, m, b, svc in sorted(self.pending.pop(s, []), key=lambda x: x[0]):
            okey = o * nm + m
            s2, _ = self._pick(p, okey * self.nb + b, okey)
            if s2 < 0:
                self.stats[p].failed_outage += 1
                failed += p == 0
                continue
            f = s2 * nm + m
            self._take(p, f)
            self.stats[p].rerouted += 1
            rerouted += p == 0
            heapq.heappush(self.heap, (t + svc, next(self.seq), p, f, s2, self.epoch[s2], o, m, b, svc))
        log["rerouted"] = int(log.get("rerouted", 0)) + rerouted  # type: ignore[call-overload]
        log["failed"] = int(log.get("failed", 0)) + failed  # type: ignore[call-overload]

    def recover(self, s: int, t: float) -> None:
        """Site ``s`` is back (replicas reloaded, empty)."""
        self.dead[s] = False
        self.up[s] = True
        for p in range(self.routed):
            view = self.pviews[p][self.site_ids[s]]
            view.state = SiteState.UP
            view.lost_at = None
            view.last_seen = t
            self.versions[p] += 1

    # ------------------------------------------------------------------ scaling (cpn only)

    def take_counts(self, m: int) -> tuple[dict[tuple[str, float], int], float | None]:
        """Requests of model ``m`` per (origin, budget) since the last call, and their mean service time."""
        nm, nb = self.nm, self.nb
        out: dict[tuple[str, float], int] = {}
        for o, oid in enumerate(self.origin_ids):
            base = (o * nm + m) * nb
            for b in range(nb):
                n = self.counts[base + b]
                if n:
                    # The autoscaler places for the network's share of the budget (RTT + overhead fits).
                    out[(oid, max(1e-3, self.budgets[b] - self.overhead_ms))] = n
                    self.counts[base + b] = 0
        svc = self.svc_sum[m] / self.svc_n[m] if self.svc_n[m] else None
        self.svc_sum[m] = 0.0
        self.svc_n[m] = 0
        return out, svc

    def live_replicas(self, m: int) -> list[tuple[int, int]]:
        """cpn's (site index, replicas there) of model ``m`` holding cards (loading or ready)."""
        nm, units = self.nm, self.units
        return [(s, units[s * nm + m]) for s in range(len(self.site_ids)) if units[s * nm + m] > 0]

    def add_replica(self, s: int, m: int, acc: str, cards: float, now: float) -> None:
        """cpn scales out: one more replica of model ``m`` starts loading at site ``s``; a site's
        replicas serve as one (its slots grow as each is ready)."""
        nm = self.nm
        f = s * nm + m
        spec = self.model_specs[m]
        st = self.reps[f]
        if st is None:
            st = wire.ReplicaStatus(model=spec.name, deployment=f"sim-{spec.name}", state="loading", cards=cards,
                                    slots=spec.slots_per_replica, busy=0, accelerator=acc)
            self.reps[f] = st
            self.replica_flats.append(f)
            self.slots[f] = spec.slots_per_replica
            self.card_per_slot[f] = cards / spec.slots_per_replica
        elif self.units[f] == 0:
            st.state = "loading"
        self.units[f] += 1
        view = self.views[self.site_ids[s]]
        if view.replicas.get(spec.name) is not st:
            view.replicas[spec.name] = st
            # The router caches which sites hold the model; state and slots it reads live, so only
            # a new holder needs a new registry version (as a heartbeat listing a new model does).
            self.versions[0] += 1
        self.rep_acc[f] = acc
        st.accelerator = acc
        self.added_at[f] = now

    def replica_ready(self, s: int, m: int, now: float | None = None) -> bool:
        """One more of cpn's replicas at ``s`` serves; requests waiting in its queue take the new slots."""
        f = s * self.nm + m
        st = self.reps[f]
        if st is None or self.ready_units[f] >= self.units[f]:
            return False
        self.ready_units[f] += 1
        st.slots = self.ready_units[f] * self.slots[f]
        st.state = "ready"
        q = self.queues.get(f)
        while q and st.busy < st.slots and now is not None and not self.dead[s]:
            st.busy += 1
            self._start(q.popleft(), f, s, now)
        return True

    def remove_replica(self, s: int, m: int) -> None:
        """cpn scales in one replica at ``s``: its slots go; requests in flight finish."""
        f = s * self.nm + m
        st = self.reps[f]
        if st is None or self.units[f] == 0:
            return
        self.units[f] -= 1
        self.ready_units[f] = min(self.ready_units[f], self.units[f])
        if self.units[f] == 0:
            # Gone from the site's list, as from its next heartbeat: the router's holder lists
            # change. Requests in flight still finish on ``st`` (drain holds the reference).
            self.views[self.site_ids[s]].replicas.pop(st.model, None)
            self.versions[0] += 1
        else:
            st.slots = self.ready_units[f] * self.slots[f]
            if self.ready_units[f] == 0:
                st.state = "loading"

    def replica_cards_now(self, out: list[float]) -> None:
        """Add the cards cpn's live replicas hold, per site, to ``out``."""
        nm, cps, slots, units = self.nm, self.card_per_slot, self.slots, self.units
        for f in self.replica_flats:
            if units[f]:
                out[f // nm] += units[f] * slots[f] * cps[f]

    # ------------------------------------------------------------------ sampling

    def busy_cards(self, out: list[float]) -> None:
        """Add the cpn policy's busy inference cards per site (busy slots × cards per slot) to ``out``."""
        nm, reps, cps = self.nm, self.reps, self.card_per_slot
        for f in self.replica_flats:
            b = reps[f].busy  # type: ignore[union-attr]
            if b:
                out[f // nm] += b * cps[f]
