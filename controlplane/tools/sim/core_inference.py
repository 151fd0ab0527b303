"""Inference on a simulated clock: the hub's replica placement and router, with baselines. Pure.

What it promises:

- Replicas come from ``replicas.plan_replicas`` (one deployment per model covering every origin,
  ``apply_debits`` between models), exactly as the hub plans ``/v1/deployments``.
- Each request of the cpn policy is decided by ``router.Router.route`` over ``registry.SiteView``
  objects; the simulator raises and lowers ``replicas[model].busy`` as requests start and finish,
  which is what the router reads live from heartbeats. No second routing implementation.
- Baselines decide the *same* requests on their own copies of slot state: ``random`` (a uniformly
  random start among the sites holding the model within budget, then the first with a free slot)
  and ``round-robin`` (per origin, model and budget, the next site in turn with a free slot).
- The oracle is a bound, not a policy: the RTT of the nearest site that is up and holds the model,
  ignoring load. "Feasible" = that RTT fits the budget; chosen RTT ÷ oracle RTT measures detours.
- Site loss: the site dies at ``fail`` but the hub only learns it ``detection_s`` later (as live:
  heartbeats stop). Requests in flight there, and requests sent there meanwhile, are re-decided at
  detection by the same policy (counted ``rerouted``), or counted ``failed_outage`` when nothing fits.
"""

from __future__ import annotations

import heapq
import itertools

from controlplane.core import replicas as rep_mod
from controlplane.core.registry import SiteView
from controlplane.core.router import Route, Router, RouteRequest
from controlplane.tools.sim.core_scenario import Scenario
from controlplane.tools.sim.core_workload import Rng
from edge_agent import wire
from topology import latency
from topology import layout as tlayout

POLICIES = ("cpn", "random", "round-robin")
RATIO_BINS = 41
"""Histogram of chosen ÷ oracle RTT: bins of 0.1 from 1.0; the last bin holds ≥ 5.0."""


class Deployment:
    """Where each model's replicas are: ``placements[model] = [(site, accelerator, cards)]``."""

    def __init__(self) -> None:
        self.placements: dict[str, list[tuple[str, str, float]]] = {}
        self.uncovered: dict[str, int] = {}

    def cards_by_site(self) -> dict[str, float]:
        """Cards each site gives to inference replicas."""
        out: dict[str, float] = {}
        for lst in self.placements.values():
            for site, _, cards in lst:
                out[site] = out.get(site, 0.0) + cards
        return out


def deploy(lay: tlayout.Layout, rtt: latency.RttIndex, s: Scenario) -> Deployment:
    """Plan one deployment per model with ``replicas.plan_replicas`` (the hub's own placement)."""
    dep = Deployment()
    cands = [
        rep_mod.Candidate(id=site.id, city=site.city, region=site.region, tier=site.tier,
                          free_cards={a: float(n) for a, n in site.accelerators.items()})
        for site in lay.sites
    ]
    origins = [o.id for o in lay.origins]
    weights = {o.id: o.weight for o in lay.origins}
    for m in s.inference.models:
        spec = rep_mod.DeploymentSpec(
            model=m.name, origins=origins, budget_ms=m.deploy_budget_ms, cards_per_replica=m.cards_per_replica,
            min_cities=m.min_cities, replicas=m.replicas, slots_per_replica=m.slots_per_replica,
            accelerators=m.accelerators)
        plan = rep_mod.plan_replicas(spec, cands, rtt, origin_weights=weights)
        dep.placements[m.name] = [(p.site, p.accelerator, p.cards) for p in plan.add]
        dep.uncovered[m.name] = len(plan.uncovered)
        cands = rep_mod.apply_debits(cands, plan)
    return dep


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


class InferenceSim:
    """Slot state of every policy, the completion heap, and outage handling."""

    def __init__(self, lay: tlayout.Layout, rtt: latency.RttIndex, s: Scenario, dep: Deployment,
                 start_s: float, hours: int, router_rng: Rng, baseline_rng: Rng) -> None:
        inf = s.inference
        self.start_s = start_s
        self.models = [m.name for m in inf.models]
        self.budgets = list(inf.budgets_ms)
        self.policy = inf.policy
        self.policies = POLICIES if inf.baselines else POLICIES[:1]
        self.site_ids = [site.id for site in lay.sites]
        self.tiers = [site.tier for site in lay.sites]
        idx = {sid: i for i, sid in enumerate(self.site_ids)}
        self.idx = idx
        nm = len(self.models)
        ns = len(self.site_ids)
        self.nm = nm
        self.views: dict[str, SiteView] = {
            site.id: SiteView(id=site.id, tier=site.tier, city=site.city, provider=site.provider, region=site.region,
                              accelerators=dict(site.accelerators), free_cards={a: float(n) for a, n in site.accelerators.items()},
                              tee=site.tee, backends=["sim"], registered=True)
            for site in lay.sites
        }
        self.reps: list[wire.ReplicaStatus | None] = [None] * (ns * nm)
        self.slots = [0] * (ns * nm)
        self.card_per_slot = [0.0] * (ns * nm)
        for mi, m in enumerate(inf.models):
            for site, acc, cards in dep.placements.get(m.name, []):
                st = wire.ReplicaStatus(model=m.name, deployment=f"sim-{m.name}", state="ready", cards=cards,
                                        slots=m.slots_per_replica, busy=0)
                self.views[site].replicas[m.name] = st
                f = idx[site] * nm + mi
                self.reps[f] = st
                self.slots[f] = m.slots_per_replica
                self.card_per_slot[f] = cards / m.slots_per_replica
        self.replica_flats = [f for f, r in enumerate(self.reps) if r is not None]
        self.replica_cards = [0.0] * ns
        for f in self.replica_flats:
            self.replica_cards[f // nm] += self.slots[f] * self.card_per_slot[f]
        self.router = Router(rtt, window=inf.window)
        self.version = 1
        self.router_rng = router_rng
        self.baseline_rng = baseline_rng
        self.busy = [[0] * (ns * nm) for _ in self.policies]  # index 0 unused: cpn's is in self.reps
        self.up = [True] * ns      # as the hub sees it
        self.dead = [False] * ns   # the truth
        self.epoch = [0] * ns
        self.pending: dict[int, list[tuple[int, int, int, int, float]]] = {}
        self.rr: dict[int, int] = {}
        self.requests = [0] * hours
        self.feasible = [0] * hours
        self.requests_by_origin = [0] * len(lay.origins)
        self.feasible_by_origin = [0] * len(lay.origins)
        self.oracle_rtt_sum_ms = 0.0
        self.oracle_n = 0
        self.stats = [PolicyStats(hours, len(lay.origins)) for _ in self.policies]
        self.heap: list[tuple[float, int, int, int, int, int, int, int, int, float]] = []
        self.seq = itertools.count()
        # Route requests are immutable: build each (origin, model, budget) once.
        nb = len(self.budgets)
        self.nb = nb
        self.reqs: list[RouteRequest] = []
        self.cands: list[list[tuple[int, int, float]]] = []   # within budget, RTT order
        self.holders: list[list[tuple[int, int, float]]] = []  # (o, m): every holder, RTT order
        for o in lay.origins:
            ranked = rtt.ranked(o.id)
            for mi, model in enumerate(self.models):
                hold = [(idx[sid], idx[sid] * nm + mi, r) for sid, r in ranked if self.reps[idx[sid] * nm + mi] is not None]
                self.holders.append(hold)
                for b in self.budgets:
                    self.reqs.append(RouteRequest(origin=o.id, model=model, budget_ms=b, policy=self.policy))
                    self.cands.append([c for c in hold if c[2] <= b])

    def __repr__(self) -> str:
        return f"<InferenceSim sites={len(self.site_ids)} replicas={len(self.replica_flats)} in_flight={len(self.heap)}>"

    # ------------------------------------------------------------------ picking

    def _pick_cpn(self, key: int) -> tuple[int, float]:
        d = self.router.route(self.reqs[key], self.views, self.version, self.router_rng)
        if d.__class__ is Route:
            return self.idx[d.site], d.rtt_ms
        return -1, 0.0

    def _pick_baseline(self, p: int, key: int, okey: int) -> tuple[int, float]:
        cands = self.cands[key]
        n = len(cands)
        busy, slots, up = self.busy[p], self.slots, self.up
        if n:
            if p == 1:
                start = int(self.baseline_rng.random() * n)
            else:
                start = self.rr.get(key, 0)
            for k in range(n):
                i = start + k
                if i >= n:
                    i -= n
                s, f, r = cands[i]
                if up[s] and busy[f] < slots[f]:
                    if p == 2:
                        self.rr[key] = i + 1 if i + 1 < n else 0
                    return s, r
        if self.policy == "nearest":
            for s, f, r in self.holders[okey]:
                if up[s] and busy[f] < slots[f]:
                    return s, r
        return -1, 0.0

    def _pick(self, p: int, key: int, okey: int) -> tuple[int, float]:
        return self._pick_cpn(key) if p == 0 else self._pick_baseline(p, key, okey)

    def _take(self, p: int, f: int) -> None:
        if p == 0:
            self.reps[f].busy += 1  # type: ignore[union-attr]
        else:
            self.busy[p][f] += 1

    # ------------------------------------------------------------------ the hot path

    def drain(self, t: float) -> None:
        """Finish every request that ends by ``t``."""
        heap, epoch, reps, busy = self.heap, self.epoch, self.reps, self.busy
        pop = heapq.heappop
        while heap and heap[0][0] <= t:
            e = pop(heap)
            if e[5] == epoch[e[4]]:
                if e[2] == 0:
                    reps[e[3]].busy -= 1  # type: ignore[union-attr]
                else:
                    busy[e[2]][e[3]] -= 1

    def request(self, t: float, o: int, m: int, b: int, svc: float) -> None:
        """Decide one request under every policy and start it where chosen."""
        hour = int((t - self.start_s) / 3600.0)
        nm = self.nm
        okey = o * nm + m
        key = okey * self.nb + b
        budget = self.budgets[b]
        self.requests[hour] += 1
        self.requests_by_origin[o] += 1
        dead = self.dead
        orc = 0.0
        for s, _, r in self.holders[okey]:
            if not dead[s]:
                orc = r
                break
        if orc > 0.0:
            self.oracle_rtt_sum_ms += orc
            self.oracle_n += 1
            if orc <= budget:
                self.feasible[hour] += 1
                self.feasible_by_origin[o] += 1
        push, seq, heap, epoch = heapq.heappush, self.seq, self.heap, self.epoch
        end = t + svc
        for p in range(len(self.policies)):
            st = self.stats[p]
            s, r = self._pick_cpn(key) if p == 0 else self._pick_baseline(p, key, okey)
            if s < 0:
                st.failed[hour] += 1
                continue
            f = s * nm + m
            if p == 0:
                self.reps[f].busy += 1  # type: ignore[union-attr]
            else:
                self.busy[p][f] += 1
            if dead[s]:
                self.pending.setdefault(s, []).append((p, o, m, b, svc))
            else:
                push(heap, (end, next(seq), p, f, s, epoch[s], o, m, b, svc))
            if r <= budget:
                st.within[hour] += 1
                st.within_by_origin[o] += 1
            else:
                st.over[hour] += 1
            st.rtt_sum_ms += r
            if orc > 0.0:
                q = r / orc
                st.ratio_sum += q
                st.ratio_n += 1
                k = int((q - 1.0) * 10.0)
                st.ratio_hist[k if k < RATIO_BINS - 1 else RATIO_BINS - 1] += 1

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

    def detect(self, s: int, t: float, log: dict[str, object]) -> None:
        """The hub declares ``s`` lost: nothing more goes there; its requests are re-decided."""
        sid = self.site_ids[s]
        view = self.views[sid]
        view.state = "lost"
        view.lost_at = t
        view.sent = 0
        self.version += 1
        self.up[s] = False
        nm = self.nm
        for f in range(s * nm, s * nm + nm):
            if self.reps[f] is not None:
                self.reps[f].busy = 0  # type: ignore[union-attr]
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
        view = self.views[self.site_ids[s]]
        view.state = "up"
        view.lost_at = None
        view.last_seen = t
        self.version += 1

    # ------------------------------------------------------------------ sampling

    def busy_cards(self, out: list[float]) -> None:
        """Add the cpn policy's busy inference cards per site (busy slots × cards per slot) to ``out``."""
        nm, reps, cps = self.nm, self.reps, self.card_per_slot
        for f in self.replica_flats:
            b = reps[f].busy  # type: ignore[union-attr]
            if b:
                out[f // nm] += b * cps[f]
