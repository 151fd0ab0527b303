"""Replica autoscaling for inference deployments: demand in, a plan of adds and removes out. Pure.

What it holds: the knobs of one deployment's scaling (:class:`ScaleSpec`), the demand the hub
measured per origin and request budget (:class:`Demand`, kept by :class:`DemandMeter`), the
deployment's replicas (:class:`Replica`), the decision (:class:`ScalePlan`) and :func:`decide`.
No I/O, no clock (``now`` is an argument), no randomness: the same inputs give the same plan, in
``cpn sim`` and live.

Rule 1 (bounds): a deployment scales between ``min_replicas`` (and never below the replicas its
coverage needs, marked ``protected``) and ``max_replicas``. ``min_replicas == max_replicas`` (the
fixed ``replicas`` of today) means no scaling: the plan is empty and says so.
Rule 2 (sizing): an origin's demand under a budget is an offered load ``A = rate × service time``
(busy slots, Erlangs). It needs ``A + z·√A`` slots (square-root staffing: Poisson arrivals on a
loss system; z = 3 keeps blocking well under 1%) from replicas within that budget. Demand is
poured into replicas in (tier, RTT) order, edge first; what no replica within budget can take is
the origin's *deficit*.
Rule 3 (scale out): a deficit adds replicas on sites within the demand's budget that have
``cards_per_replica`` free cards of an accepted type and no replica of the deployment: edge first,
then regional, then hub (spill), nearer first, then more free cards, then site id. Each add says
why (origin, budget, slots needed and held) and, for a spill, that the edges within budget are full.
Within the site, a deployment that accepts any type takes the caller's ``prefer`` types first (tidal
lending's ``inference_first``, then types no queued training job accepts; the cards training could
use stay lendable), then the type with the most free cards; one that lists its types takes them in
its order. The type never changes which site is picked.
Rule 4 (scale in, with hysteresis and cool-down): a replica that gets no demand even when every
origin's need is ``1 + scale_in_margin`` times higher is idle; one idle for ``scale_in_after_s``
without a break, not protected, and older than ``scale_in_after_s`` is removed, hub first, then
regional, then edge, farthest from demand first, at most ``max_removes`` per decision. Nothing is removed in a
decision that adds. Loading replicas count as capacity (no double scale-out while they load).
Rule 5: "cannot meet the demand" is data (``short`` with reasons), never an exception.

Public API::

    meter = DemandMeter()
    meter.observe(now, counts={(origin, budget_ms): requests}, service_s=mean service time)
    plan = decide(now, spec, meter.demand(), replicas, candidates, rtt, memory, prefer=("H20",))
    plan.add / plan.remove / plan.short / plan.memory (pass it to the next decision)
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import NamedTuple, Protocol

import msgspec

from controlplane.core.replicas import Candidate

TIER_ORDER = ("edge", "regional", "hub")
"""Where replicas go first (Rule 3) and are kept longest (Rule 4)."""
_EPS = 1e-9


class RttLookup(Protocol):
    def nearest(self, origin: str, budget_ms: float) -> Sequence[tuple[str, float]]: ...


class ScaleSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One deployment's scaling knobs (from its spec; defaults documented in docs/inference.md)."""

    model: str
    cards_per_replica: float = 1.0
    slots_per_replica: int = 4
    accelerators: list[str] | None = None
    min_replicas: int = 0
    max_replicas: int | None = None
    """None: no upper bound beyond free cards."""
    headroom_z: float = 3.0
    scale_in_margin: float = 0.3
    scale_in_after_s: float = 600.0
    max_adds: int = 16
    max_removes: int = 2
    max_per_site: int = 1
    """Replicas of the deployment one site may hold (today's wire: one per model per site; a site
    holding several serves them as one larger replica: ``count`` × slots and cards)."""
    tiers: tuple[str, ...] = TIER_ORDER

    @property
    def fixed(self) -> bool:
        return self.max_replicas is not None and self.max_replicas <= self.min_replicas


class Demand(msgspec.Struct, frozen=True):
    origin: str
    budget_ms: float
    rate_per_s: float
    service_s: float

    @property
    def load(self) -> float:
        """Offered load in busy slots (Erlangs)."""
        return self.rate_per_s * self.service_s


class Replica(msgspec.Struct, frozen=True, kw_only=True):
    site: str
    tier: str = "edge"
    state: str = "ready"
    """``loading`` or ``ready`` (both count as capacity)."""
    slots: int = 4
    """Slots of all ``count`` replicas at the site (loading ones included)."""
    count: int = 1
    accelerator: str = ""
    added_at: float = 0.0
    """When the last of them was added."""
    protected: bool = False
    """Needed for coverage (two cities per origin) or the replica floor: its first replica is
    never scaled in."""


class Memory(msgspec.Struct, frozen=True):
    """What one decision hands to the next (hysteresis state)."""

    idle_since: dict[str, float] = {}


class Add(NamedTuple):
    site: str
    accelerator: str
    cards: float
    reason: str


class Remove(NamedTuple):
    site: str
    reason: str


class ScalePlan(msgspec.Struct, kw_only=True):
    add: list[Add] = []
    remove: list[Remove] = []
    short: list[str] = []
    """Demand no replica can serve within budget, and why."""
    notes: list[str] = []
    memory: Memory = Memory()


class ReachMemo:
    """Hosting sites within each (origin, budget) in (tier, RTT) order, and where each site appears
    in those lists; a pure function of the RTTs and tiers, memoised by the caller (one per
    deployment spec). Drop it when RTTs or tiers change."""

    def __init__(self) -> None:
        self.lists: dict[tuple[str, float], list[tuple[str, float]]] = {}
        self.where: dict[str, list[tuple[tuple[str, float], int]]] = {}

    def __repr__(self) -> str:
        return f"<ReachMemo keys={len(self.lists)} sites={len(self.where)}>"

    def add(self, key: tuple[str, float], lst: list[tuple[str, float]]) -> None:
        self.lists[key] = lst
        for pos, (site, _) in enumerate(lst):
            self.where.setdefault(site, []).append((key, pos))

    def replicas_in_reach(self, cap: Mapping[str, float]) -> dict[tuple[str, float], list[str]]:
        """For each key, the sites of ``cap`` within it, in list order (cost: the replicas' keys,
        not every list)."""
        acc: dict[tuple[str, float], list[tuple[int, str]]] = {}
        for site in cap:
            for key, pos in self.where.get(site, ()):
                acc.setdefault(key, []).append((pos, site))
        return {k: [site for _, site in sorted(v)] for k, v in acc.items()}


def slots_needed(load: float, z: float) -> float:
    """Slots that serve an offered load ``load`` (Erlangs) with Poisson headroom (Rule 2)."""
    return load + z * math.sqrt(load) if load > 0 else 0.0


# --------------------------------------------------------------------------- demand


class DemandMeter:
    """Per (origin, budget) request rates from counts over intervals, smoothed two ways.

    The rate used is the larger of a fast (``fast_s`` time constant) and a slow (``slow_s``)
    exponentially weighted mean: it follows a rise within a minute and falls slowly, which is the
    first half of the hysteresis. Deterministic; ``now`` is passed in.
    """

    def __init__(self, *, fast_s: float = 60.0, slow_s: float = 900.0) -> None:
        self.fast_s = fast_s
        self.slow_s = slow_s
        self.fast: dict[tuple[str, float], float] = {}
        self.slow: dict[tuple[str, float], float] = {}
        self.service_s = 0.0
        self.last: float | None = None

    def __repr__(self) -> str:
        return f"<DemandMeter keys={len(self.fast)} service_s={self.service_s:.3f}>"

    def observe(self, now: float, counts: Mapping[tuple[str, float], int], service_s: float | None = None) -> None:
        """Fold in ``counts`` requests per (origin, budget) seen since the previous call."""
        if self.last is None:
            self.last = now
            for k, n in counts.items():
                self.fast[k] = self.slow[k] = 0.0
            if service_s:
                self.service_s = service_s
            return
        dt = now - self.last
        if dt <= 0:
            return
        self.last = now
        af = 1.0 - math.exp(-dt / self.fast_s)
        asl = 1.0 - math.exp(-dt / self.slow_s)
        for k in set(self.fast) | set(counts):
            rate = counts.get(k, 0) / dt
            self.fast[k] = self.fast.get(k, 0.0) + af * (rate - self.fast.get(k, 0.0))
            self.slow[k] = self.slow.get(k, 0.0) + asl * (rate - self.slow.get(k, 0.0))
        if service_s:
            self.service_s = service_s if self.service_s <= 0 else self.service_s + af * (service_s - self.service_s)

    def demand(self) -> list[Demand]:
        out = []
        for k in sorted(self.fast):
            rate = max(self.fast[k], self.slow.get(k, 0.0))
            if rate > 0:
                out.append(Demand(k[0], k[1], rate, self.service_s))
        return out


# --------------------------------------------------------------------------- deciding


def _accepted(spec: ScaleSpec, cand: Candidate) -> list[str]:
    if spec.accelerators is None:
        return sorted(cand.free_cards)
    return [a for a in spec.accelerators if a in cand.free_cards]


def _choose(spec: ScaleSpec, fits: Sequence[str], free: Mapping[str, float], rank_of: Mapping[str, int]) -> str:
    """The type a new replica takes at a site among ``fits`` (Rule 3): the deployment's order when it
    lists its types; otherwise the best-ranked of ``prefer`` (types not listed rank last), then the
    most free cards, then the name."""
    if spec.accelerators is not None:
        return fits[0]
    last = len(rank_of)
    best = min(rank_of.get(a, last) for a in fits)
    return max((a for a in fits if rank_of.get(a, last) == best), key=lambda a: (free.get(a, 0.0), a))


def _tier_rank(spec: ScaleSpec, tier: str) -> int:
    return spec.tiers.index(tier) if tier in spec.tiers else len(spec.tiers)


def _pour(spec: ScaleSpec, demands: Sequence[Demand], memo: ReachMemo,
          cap: dict[str, float], factor: float) -> tuple[dict[tuple[str, float], float], dict[str, float]]:
    """Pour each demand's needed slots (× ``factor``) into replicas within its budget; return the
    deficits per demand and the slots used per replica site. ``cap`` is left unchanged."""
    left = dict(cap)
    used: dict[str, float] = {}
    deficit: dict[tuple[str, float], float] = {}
    within = memo.replicas_in_reach(cap)
    for d in demands:
        need = slots_needed(d.load * factor, spec.headroom_z)
        for site in within.get((d.origin, d.budget_ms), ()):
            room = left[site]
            if room <= _EPS:
                continue
            take = min(room, need)
            left[site] = room - take
            used[site] = used.get(site, 0.0) + take
            need -= take
            if need <= _EPS:
                break
        if need > _EPS:
            deficit[(d.origin, d.budget_ms)] = need
    return deficit, used


def lending_preference(inference_first: Sequence[str], types: Iterable[str],
                       wanted: Collection[str]) -> tuple[str, ...]:
    """:func:`decide`'s ``prefer`` while idle cards are lent to training: the types inference keeps
    first (``[lending] inference_first``), then the types no waiting training gang accepts
    (``wanted``: the types the waiting gangs accept), in name order, so that new replicas leave the
    cards training could borrow free. The hub and ``cpn sim`` both call it."""
    first = tuple(inference_first)
    return first + tuple(a for a in sorted(set(types)) if a not in wanted and a not in first)


def decide(now: float, spec: ScaleSpec, demand: Sequence[Demand], replicas: Sequence[Replica],
           candidates: Sequence[Candidate], rtt: RttLookup, memory: Memory = Memory(),
           reach_cache: ReachMemo | None = None, prefer: Sequence[str] = ()) -> ScalePlan:
    """One scaling decision for one deployment (module docstring, Rules 1-5).

    Args:
        now: epoch seconds.
        spec: the deployment's knobs.
        demand: offered load per (origin, budget) (``DemandMeter.demand()``).
        replicas: the deployment's live replicas (loading or ready).
        candidates: every site with its free cards by accelerator (any tier; ``spec.tiers`` decides
            which may host).
        rtt: ``nearest(origin, budget_ms) -> [(site, rtt_ms)]`` ascending.
        memory: the previous plan's ``memory``.
        reach_cache: optional :class:`ReachMemo` owned by the caller (one per spec); a fresh one
            is used when None.
        prefer: accelerator types a new replica takes first within a site, best first, when the
            deployment accepts any type (tidal lending's ``inference_first``, then types no queued
            training job accepts): the cards training could use stay free for lending. It never
            changes which sites are picked.
    """
    if spec.fixed:
        return ScalePlan(notes=[f"fixed at {spec.max_replicas} replicas: no scaling"], memory=memory)
    cands = {c.id: c for c in candidates}
    have = {r.site: r for r in replicas}
    tier_of = {c.id: c.tier for c in candidates} | {r.site: r.tier for r in replicas}
    cap = {r.site: float(r.slots) for r in replicas}
    # Most constrained first: tighter budgets, then larger loads (stable by origin id).
    order = sorted(demand, key=lambda d: (d.budget_ms, -d.load, d.origin))
    memo = ReachMemo() if reach_cache is None else reach_cache
    reach = memo.lists
    rank: dict[str, int] | None = None
    for d in order:
        key = (d.origin, d.budget_ms)
        if key in reach:
            continue
        if rank is None:
            rank = {site: _tier_rank(spec, tier) for site, tier in tier_of.items()}
        try:
            lst = list(rtt.nearest(d.origin, d.budget_ms))
        except KeyError:
            lst = []
        n = len(spec.tiers)
        # Stable buckets by tier keep the RTT order within each tier.
        memo.add(key, [x for k in range(n) for x in lst if rank.get(x[0], n) == k])

    deficit, _ = _pour(spec, order, memo, cap, 1.0)
    adds: list[Add] = []
    short: list[str] = []
    total = sum(r.count for r in replicas)
    count = {r.site: r.count for r in replicas}
    acc_of = {r.site: r.accelerator for r in replicas}
    free = {c.id: dict(c.free_cards) for c in candidates}
    rank_of = {a: i for i, a in reversed(list(enumerate(prefer)))}
    fresh: dict[str, float] = {}  # slots of this decision's adds not yet spoken for
    for d in order:
        key = (d.origin, d.budget_ms)
        need = deficit.get(key, 0.0)
        if need <= _EPS:
            continue
        if fresh:
            for site, _ in reach[key]:
                room = fresh.get(site, 0.0)
                if room > _EPS:
                    take = min(room, need)
                    fresh[site] = room - take
                    need -= take
                    if need <= _EPS:
                        break
        while need > _EPS:
            if spec.max_replicas is not None and total >= spec.max_replicas:
                short.append(f"origin {d.origin} ({d.budget_ms:g} ms): {need:.1f} slots short; "
                             f"max_replicas {spec.max_replicas} reached")
                break
            if len(adds) >= spec.max_adds:
                short.append(f"origin {d.origin} ({d.budget_ms:g} ms): {need:.1f} slots short; "
                             f"at most {spec.max_adds} adds per decision")
                break
            pick: tuple[str, str, float] | None = None
            edge_full = False
            for site, rtt_ms in reach[key]:
                cand = cands.get(site)
                if cand is None or not cand.healthy or cand.draining:
                    continue
                if site in cap and count.get(site, 0) >= spec.max_per_site:
                    edge_full = edge_full or cand.tier == spec.tiers[0]
                    continue
                accs = [acc_of[site]] if acc_of.get(site) else _accepted(spec, cand)
                fits = [a for a in accs if free[site].get(a, 0.0) + _EPS >= spec.cards_per_replica]
                if not fits:
                    edge_full = edge_full or cand.tier == spec.tiers[0]
                    continue
                acc = _choose(spec, fits, free[site], rank_of)
                pick = (site, acc, rtt_ms)
                break
            if pick is None:
                short.append(f"origin {d.origin} ({d.budget_ms:g} ms): {need:.1f} slots short; no site within "
                             f"budget has {spec.cards_per_replica:g} free cards of an accepted type")
                break
            site, acc, rtt_ms = pick
            tier = cands[site].tier
            why = (f"origin {d.origin} ({d.budget_ms:g} ms): load {d.load:.1f} busy slots needs "
                   f"{slots_needed(d.load, spec.headroom_z):.1f} with headroom, {need:.1f} more than replicas "
                   f"within budget have left; +{site} ({tier}, {rtt_ms:.1f} ms)")
            if tier != spec.tiers[0]:
                why += f"; spill: {spec.tiers[0]} sites within budget " + ("are full" if edge_full else "none")
            if site in cap:
                why += f"; replica {count[site] + 1} of at most {spec.max_per_site} there"
            adds.append(Add(site, acc, spec.cards_per_replica, why))
            free[site][acc] -= spec.cards_per_replica
            cap[site] = cap.get(site, 0.0) + spec.slots_per_replica
            count[site] = count.get(site, 0) + 1
            acc_of[site] = acc
            total += 1
            fresh[site] = fresh.get(site, 0.0) + max(0.0, spec.slots_per_replica - need)
            need -= spec.slots_per_replica

    # Scale in (Rule 4): only when nothing was added, with the margin and the idle clock.
    idle_since = dict(memory.idle_since)
    removes: list[Remove] = []
    if not adds:
        _, used = _pour(spec, order, memo, cap, 1.0 + spec.scale_in_margin)
        floor = max(spec.min_replicas, sum(1 for r in replicas if r.protected))
        victims: list[tuple[int, float, str]] = []
        per = max(1, spec.slots_per_replica)
        near: dict[str, float] | None = None  # each idle site's RTT to the nearest origin with demand
        keys: set[tuple[str, float]] = set()
        for r in replicas:
            needed = math.ceil(used.get(r.site, 0.0) / per - _EPS)
            if r.count - max(needed, 1 if r.protected else 0) <= 0:
                idle_since.pop(r.site, None)
                continue
            since = idle_since.setdefault(r.site, now)
            if now - since >= spec.scale_in_after_s and now - r.added_at >= spec.scale_in_after_s:
                if near is None:
                    near = {}
                    keys = {(d.origin, d.budget_ms) for d in order}
                near[r.site] = min((reach[k][pos][1] for k, pos in memo.where.get(r.site, ()) if k in keys),
                                   default=math.inf)
                victims.append((-_tier_rank(spec, r.tier), -near[r.site], r.site))
        victims.sort()
        room = total - floor
        for _, _, site in victims[: max(0, min(room, spec.max_removes))]:
            idle = now - idle_since.pop(site)
            removes.append(Remove(site, f"a replica idle {idle / 60:.0f} min even with {spec.scale_in_margin:.0%} "
                                        "more demand"))
    for s in [s for s in idle_since if s not in have]:
        del idle_since[s]
    return ScalePlan(add=adds, remove=removes, short=short, memory=Memory(idle_since=idle_since))
