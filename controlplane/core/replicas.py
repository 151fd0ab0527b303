"""Replica placement for inference deployments ("two sites, three centres"). Pure.

What it holds: the deployment spec a tenant posts (:class:`DeploymentSpec`), what the hub knows of a
site when placing (:class:`Candidate`), the decision (:class:`ReplicaPlan`) and the state rule
(:func:`deployment_state`).  No I/O, no clock, no randomness: the hub calls
``plan_replicas(...)``, then persists and sends ``LoadModel``/``UnloadModel`` for what the plan says.

Public API::

    spec = decode_spec(body_bytes)                        # 422-style RequestError naming the field
    plan = plan_replicas(spec, candidates, rtt, existing, origins_for_regions)
    plan.add      -> [Placement(site, accelerator, cards)]   load these
    plan.keep     -> [site]                                  leave these alone
    plan.remove   -> [site]                                  unload / mark removed
    plan.coverage -> {origin: [city, ...]}                   cities within budget holding a replica
    plan.uncovered-> [Uncovered(origin, reason)]             origins short of min_cities, and why
    plan.targets  -> {origin: cities wanted}                 min(min_cities, what the layout allows)
    candidates = apply_debits(candidates, plan)             before planning the next deployment
    state, details = deployment_state(spec, ready_by_site, plan.targets, rtt, previous=..., in_progress=...)

``rtt`` is anything with ``nearest(origin, budget_ms, accept=None) -> [(site, rtt_ms), ...]`` in
ascending RTT (``topology.latency.RttIndex``); an unknown origin may raise ``KeyError``.

Rule 1: only ``edge`` and ``regional`` sites host replicas; a site hosts at most one replica of a
deployment; a replica needs ``cards_per_replica`` (fractions allowed) of one accepted accelerator
free at the site, and a plan never adds more than a site has free.
Rule 2: every served origin wants replicas in ``min_cities`` distinct cities within ``budget_ms``;
where the layout has fewer eligible cities in reach, the target is what the layout allows
(``targets``) and the origin is still reported in ``uncovered`` with the layout's reason.
Rule 3: healthy existing replicas are kept; a replica on a lost or unhealthy site is removed and its
demand re-opens, so a replacement is added elsewhere; a replica on a draining site stops counting
at once (a replacement is added) but is only removed once *ready* replicas cover its origins.
Rule 4: the choice is a greedy weighted set cover: the site covering the most unmet
(origin, city) demand first, then lower mean RTT to those origins, then more free cards, then
site id (so the plan is deterministic).  Gains only fall as demand is met, so the greedy runs
lazily over a heap and does not rescan every site per step.
Rule 5: ``replicas`` is a floor on the replica count: after coverage, extra replicas go to the
sites within budget of the most served origins.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Annotated, Literal, NamedTuple, Protocol

import msgspec

from controlplane.core.errors import Unprocessable
from edge_agent import wire

HOSTING_TIERS = frozenset({"edge", "regional"})
LIVE_STATES = frozenset({"placed", "loading", "ready"})
"""Replica states that hold cards and (once ready) serve."""
_EPS = 1e-9
"""Slack for float card arithmetic (0.1 + 0.2 cards must fit in 0.3 free)."""

MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$"
"""Model names are not subject tokens, so they may hold dots, slashes and capitals (``Qwen/Qwen2.5-7B``)."""

SiteId = Annotated[str, msgspec.Meta(pattern=wire.ID_PATTERN)]
DeploymentState = Literal["pending", "ready", "degraded"]


class RttLookup(Protocol):
    def nearest(
        self, origin: str, budget_ms: float, accept: Callable[[str], bool] | None = None
    ) -> Sequence[tuple[str, float]]: ...


class DeploymentSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a tenant asks for in ``POST /v1/deployments`` (decoded straight from the body)."""

    model: Annotated[str, msgspec.Meta(pattern=MODEL_PATTERN)]
    origins: list[SiteId] = []
    """Demand origins (city ids) to serve."""
    regions: list[SiteId] = []
    """Regions (province ids) whose origins are all served; combined with ``origins``."""
    budget_ms: Annotated[float, msgspec.Meta(gt=0, le=1000)] = 10.0
    cards_per_replica: Annotated[float, msgspec.Meta(gt=0, le=1024)] = 1.0
    min_cities: Annotated[int, msgspec.Meta(ge=1, le=16)] = 2
    replicas: Annotated[int, msgspec.Meta(ge=1, le=10000)] | None = None
    """A floor on the replica count (coverage may need more); fixed: no autoscaling (min = max)."""
    min_replicas: Annotated[int, msgspec.Meta(ge=0, le=10000)] | None = None
    """With ``max_replicas``: the autoscaler's floor (coverage may need more)."""
    max_replicas: Annotated[int, msgspec.Meta(ge=1, le=10000)] | None = None
    """The autoscaler's ceiling; giving it (or ``min_replicas``) makes the deployment scale with demand."""
    slots_per_replica: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 4
    accelerators: list[Annotated[str, msgspec.Meta(min_length=1, max_length=64)]] | None = None
    """Accepted accelerator types, in order of preference; None accepts any."""

    def __post_init__(self) -> None:
        # msgspec turns a ValueError here into a ValidationError; the "field: " prefix names it.
        if not self.origins and not self.regions:
            raise ValueError("origins: give at least one origin or region to serve")
        if self.accelerators is not None and not self.accelerators:
            raise ValueError("accelerators: give at least one accelerator type, or leave it out for any")
        if self.replicas is not None and (self.min_replicas is not None or self.max_replicas is not None):
            name = "min_replicas" if self.min_replicas is not None else "max_replicas"
            raise ValueError(f"{name}: give either a fixed 'replicas' or min_replicas/max_replicas, not both")
        if self.min_replicas is not None and self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"max_replicas: {self.max_replicas} is less than min_replicas {self.min_replicas}")

    @property
    def floor(self) -> int | None:
        """The replica floor: fixed ``replicas``, else ``min_replicas``."""
        return self.replicas if self.replicas is not None else self.min_replicas

    @property
    def scales(self) -> bool:
        """Whether the autoscaler sizes this deployment (``min_replicas``/``max_replicas`` given and
        not equal; a fixed ``replicas`` never scales)."""
        if self.min_replicas is None and self.max_replicas is None:
            return False
        return self.max_replicas is None or self.max_replicas > (self.min_replicas or 0)


_spec_decoder = msgspec.json.Decoder(DeploymentSpec)


def decode_spec(body: bytes) -> DeploymentSpec:
    """Decode a ``POST /v1/deployments`` body (the rule of :mod:`controlplane.core.bodies`).

    Raises:
        RequestError: 400 malformed JSON or a bad value, 422 an unknown field; ``field`` names the
            offending path (e.g. ``origins[1]``).
    """
    from controlplane.core import bodies

    return bodies.decode(body, _spec_decoder)


class Candidate(msgspec.Struct, kw_only=True):
    """What the hub knows of a site when placing replicas."""

    id: str
    city: str
    region: str = ""
    tier: str = "edge"
    healthy: bool = True
    draining: bool = False
    free_cards: dict[str, float] = {}
    """Cards not yet allocated, by accelerator type; list every type the site has (0.0 when all are
    taken) so a full site is told apart from one without the accelerator."""


class Placement(NamedTuple):
    site: str
    accelerator: str
    cards: float


class Uncovered(NamedTuple):
    origin: str
    reason: str


class ReplicaPlan(msgspec.Struct, kw_only=True):
    """The decision for one deployment; see the module docstring for each field."""

    add: list[Placement] = []
    keep: list[str] = []
    remove: list[str] = []
    coverage: dict[str, list[str]] = {}
    uncovered: list[Uncovered] = []
    targets: dict[str, int] = {}
    notes: list[str] = []


# --------------------------------------------------------------------------- planning


def served_origins(
    spec: DeploymentSpec, origins_for_regions: Mapping[str, Sequence[str]] | None
) -> tuple[list[str], list[Uncovered]]:
    """The origins a spec serves (``origins`` then each region's, de-duplicated, in order), and an
    ``Uncovered("region:<id>", reason)`` for each region the layout does not know."""
    out: list[str] = []
    seen: set[str] = set()
    bad: list[Uncovered] = []
    for origin in spec.origins:
        if origin not in seen:
            seen.add(origin)
            out.append(origin)
    for region in spec.regions:
        members = (origins_for_regions or {}).get(region)
        if not members:
            bad.append(Uncovered(f"region:{region}", f"region {region}: no demand origins in the layout"))
            continue
        for origin in members:
            if origin not in seen:
                seen.add(origin)
                out.append(origin)
    return out, bad


def _accepted(spec: DeploymentSpec, cand: Candidate) -> list[str]:
    if spec.accelerators is None:
        return sorted(cand.free_cards)
    return [a for a in spec.accelerators if a in cand.free_cards]


def _pick_accelerator(spec: DeploymentSpec, cand: Candidate, prefer: Sequence[str] = ()) -> str | None:
    """The accelerator a new replica would use at ``cand``: the first preferred type that fits, or
    (no preference given) the best-ranked of ``prefer`` that fits (types not listed last), then the
    type with the most free cards."""
    fits = [a for a in _accepted(spec, cand) if cand.free_cards[a] + _EPS >= spec.cards_per_replica]
    if not fits:
        return None
    if spec.accelerators is not None:
        return fits[0]
    if prefer:
        rank = {a: i for i, a in reversed(list(enumerate(prefer)))}
        best = min(rank.get(a, len(rank)) for a in fits)
        fits = [a for a in fits if rank.get(a, len(rank)) == best]
    return max(fits, key=lambda a: (cand.free_cards[a], a))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word[:-1]}ies" if word.endswith("y") else f"{n} {word}s"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def plan_replicas(
    spec: DeploymentSpec,
    candidates: Iterable[Candidate],
    rtt: RttLookup,
    existing: Mapping[str, str] | None = None,
    origins_for_regions: Mapping[str, Sequence[str]] | None = None,
    *,
    origin_weights: Mapping[str, float] | None = None,
    max_new: int | None = None,
    quota_note: str = "",
    prefer: Sequence[str] = (),
) -> ReplicaPlan:
    """Decide where the replicas of one deployment go.

    Args:
        spec: the deployment.
        candidates: every site the hub knows (any tier, healthy or not; non-hosting tiers are
            ignored, unhealthy ones still count for what the layout allows).
        rtt: RTT lookup (see module docstring).
        existing: this deployment's current replicas, site -> state (``placed``, ``loading``,
            ``ready``, ``lost``, ``removed``).
        origins_for_regions: region id -> its origin ids (needed when ``spec.regions`` is used).
        origin_weights: demand weight per origin (default 1); weights scale the set-cover gain.
        max_new: at most this many new replicas (the tenant's card quota); None: no cap. When the
            cap stops the plan, ``quota_note`` (why) goes into ``plan.notes``.
        prefer: accelerator types a new replica takes first at its site, best first, when the
            deployment accepts any type (the hub's ``[lending] inference_first``): the lendable
            cards stay free. Sites are chosen as without it (ties on the free cards of the type
            the site would give without ``prefer``).

    Returns:
        The plan. "Cannot cover" is data in ``plan.uncovered``, never an exception.
    """
    existing = existing or {}
    weights = origin_weights or {}
    cands = {c.id: c for c in candidates}
    origins, uncovered = served_origins(spec, origins_for_regions)
    budget = spec.budget_ms
    notes: list[str] = []

    # reach[o]: hosting sites with an accepted accelerator type within budget (health aside).
    hosts = {c.id for c in cands.values() if c.tier in HOSTING_TIERS and _accepted(spec, c)}
    reach: dict[str, list[tuple[str, float]]] = {}
    unknown: set[str] = set()
    for origin in origins:
        try:
            reach[origin] = [(s, r) for s, r in rtt.nearest(origin, budget) if s in hosts]
        except KeyError:
            unknown.add(origin)
    targets = {
        o: min(spec.min_cities, len({cands[s].city for s, _ in reach[o]})) for o in origins if o in reach
    }

    # Existing replicas: keep the healthy, drop the lost, hold the draining until replaced.
    keep: list[str] = []
    remove: list[str] = []
    draining: list[str] = []
    blocked: set[str] = set()
    for site, state in sorted(existing.items()):
        if state == "removed":
            continue
        blocked.add(site)  # never a second replica on a site, not even a replacement in one plan
        cand = cands.get(site)
        if state not in LIVE_STATES or cand is None or not cand.healthy:
            remove.append(site)
            why = "lost" if state == "lost" else "site unknown" if cand is None else "site unhealthy"
            if state in LIVE_STATES or state == "lost":
                notes.append(f"replica at {site} {why}: removed, replacement planned where possible")
        elif cand.draining:
            draining.append(site)
        else:
            keep.append(site)

    live = set(keep)
    have: dict[str, set[str]] = {o: set() for o in reach}
    sites_of: dict[str, list[tuple[str, float]]] = {}
    for origin, lst in reach.items():
        for site, r in lst:
            sites_of.setdefault(site, []).append((origin, r))
            if site in live:
                have[origin].add(cands[site].city)

    # Pool of sites that could take a new replica.
    pool: dict[str, str] = {}
    typed: dict[str, str] = {}  # the type a replica there takes (``prefer`` first)
    for site in sites_of:
        cand = cands[site]
        if site in blocked or not cand.healthy or cand.draining:
            continue
        acc = _pick_accelerator(spec, cand)
        if acc is not None:
            pool[site] = acc
            typed[site] = (_pick_accelerator(spec, cand, prefer) or acc) if prefer else acc

    def weight(origin: str) -> float:
        w = weights.get(origin, 1.0)
        return w if w > 0 else 1.0  # lazy greedy needs positive gains (see Rule 4)

    w_of = {o: weight(o) for o in reach}
    unmet = {o for o in reach if len(have[o]) < targets[o]}

    def key(site: str) -> tuple[float, float, float, str] | None:
        city = cands[site].city
        gain = 0.0
        rtt_sum = 0.0
        for origin, r in sites_of[site]:
            if origin in unmet and city not in have[origin]:
                w = w_of[origin]
                gain += w
                rtt_sum += w * r
        if gain <= 0:
            return None
        return (-gain, rtt_sum / gain, -cands[site].free_cards[pool[site]], site)

    add: list[Placement] = []
    capped = False

    def room() -> bool:
        nonlocal capped
        if max_new is not None and len(add) >= max_new:
            capped = True
            return False
        return True

    def place(site: str) -> None:
        pool.pop(site)
        add.append(Placement(site, typed[site], spec.cards_per_replica))
        live.add(site)
        for origin, _ in sites_of[site]:
            have[origin].add(cands[site].city)
            if len(have[origin]) >= targets[origin]:
                unmet.discard(origin)

    heap = [k for k in (key(s) for s in pool) if k is not None]
    heapq.heapify(heap)
    while heap:
        top = heapq.heappop(heap)
        fresh = key(top[3])
        if fresh is None:
            continue
        if fresh != top and heap and fresh > heap[0]:
            heapq.heappush(heap, fresh)  # stale: its gain fell, let the next best compete
            continue
        if not room():
            break
        place(top[3])

    # Rule 5: the replica floor.
    floor = spec.floor
    if floor is not None and len(live) < floor:
        def floor_key(site: str) -> tuple[float, float, float, str]:
            lst = sites_of[site]
            w = sum(w_of[o] for o, _ in lst)
            return (-w, sum(w_of[o] * r for o, r in lst) / w, -cands[site].free_cards[pool[site]], site)

        for site in sorted(pool, key=floor_key)[: floor - len(live)]:
            if not room():
                break
            place(site)
        if len(live) < floor:
            notes.append(
                f"replica floor {floor} not reached: {len(live)} placed; no further eligible "
                f"site with {spec.cards_per_replica:g} free cards within {budget:g} ms of a served origin"
            )

    if capped:
        notes.append(quota_note or f"card quota: no more than {max_new} new replicas")

    # Rule 3: a draining replica goes once ready replicas elsewhere cover what it served.
    ready_live = {s for s in keep if existing.get(s) == "ready"}
    for site in draining:
        covered = True
        for origin, _ in sites_of.get(site, []):
            ready_cities = {cands[s].city for s, _ in reach[origin] if s in ready_live}
            if len(ready_cities) < targets[origin]:
                covered = False
                break
        if covered:
            remove.append(site)
            notes.append(f"replica at {site} removed: site draining, its origins are covered by ready replicas")
        else:
            keep.append(site)
            notes.append(f"replica at {site} kept while its site drains, until replacements are ready")

    coverage: dict[str, list[str]] = {}
    for origin in origins:
        cities: list[str] = []
        for site, _ in reach.get(origin, []):
            if site in live and cands[site].city not in cities:
                cities.append(cands[site].city)
        coverage[origin] = cities

    for origin in origins:
        if origin in unknown:
            uncovered.append(Uncovered(origin, f"origin {origin}: not in the layout"))
        elif capped and len(coverage[origin]) < targets[origin]:
            uncovered.append(Uncovered(origin, f"origin {origin}: {len(coverage[origin])} of {targets[origin]} cities; "
                                               f"{quota_note or 'card quota reached'}"))
        elif len(coverage[origin]) < spec.min_cities:
            uncovered.append(Uncovered(origin, _why_uncovered(spec, origin, reach[origin], coverage[origin], cands, rtt, blocked)))

    return ReplicaPlan(
        add=add, keep=keep, remove=remove, coverage=coverage, uncovered=uncovered, targets=targets, notes=notes
    )


def _why_uncovered(
    spec: DeploymentSpec,
    origin: str,
    reach: list[tuple[str, float]],
    covered: list[str],
    cands: Mapping[str, Candidate],
    rtt: RttLookup,
    blocked: set[str],
) -> str:
    budget = spec.budget_ms
    cities: dict[str, list[str]] = {}
    for site, _ in reach:
        cities.setdefault(cands[site].city, []).append(site)
    if len(cities) < spec.min_cities:
        # The layout itself is short: say what is in reach and what the next city would cost.
        accel = "" if spec.accelerators is None else f" with {'/'.join(spec.accelerators)}"
        if cities:
            listed = ", ".join(s for lst in cities.values() for s in lst)
            head = f"origin {origin}: {_plural(len(cities), 'city')} within {budget:g} ms ({listed})"
        else:
            head = f"origin {origin}: no edge or regional site{accel} within {budget:g} ms"
        try:
            ranked = rtt.nearest(origin, math.inf)
        except KeyError:
            ranked = []
        for site, r in ranked:
            cand = cands.get(site)
            if cand is None or cand.tier not in HOSTING_TIERS or not _accepted(spec, cand) or cand.city in cities:
                continue
            return f"{head}; {_ordinal(len(cities) + 1)} nearest city {cand.city} at {r:.1f} ms ({site})"
        return f"{head}; no other city has an edge or regional site{accel}"
    # The layout allows it: capacity or health stands in the way.
    why: dict[str, list[str]] = {}
    for city, sites in cities.items():
        if city in covered:
            continue
        states = []
        for site in sites:
            cand = cands[site]
            if not cand.healthy:
                states.append("unhealthy")
            elif cand.draining:
                states.append("draining")
            elif site in blocked:
                states.append("replica being replaced")
            else:
                states.append("no free capacity")
        # A city counts under its most hopeful site's condition.
        order = ["no free capacity", "replica being replaced", "draining", "unhealthy"]
        why.setdefault(min(states, key=order.index), []).append(city)
    parts = []
    for label, cs in why.items():
        if label == "no free capacity":
            label = f"no free capacity for {spec.cards_per_replica:g} cards"
        parts.append(f"{label} in {_plural(len(cs), 'city')} within budget ({', '.join(cs)})")
    return (
        f"origin {origin}: {len(covered)} of {spec.min_cities} cities covered within {budget:g} ms; "
        + "; ".join(parts)
    )


def apply_debits(candidates: Iterable[Candidate], plan: ReplicaPlan) -> list[Candidate]:
    """Copies of ``candidates`` with the plan's new replicas taken off ``free_cards``, for planning
    the next deployment in the same tick without over-committing a site."""
    debit: dict[tuple[str, str], float] = {}
    for p in plan.add:
        debit[(p.site, p.accelerator)] = debit.get((p.site, p.accelerator), 0.0) + p.cards
    out = []
    for cand in candidates:
        free = dict(cand.free_cards)
        for acc in free:
            free[acc] = max(0.0, free[acc] - debit.get((cand.id, acc), 0.0))
        out.append(msgspec.structs.replace(cand, free_cards=free))
    return out


# --------------------------------------------------------------------------- state


def deployment_state(
    spec: DeploymentSpec,
    ready_by_site: Mapping[str, str],
    targets: Mapping[str, int] | ReplicaPlan,
    rtt: RttLookup,
    *,
    previous: str | None = None,
    in_progress: bool = False,
) -> tuple[DeploymentState, list[str]]:
    """The deployment's state and a line per origin short of its target.

    Args:
        spec: the deployment.
        ready_by_site: site -> city of each replica that is ready *and* routable (not draining).
        targets: ``plan.targets`` (origin -> cities wanted) or the plan itself.
        rtt: RTT lookup.
        previous: the state last recorded (``None`` for a new deployment).
        in_progress: replicas are still being placed or loading.

    Returns:
        ``("ready", details)`` when every coverable origin has ready replicas in at least its
        target number of cities; ``("pending", ...)`` before the deployment was ever ready while
        nothing is ready or replicas are still loading; ``("degraded", ...)`` otherwise (it was
        ready and lost it, or the rollout ended short of what the layout allows).
    """
    if isinstance(targets, ReplicaPlan):
        targets = targets.targets
    details: list[str] = []
    coverable = {o: t for o, t in targets.items() if t > 0}
    any_ready = False
    for origin, target in coverable.items():
        cities: list[str] = []
        for site, _ in rtt.nearest(origin, spec.budget_ms):
            city = ready_by_site.get(site)
            if city is not None and city not in cities:
                cities.append(city)
        any_ready = any_ready or bool(cities)
        if len(cities) < target:
            where = f" ({', '.join(cities)})" if cities else ""
            details.append(f"origin {origin}: {len(cities)} of {target} cities ready{where}")
    if not coverable:
        return "degraded", ["no served origin has an eligible site within budget"]
    if not details:
        return "ready", [f"{len(coverable)} origins have ready replicas in their target number of cities"]
    never_ready = previous in (None, "pending")
    if never_ready and (not any_ready or in_progress):
        return "pending", details
    return "degraded", details
