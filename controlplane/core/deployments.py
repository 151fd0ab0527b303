"""Deployments, decided: ``reconcile(snapshot, now) -> Plan``. Pure (no I/O, no clock, no randomness).

What it holds: the snapshot a reconcile reads (:class:`Snapshot`: active deployments, their replica
rows, the layout's sites, the registry's site views, tenants' quotas, what the previous pass
remembered), the plan it returns (:class:`Plan`: loads, unloads, replica state changes, deployment
state changes, each with a reason) and every deployment rule as a small named function. The hub's
deployments service builds the snapshot, persists the plan with its commands in one transaction
through the command outbox, then the outbox sends; ``cpn sim`` calls the same :func:`reconcile`.

Rule 1 (free cards, :func:`planning_candidates`): a site's free cards for planning are the free
cards of its last heartbeat minus the cards of replicas the record holds there (placed, loading,
ready) that this heartbeat does not show yet. A replica the heartbeat shows is already inside its
free cards, so it is never counted twice.
Rule 2 (one model per site, :func:`sites_of_other_deployments`): the agent keys replicas by model,
so a deployment never goes to a site holding (or reporting) its model for another deployment,
including a site that offers the model itself.
Rule 3 (readiness from heartbeats, :func:`replica_event`): a replica moves to what its site's
heartbeat reports (``replica_lifecycle``); ``failed`` removes it and keeps the deployment off that
site for ``refused_cooldown_s``; missing for ``missing_heartbeats`` heartbeats after the agent
accepted it puts it back to ``placed`` so ``LoadModel`` is sent again.
Rule 4 (site loss): replicas of a lost site are ``lost`` (the service marks them at once); the
plan removes them and places replacements where the layout allows.
Rule 5 (start-up grace, :func:`in_startup_grace`): until ``grace_until`` deployments not created
since the start are left alone (sites are still re-registering and look unhealthy).
Rule 6 (card quota, :func:`quota_cap`): a tenant's ``quota_cards`` bounds its replicas plus its
training jobs (``quota.cards_left``); a plan adds only the replicas that fit, and says why.
Rule 7 (orphans, :func:`orphan_unloads`): a replica a site reports for a deployment of ours that no
longer holds it there is unloaded; replicas of unknown deployments (loaded by hand) and the sites'
own (``local``) are left alone.
Rule 8 (sending, :func:`may_send`): a command for a (deployment, site) is not issued again while
one is pending in the outbox, nor within ``retry_s`` of the last; a load only to an up site.
Rule 9 (refusals, :func:`after_refusal`): a ``LoadModel`` refused for a reason retrying will not
cure (``REFUSAL_CODES``) removes the placed replica and cools the site for the deployment.
Rule 10 (scaling, :func:`autoscaler_asks`): what ``autoscale.decide`` asks for is carried out as it
asks (it already keeps to free cards, bounds, protected replicas and hysteresis): each add a
``LoadModel`` on its site and accelerator, each remove an ``UnloadModel``, with its reason. In a
reconcile (``Snapshot.scaling``) an add also respects Rules 2, 3 and 9 (a site holding the model for
another deployment, or cooling, gets none) and a site already holding the deployment gets no second.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import msgspec

from controlplane.core import autoscale, quota, replicas as core
from controlplane.core.declarations import LOCAL_DEPLOYMENTS
from controlplane.core.errors import RequestError
from controlplane.core.registry import SiteView
from controlplane.core.replica_lifecycle import (
    HOLDING, IllegalReplicaTransition, ReplicaEvent, ReplicaState, event_for_report, transition,
)
from edge_agent import wire
from topology import layout as topo_layout

E = ReplicaEvent
REFUSAL_CODES = frozenset({"no_capacity", "draining", "bad_message"})
"""LoadModel refusals that will not go away by retrying at once: re-plan elsewhere (Rule 9)."""
LOAD, UNLOAD = "load", "unload"


# --------------------------------------------------------------------------- snapshot and plan


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    retry_s: float = 2.0
    """Minimum time between two issues of the same command to the same site (Rule 8)."""
    refused_cooldown_s: float = 30.0
    """How long a deployment stays off a site that refused or failed a load (Rules 3, 9)."""
    missing_heartbeats: int = 3
    """Heartbeats without an accepted replica before it is loaded again (Rule 3)."""
    prefer_accelerators: tuple[str, ...] = ()
    """Types a new replica takes first at its site when its deployment accepts any type (placement
    and the autoscaler's adds; the hub's ``[lending] inference_first`` while lending is on), so the
    cards training could borrow stay free. Never changes which sites are chosen."""


class Deployment(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    tenant: str
    model: str
    spec: core.DeploymentSpec
    state: str = "pending"
    report: dict[str, object] = {}


class Replica(msgspec.Struct, frozen=True, kw_only=True):
    deployment: str
    site: str
    accelerator: str
    cards: float
    state: ReplicaState


class Memory(msgspec.Struct, frozen=True, kw_only=True):
    """What one pass hands to the next (soft state: lost on a hub restart, harmlessly)."""

    seen_hb: dict[tuple[str, str], int] = {}
    """(deployment, site) -> the site's heartbeat count when the replica was last known there."""
    cooldown: dict[tuple[str, str], float] = {}
    """(deployment, site) -> until when the deployment stays off the site."""
    issued: dict[tuple[str, str, str], float] = {}
    """(kind, deployment, site) -> when that command was last issued."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything :func:`reconcile` reads, as plain data."""

    deployments: Sequence[Deployment]
    """Active deployments, oldest first."""
    replicas: Mapping[str, Sequence[Replica]]
    """Deployment id -> its replica rows (removed ones may be left out)."""
    sites: Sequence[topo_layout.Site]
    views: Mapping[str, SiteView]
    rtt: core.RttLookup
    regions: Mapping[str, Sequence[str]] = field(default_factory=dict)
    weights: Mapping[str, float] = field(default_factory=dict)
    quota_cards: Mapping[str, int | None] = field(default_factory=dict)
    """Tenant -> its card quota (tenants without one may be left out)."""
    training_cards: Mapping[str, float] = field(default_factory=dict)
    """Tenant -> cards its placed or running training jobs hold."""
    ours: frozenset[str] = frozenset()
    """Ids of deleted deployments of ours that sites still report (Rule 7)."""
    pending: frozenset[tuple[str, str, str]] = frozenset()
    """(kind, deployment, site) of commands waiting in the outbox (Rule 8)."""
    memory: Memory = Memory()
    grace_until: float = 0.0
    fresh: frozenset[str] = frozenset()
    """Deployments created since the start (exempt from the grace of Rule 5)."""
    scaling: Mapping[str, autoscale.ScalePlan] = field(default_factory=dict)
    """Deployment id -> what the autoscaler asked for it this time (Rule 10)."""
    only: str | None = None
    """Plan this deployment alone (right after it was created); orphans are left for the next pass."""
    settings: Settings = Settings()


class Load(msgspec.Struct, frozen=True, kw_only=True):
    site: str
    command: wire.LoadModel
    reason: str


class Unload(msgspec.Struct, frozen=True, kw_only=True):
    site: str
    command: wire.UnloadModel
    reason: str


class ReplicaChange(msgspec.Struct, frozen=True, kw_only=True):
    deployment: str
    site: str
    old: ReplicaState | None
    """None: a new row."""
    new: ReplicaState
    event: ReplicaEvent
    reason: str
    accelerator: str = ""
    cards: float = 0.0


class DeploymentChange(msgspec.Struct, frozen=True, kw_only=True):
    deployment: str
    old: str
    new: str
    report: dict[str, object]
    reason: str


class Plan(msgspec.Struct, kw_only=True):
    loads: list[Load] = []
    unloads: list[Unload] = []
    replicas: list[ReplicaChange] = []
    deployments: list[DeploymentChange] = []
    planned: list[tuple[str, core.ReplicaPlan]] = []
    """Each planned deployment's placement plan (for logs and the simulator)."""
    illegal: list[str] = []
    """Transitions the table refused (counted by the caller, never applied)."""
    waiting: list[str] = []
    """Deployments left alone by the start-up grace (Rule 5)."""
    active_work: bool = False
    """Something is in progress (plan again soon even if nothing visible changes)."""
    memory: Memory = Memory()


# --------------------------------------------------------------------------- the rules


def check_spec(spec: core.DeploymentSpec, layout: topo_layout.Layout, views: Mapping[str, SiteView]) -> None:
    """A spec against the layout and the sites heard: every origin, region and accelerator type
    known, and ``cards_per_replica`` no more than some edge or regional site has of an accepted type.

    Raises:
        RequestError: (400) naming the field (``origins[1]``, ``regions[0]``, ``cards_per_replica``).
    """
    origin_ids = {o.id for o in layout.origins}
    for i, origin in enumerate(spec.origins):
        if origin not in origin_ids:
            raise RequestError(f"origins[{i}]: unknown origin {origin!r}: not a city of the layout",
                           field=f"origins[{i}]")
    regions = {o.region for o in layout.origins}
    for i, region in enumerate(spec.regions):
        if region not in regions:
            raise RequestError(f"regions[{i}]: unknown region {region!r}: no demand origin of the layout is in it",
                           field=f"regions[{i}]")
    types = set(layout.accelerators) | {a for s in layout.sites for a in s.accelerators}
    types |= {a for v in views.values() for a in v.accelerators}
    for i, acc in enumerate(spec.accelerators or []):
        if acc not in types:
            raise RequestError(f"accelerators[{i}]: unknown accelerator type {acc!r}", field=f"accelerators[{i}]")
    largest = 0.0
    for site in layout.sites:
        if site.tier in core.HOSTING_TIERS:
            for acc, n in site.accelerators.items():
                if spec.accelerators is None or acc in spec.accelerators:
                    largest = max(largest, float(n))
    for view in views.values():
        if view.tier in core.HOSTING_TIERS:
            for acc, n in view.accelerators.items():
                if spec.accelerators is None or acc in spec.accelerators:
                    largest = max(largest, float(n))
    if spec.cards_per_replica > largest + 1e-9:
        raise RequestError(
            f"cards_per_replica: {spec.cards_per_replica:g} cards is more than any edge or regional site has "
            f"of an accepted accelerator (largest: {largest:g})", field="cards_per_replica")


def shows(view: SiteView | None, model: str, deployment: str) -> wire.ReplicaStatus | None:
    """The site's last report of ``model`` if it belongs to ``deployment`` (else None)."""
    if view is None:
        return None
    status = view.replicas.get(model)
    return status if status is not None and status.deployment == deployment else None


@dataclass(frozen=True, slots=True)
class Holding:
    """A replica the record says holds cards at a site."""

    deployment: str
    model: str
    site: str
    accelerator: str
    cards: float


def planning_candidates(
    sites: Iterable[topo_layout.Site], views: Mapping[str, SiteView], holding: Iterable[Holding]
) -> list[core.Candidate]:
    """Rule 1: every site as a ``replicas.Candidate`` with its free cards for planning.

    Args:
        sites: the layout's sites (known before they speak; unregistered ones are unhealthy).
        views: the registry's site views (sites not in the layout are included too).
        holding: card-holding replicas in the record, of active deployments.
    """
    pending: dict[str, dict[str, float]] = {}
    for h in holding:
        if shows(views.get(h.site), h.model, h.deployment) is None:
            per = pending.setdefault(h.site, {})
            per[h.accelerator] = per.get(h.accelerator, 0.0) + h.cards
    out: list[core.Candidate] = []
    seen: set[str] = set()

    def free_of(site: str, totals: Mapping[str, float], reported: Mapping[str, float]) -> dict[str, float]:
        debit = pending.get(site, {})
        return {a: max(0.0, round(float(reported.get(a, 0.0)) - debit.get(a, 0.0), 9)) for a in totals}

    for s in sites:
        seen.add(s.id)
        view = views.get(s.id)
        if view is None:
            totals = {a: float(n) for a, n in s.accelerators.items()}
            out.append(core.Candidate(id=s.id, city=s.city, region=s.region, tier=s.tier, healthy=False,
                                      free_cards=free_of(s.id, totals, totals)))
            continue
        totals = {a: float(n) for a, n in (view.accelerators or s.accelerators).items()}
        out.append(core.Candidate(
            id=s.id, city=view.city or s.city, region=view.region or s.region, tier=view.tier or s.tier,
            healthy=view.state == "up", draining=view.draining, free_cards=free_of(s.id, totals, view.free_cards),
        ))
    for site, view in views.items():
        if site in seen or not view.city:
            continue
        totals = {a: float(n) for a, n in view.accelerators.items()}
        out.append(core.Candidate(id=site, city=view.city, region=view.region, tier=view.tier,
                                  healthy=view.state == "up", draining=view.draining,
                                  free_cards=free_of(site, totals, view.free_cards)))
    return out


def sites_of_other_deployments(dep: Deployment, holders: Mapping[str, set[tuple[str, str]]],
                               views: Mapping[str, SiteView], mine: set[str]) -> set[str]:
    """Rule 2: sites that hold or report ``dep.model`` for another deployment (not ``dep``'s own)."""
    shared = {s for d, s in holders.get(dep.model, ()) if d != dep.id}
    shared |= {v.id for v in views.values() if (st := v.replicas.get(dep.model)) is not None
               and st.deployment != dep.id}
    return shared - mine


def in_startup_grace(dep: Deployment, now: float, grace_until: float, fresh: frozenset[str]) -> bool:
    """Rule 5: leave ``dep`` alone while sites re-register after a hub start (unless it is new)."""
    return now < grace_until and dep.id not in fresh


def cooling_sites(dep_id: str, cooldown: Mapping[tuple[str, str], float], mine: set[str]) -> set[str]:
    """Rules 3 and 9: sites that refused or failed ``dep_id`` lately (its own replicas aside)."""
    return {s for (d, s) in cooldown if d == dep_id} - mine


def quota_cap(dep: Deployment, quota_cards: int | None, deployment_cards: float,
              training_cards: float) -> tuple[int | None, str]:
    """Rule 6: how many new replicas the tenant's card quota allows (None: no quota), and why."""
    left = quota.cards_left(quota_cards, training_cards=training_cards, deployment_cards=deployment_cards)
    if left is None:
        return None, ""
    cpr = dep.spec.cards_per_replica
    note = (f"card quota: tenant {dep.tenant} holds {deployment_cards + training_cards:g} of {quota_cards} cards "
            f"({deployment_cards:g} in deployments, {training_cards:g} in training); a replica needs {cpr:g}")
    return quota.replicas_within(left, cpr), note


def replica_event(rep: Replica, view: SiteView | None, model: str, memory_seen: dict[tuple[str, str], int],
                  missing_heartbeats: int) -> ReplicaEvent | None:
    """Rule 3: what the site's last heartbeat says happened to a holding replica (None: nothing).

    Updates ``memory_seen`` (the heartbeat count at which the replica was last known there)."""
    if rep.state not in HOLDING or view is None or view.state != "up":
        return None
    key = (rep.deployment, rep.site)
    status = shows(view, model, rep.deployment)
    if status is not None:
        memory_seen[key] = view.heartbeats
        return event_for_report(status.state) if status.state != rep.state else None
    if rep.state in (ReplicaState.LOADING, ReplicaState.READY):
        seen = memory_seen.setdefault(key, view.heartbeats)
        if view.heartbeats - seen >= missing_heartbeats:
            memory_seen.pop(key, None)
            return E.MISSING
    return None


def may_send(kind: str, dep_id: str, site: str, snap: Snapshot, issued: Mapping[tuple[str, str, str], float],
             now: float) -> bool:
    """Rule 8: issue this command now? Not while one waits in the outbox, not within ``retry_s``
    of the last, and a load only to a site that is up."""
    key = (kind, dep_id, site)
    if key in snap.pending or now - issued.get(key, -1e18) < snap.settings.retry_s:
        return False
    if kind == LOAD:
        view = snap.views.get(site)
        return view is not None and view.state == "up"
    return True


def after_refusal(state: ReplicaState, code: str) -> ReplicaEvent | None:
    """Rule 9: the event a refused ``LoadModel`` stands for (None: retry later as it is)."""
    if code in REFUSAL_CODES and state is ReplicaState.PLACED:
        return E.REFUSED
    return None


def autoscaler_asks(dep: Deployment, asks: autoscale.ScalePlan) -> tuple[list[Load], list[Unload]]:
    """Rule 10: the autoscaler's adds and removes for ``dep`` as the commands that carry them out."""
    spec = dep.spec
    loads = [Load(site=a.site, reason=f"scale out: {a.reason}", command=wire.LoadModel(
        model=dep.model, deployment=dep.id, cards=a.cards, slots=spec.slots_per_replica, accelerator=a.accelerator))
        for a in asks.add]
    unloads = [Unload(site=r.site, reason=f"scale in: {r.reason}",
                      command=wire.UnloadModel(model=dep.model, deployment=dep.id)) for r in asks.remove]
    return loads, unloads


def scaling_status(dep: Deployment, asks: autoscale.ScalePlan | None) -> dict[str, object]:
    """Rule 10, for the deployment's status: its bounds, why the autoscaler last added and last
    removed replicas (kept until it does so again) and the demand it cannot serve now (``short``)."""
    prev = dep.report.get("scaling")
    old: dict[str, object] = prev if isinstance(prev, dict) else {}
    out: dict[str, object] = {"min_replicas": dep.spec.min_replicas or 0, "max_replicas": dep.spec.max_replicas,
                              "scale_out": old.get("scale_out", []), "scale_in": old.get("scale_in", []),
                              "short": old.get("short", [])}
    if asks is not None:
        if asks.add:
            out["scale_out"] = [f"+{a.site}: {a.reason}" for a in asks.add]
        if asks.remove:
            out["scale_in"] = [f"-{r.site}: {r.reason}" for r in asks.remove]
        out["short"] = list(asks.short)
    return out


def orphan_unloads(snap: Snapshot, holding: set[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """Rule 7: (deployment, model, site) of replicas sites report that no deployment of ours holds."""
    active = {d.id for d in snap.deployments}
    out = []
    for view in snap.views.values():
        if view.state != "up":
            continue
        for model, status in view.replicas.items():
            dep_id = status.deployment
            if dep_id in LOCAL_DEPLOYMENTS or (dep_id, view.id) in holding:
                continue
            if dep_id in active or dep_id in snap.ours:
                out.append((dep_id, model, view.id))
    return out


# --------------------------------------------------------------------------- reconcile


class _Pass:
    """One reconcile's working state (kept off the public functions so each rule stays small)."""

    def __init__(self, snap: Snapshot, now: float) -> None:
        self.snap = snap
        self.now = now
        mem = snap.memory
        self.seen = dict(mem.seen_hb)
        self.cooldown = {k: t for k, t in mem.cooldown.items() if t > now}
        self.issued = {k: t for k, t in mem.issued.items() if t >= now - 60.0}
        self.plan = Plan()

    def change(self, rep: Replica | None, dep_id: str, site: str, event: ReplicaEvent, reason: str,
               accelerator: str = "", cards: float = 0.0) -> ReplicaState | None:
        old = rep.state if rep is not None else None
        try:
            new = transition(old if old is not None else ReplicaState.REMOVED, event)
        except IllegalReplicaTransition as exc:
            self.plan.illegal.append(f"deployment {dep_id} site {site}: {exc}")
            return None
        self.plan.replicas.append(ReplicaChange(
            deployment=dep_id, site=site, old=old, new=new, event=event, reason=reason,
            accelerator=accelerator or (rep.accelerator if rep else ""), cards=cards or (rep.cards if rep else 0.0)))
        return new

    def load(self, dep: Deployment, site: str, accelerator: str, reason: str) -> None:
        if not may_send(LOAD, dep.id, site, self.snap, self.issued, self.now):
            return
        spec = dep.spec
        cmd = wire.LoadModel(model=spec.model, deployment=dep.id, cards=spec.cards_per_replica,
                             slots=spec.slots_per_replica, accelerator=accelerator)
        self.issued[(LOAD, dep.id, site)] = self.now
        self.plan.loads.append(Load(site=site, command=cmd, reason=reason))

    def unload(self, dep_id: str, model: str, site: str, reason: str) -> None:
        if not may_send(UNLOAD, dep_id, site, self.snap, self.issued, self.now):
            return
        self.issued[(UNLOAD, dep_id, site)] = self.now
        self.plan.unloads.append(Unload(site=site, command=wire.UnloadModel(model=model, deployment=dep_id),
                                        reason=reason))


def reconcile(snap: Snapshot, now: float) -> Plan:
    """Decide every active deployment: replica states from heartbeats, placement, loads, unloads and
    the deployment's state. See the module docstring for the rules.

    Returns:
        The plan; the caller persists ``replicas`` and ``deployments`` changes with ``loads`` and
        ``unloads`` (through the outbox) in one transaction, counts ``illegal`` and keeps ``memory``.
    """
    p = _Pass(snap, now)
    plan = p.plan
    deps = snap.deployments
    holding_rows = [r for d in deps for r in snap.replicas.get(d.id, ()) if r.state in HOLDING]
    models = {d.id: d.model for d in deps}
    cands = planning_candidates(
        snap.sites, snap.views,
        (Holding(r.deployment, models[r.deployment], r.site, r.accelerator, r.cards) for r in holding_rows))
    holders: dict[str, set[tuple[str, str]]] = {}
    held: dict[str, float] = {}
    tenant_of = {d.id: d.tenant for d in deps}
    for r in holding_rows:
        holders.setdefault(models[r.deployment], set()).add((r.deployment, r.site))
        held[tenant_of[r.deployment]] = held.get(tenant_of[r.deployment], 0.0) + r.cards
    active_work = False

    for dep in deps:
        if snap.only is not None and dep.id != snap.only:
            continue
        if snap.only is None and in_startup_grace(dep, now, snap.grace_until, snap.fresh):
            plan.waiting.append(dep.id)
            active_work = True
            continue
        cands, in_progress = _one(p, dep, cands, holders, held)
        active_work = active_work or in_progress

    if snap.only is None:
        holding = {(r.deployment, r.site) for r in holding_rows}
        holding |= {(c.deployment, c.site) for c in plan.replicas if c.new in HOLDING}
        holding -= {(c.deployment, c.site) for c in plan.replicas if c.new not in HOLDING}
        for dep_id, model, site in orphan_unloads(snap, holding):
            p.unload(dep_id, model, site, "orphan: the site reports a replica no deployment of ours holds there")
        ids = {d.id for d in deps}
        p.seen = {k: v for k, v in p.seen.items() if k[0] in ids}
    plan.active_work = active_work or bool(snap.pending)
    plan.memory = Memory(seen_hb=p.seen, cooldown=p.cooldown, issued=p.issued)
    return plan


def _one(p: _Pass, dep: Deployment, cands: list[core.Candidate], holders: dict[str, set[tuple[str, str]]],
         held: dict[str, float]) -> tuple[list[core.Candidate], bool]:
    """Decide one deployment; returns the candidates with its new replicas debited, and whether
    something of it is still in progress."""
    snap, now, plan = p.snap, p.now, p.plan
    spec = dep.spec
    views = snap.views
    existing: dict[str, str] = {}
    accelerators: dict[str, str] = {}
    for r in snap.replicas.get(dep.id, ()):
        rstate: ReplicaState = r.state
        event = replica_event(r, views.get(r.site), dep.model, p.seen, snap.settings.missing_heartbeats)
        if event is not None:
            why = {E.MISSING: "the site's heartbeats stopped listing it: load it again",
                   E.REPORTED_FAILED: "the site reports it failed"}.get(event, f"the site reports it {event.value[9:]}")
            new = p.change(r, dep.id, r.site, event, why)
            if new is not None:
                rstate = new
                if event is E.REPORTED_FAILED:
                    p.cooldown[(dep.id, r.site)] = now + snap.settings.refused_cooldown_s
                    p.unload(dep.id, dep.model, r.site, "the site reports the replica failed")
        existing[r.site] = rstate.value
        accelerators[r.site] = r.accelerator

    mine = {s for s, st in existing.items() if st in core.LIVE_STATES}
    shared = sites_of_other_deployments(dep, holders, views, mine)
    cooling = cooling_sites(dep.id, p.cooldown, mine)
    training_cards = snap.training_cards.get(dep.tenant, 0.0)
    max_new, quota_note = quota_cap(dep, snap.quota_cards.get(dep.tenant), held.get(dep.tenant, 0.0), training_cards)
    blocked = shared | cooling
    usable = cands if not blocked else [
        msgspec.structs.replace(c, free_cards={a: 0.0 for a in c.free_cards}) if c.id in blocked else c for c in cands]
    rp = core.plan_replicas(spec, usable, snap.rtt, existing, snap.regions, origin_weights=snap.weights,
                            max_new=max_new, quota_note=quota_note, prefer=snap.settings.prefer_accelerators)
    plan.planned.append((dep.id, rp))
    held[dep.tenant] = held.get(dep.tenant, 0.0) + len(rp.add) * spec.cards_per_replica
    by_site = {r.site: r for r in snap.replicas.get(dep.id, ())}
    for a in rp.add:
        old = by_site.get(a.site)
        if old is not None and existing.get(a.site) != old.state.value:
            old = msgspec.structs.replace(old, state=ReplicaState(existing[a.site]))
        if p.change(old, dep.id, a.site, E.PLACE, "placed: it covers served origins", a.accelerator, a.cards):
            holders.setdefault(dep.model, set()).add((dep.id, a.site))
            existing[a.site] = ReplicaState.PLACED.value
            accelerators[a.site] = a.accelerator
    for site in rp.remove:
        old = by_site.get(site)
        if old is not None and existing.get(site) != old.state.value:
            old = msgspec.structs.replace(old, state=ReplicaState(existing[site]))
        if p.change(old, dep.id, site, E.UNPLACE, "removed by the plan (site lost, unhealthy or drained)"):
            existing[site] = ReplicaState.REMOVED.value
    cands = core.apply_debits(cands, rp)
    asks = snap.scaling.get(dep.id)
    if asks is not None:
        room = None if max_new is None else max(0, max_new - len(rp.add))
        added = _scale(p, dep, asks, existing, accelerators, by_site, blocked, room)
        held[dep.tenant] = held.get(dep.tenant, 0.0) + added

    ready_by_site = {}
    for site, st in existing.items():
        view = views.get(site)
        status = shows(view, dep.model, dep.id)
        if st == "ready" and status is not None and status.state == "ready" and view is not None \
                and view.state == "up" and not view.draining:
            ready_by_site[site] = view.city or _city(snap, site)
    in_progress = any(s in ("placed", "loading") for s in existing.values())
    state, details = core.deployment_state(spec, ready_by_site, rp.targets, snap.rtt, previous=dep.state,
                                           in_progress=in_progress)
    notes = list(rp.notes)
    notes += [f"site {s} not used: it already hosts {dep.model} for another deployment" for s in sorted(shared)]
    notes += [f"site {s} not used for now: it refused or failed to load this model" for s in sorted(cooling)]
    body: dict[str, object] = {
        "coverage": rp.coverage,
        "uncovered": [{"origin": u.origin, "reason": u.reason} for u in rp.uncovered],
        "targets": rp.targets,
        "details": details,
        "notes": notes,
    }
    if spec.scales:
        body["scaling"] = scaling_status(dep, asks)
    report = msgspec.json.decode(msgspec.json.encode(body))
    if state != dep.state or report != dep.report:
        plan.deployments.append(DeploymentChange(deployment=dep.id, old=dep.state, new=state, report=report,
                                                 reason="; ".join(details[:1])))
    for site in rp.remove:
        p.unload(dep.id, dep.model, site, "removed by the plan")
    for site, st in existing.items():
        if st == "placed":
            p.load(dep, site, accelerators.get(site, ""), "placed: load it")
    return cands, in_progress


def _scale(p: _Pass, dep: Deployment, asks: autoscale.ScalePlan, existing: dict[str, str],
           accelerators: dict[str, str], by_site: Mapping[str, Replica], blocked: set[str], room: int | None) -> float:
    """Rule 10 inside a reconcile: record the autoscaler's adds and removes as replica changes (the
    loads and unloads follow from the states, as for any placement); adds stop at ``room`` (the
    card quota, Rule 6). Returns the cards added."""
    loads, unloads = autoscaler_asks(dep, asks)
    added = 0.0
    for load in loads:
        site = load.site
        if site in blocked or existing.get(site) in core.LIVE_STATES:
            continue
        if room is not None and room <= 0:
            break  # the card quota (Rule 6) holds for scaling as for coverage
        old = by_site.get(site)
        if old is not None and existing.get(site) != old.state.value:
            old = msgspec.structs.replace(old, state=ReplicaState(existing[site]))
        if p.change(old, dep.id, site, E.PLACE, load.reason, load.command.accelerator, load.command.cards):
            existing[site] = ReplicaState.PLACED.value
            accelerators[site] = load.command.accelerator
            added += load.command.cards
            room = None if room is None else room - 1
    for unload in unloads:
        site = unload.site
        if existing.get(site) not in core.LIVE_STATES:
            continue
        old = by_site.get(site)
        if old is not None and existing.get(site) != old.state.value:
            old = msgspec.structs.replace(old, state=ReplicaState(existing[site]))
        if p.change(old, dep.id, site, E.UNPLACE, unload.reason):
            existing[site] = ReplicaState.REMOVED.value
            p.unload(dep.id, dep.model, site, unload.reason)
    return added


def _city(snap: Snapshot, site: str) -> str:
    view = snap.views.get(site)
    if view is not None and view.city:
        return view.city
    for s in snap.sites:
        if s.id == site:
            return s.city
    return ""
