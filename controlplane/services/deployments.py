"""The hub's deployments service: plan replicas, send ``LoadModel``/``UnloadModel``, track readiness.

What it holds: :class:`DeploymentService` (installed by :func:`install`), the one owner of the
``deployments``/``replicas`` rows while the hub runs, plus the pure free-cards rule
(:func:`planning_candidates`).  The gateway (``controlplane/gateway/deployments.py``) calls
:meth:`DeploymentService.create`, ``view``, ``list_views`` and ``delete``; the OpenAI endpoints call
``check_model_access`` and ``models_for_tenant`` (through ``services.record.Services``); ``cpn up`` calls ``deploy_demo``.

Decide, then do (CONVENTIONS example 2).  Each reconcile (every ``interval_s``, at once when poked)
reads the store and the registry, plans every active deployment with ``replicas.plan_replicas``,
persists the plan and the states (synchronously, no ``await`` in between, so two plans never see
the same free cards), and only then sends commands, each in its own task so a slow site never holds
up the loop.  A failed send is retried on a later reconcile: the store is the record of intent, so a
hub restart resumes where it stopped.

Rule 1 (free cards): a site's free cards for planning are the free cards of its last heartbeat minus
the cards of replicas the store holds there (``placed``/``loading``/``ready``) that this heartbeat
does not show yet (its replica list has no entry for the deployment's model with that deployment
id).  A replica the heartbeat shows is already inside its free cards, so it is never counted twice;
a replica unloaded in the store but still on the agent stays counted by the agent until it goes.
Rule 2 (one model per site): the agent reports replicas keyed by model, so the hub never places two
deployments of the same model on one site, nor a deployment on a site that offers the model itself
(deployment ``local``); such a site gets zero free cards for that deployment, with a note.
Rule 3 (readiness comes from heartbeats): a replica is ``ready`` when the site's heartbeat lists the
model with this deployment id in state ``ready``; ``failed`` there removes it (and keeps the
deployment off that site for ``refused_cooldown_s``); missing for ``missing_heartbeats`` heartbeats
after the agent accepted it puts it back to ``placed`` so ``LoadModel`` is sent again.
Rule 4 (site loss): the site listener marks the site's replicas ``lost`` at once; the next plan
removes them and places replacements where the layout allows; the deployment is ``degraded`` until
the replacements are ready.
Rule 5 (start-up grace): for one detection period after the hub starts, deployments created before
the start are left alone (sites are still re-registering and would look unhealthy, so a plan would
move every replica); deployments created since are planned and tracked as usual.
Rule 6 (model access): a tenant may call the models of its own active deployments and models that
sites offer themselves (deployment ``local`` or none) to that tenant (the operator allows tenants per
site: ``declarations`` Rule 5); an admin key may call any model. A tenant's
requests are served only by replicas of its own deployments or sites' own ones: two tenants who
deploy the same model name never use each other's replicas (``serving_scope``).
Rule 7 (Idempotency-Key, as for jobs): per tenant, a key with an equal spec replays the first answer
and creates nothing; with another spec it is a 422. The key is committed with the deployment in one
transaction; the answer is recorded once rendered.
Rule 8 (card quota, architecture §9): a tenant's ``quota_cards`` bounds the cards it holds in all: its
deployments' replicas (placed, loading or ready) plus its training jobs placed or running. A plan
adds only the replicas that fit; the rest of the deployment waits, and its report says why. The
training scheduler sees the quota less the cards the tenant's deployments hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from controlplane.core import lifecycle
from controlplane.core.clock import Clock
from controlplane.core import replicas as core
from controlplane.core.declarations import LOCAL_DEPLOYMENTS, may_use_local
from controlplane.core.errors import BusUnavailable, NotFound, PeerError, RequestError, SiteRefused
from controlplane.core.registry import SiteView, Transition
from controlplane.runtime import BackgroundTasks
from controlplane.store import deployments as store
from controlplane.store import jobs as store_jobs
from edge_agent import wire

if TYPE_CHECKING:
    from controlplane.hub import Hub
    from topology import layout as topo_layout

log = logging.getLogger("cpn.deployments")

# LOCAL_DEPLOYMENTS: deployment ids of replicas an agent loads from its own config (callable by the
# tenants the operator allowed at that site: declarations Rule 5).
REFUSAL_CODES = frozenset({"no_capacity", "draining", "bad_message"})
"""LoadModel refusals that will not go away by retrying at once: re-plan elsewhere."""


# --------------------------------------------------------------------------- pure helpers


@dataclass(frozen=True, slots=True)
class Holding:
    """A replica the store says holds cards at a site."""

    deployment: str
    model: str
    site: str
    accelerator: str
    cards: float


def shows(view: SiteView | None, model: str, deployment: str) -> wire.ReplicaStatus | None:
    """The site's last report of ``model`` if it belongs to ``deployment`` (else None)."""
    if view is None:
        return None
    status = view.replicas.get(model)
    return status if status is not None and status.deployment == deployment else None


def spec_hash(spec: core.DeploymentSpec) -> str:
    """Hash of a decoded spec: equal specs (whatever their key order, spacing or defaults left out)
    hash equal, as the jobs API hashes its bodies for ``Idempotency-Key``."""
    return hashlib.sha256(msgspec.json.encode(msgspec.to_builtins(spec), order="sorted")).hexdigest()


def planning_candidates(
    sites: Iterable[topo_layout.Site], views: Mapping[str, SiteView], holding: Iterable[Holding]
) -> list[core.Candidate]:
    """Every site as a ``replicas.Candidate`` with free cards by Rule 1 (pure).

    Args:
        sites: the layout's sites (known before they speak; unregistered ones are unhealthy).
        views: the registry's site views (sites not in the layout are included too).
        holding: card-holding replicas in the store, of active deployments.
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


def _without_capacity(cands: list[core.Candidate], sites: set[str]) -> list[core.Candidate]:
    if not sites:
        return cands
    return [
        msgspec.structs.replace(c, free_cards={a: 0.0 for a in c.free_cards}) if c.id in sites else c
        for c in cands
    ]


# --------------------------------------------------------------------------- the service


class DeploymentService:
    """Deployments of one hub (see the module docstring for its rules).

    Args:
        hub: the hub it belongs to (store, registry, RTT index, bus).
        interval_s: reconcile period when nothing pokes it.
        full_replan_s: re-plan at least this often even if nothing visible changed (free cards).
        retry_s: minimum time between two sends of the same command to the same site.
        cmd_timeout_s: how long a command waits for the agent's Ack.
        refused_cooldown_s: how long a deployment stays off a site that refused or failed a load.
        missing_heartbeats: heartbeats without an accepted replica before it is loaded again.
    """

    name = "deployments"

    def __init__(self, hub: Hub, clock: Clock, *, interval_s: float = 0.5, full_replan_s: float = 5.0, retry_s: float = 2.0,
                 cmd_timeout_s: float = 2.0, refused_cooldown_s: float = 30.0, missing_heartbeats: int = 3) -> None:
        self.hub = hub
        self.clock = clock
        self.interval_s = interval_s
        self.full_replan_s = full_replan_s
        self.retry_s = retry_s
        self.cmd_timeout_s = cmd_timeout_s
        self.refused_cooldown_s = refused_cooldown_s
        self.missing_heartbeats = missing_heartbeats
        self.counters: Counter[str] = Counter()
        self._poked = asyncio.Event()
        self.tasks = BackgroundTasks("deployments")
        """The reconcile loop and the commands in flight."""
        self._sends: dict[tuple[str, str, str], asyncio.Future[Any]] = {}
        self._last_sent: dict[tuple[str, str, str], float] = {}
        self._accepted_hb: dict[tuple[str, str], int] = {}
        """(deployment, site) -> the site's heartbeat count when the replica was last known there."""
        self._cooldown: dict[tuple[str, str], float] = {}
        self._tenant_models: dict[str, Counter[str]] = {}
        self._tenant_deps: dict[tuple[str, str], set[str]] = {}
        """(tenant, model) -> the ids of the tenant's active deployments of the model"""
        self._scopes: dict[tuple[str, str], frozenset[str]] = {}
        self._foreign: dict[str, bool] = {}
        """Deployment ids seen in heartbeats -> True if the store knows them (deleted ones)."""
        self._local: dict[str, tuple[int, frozenset[str]]] = {}
        self._epoch = 0
        self._last_sig: tuple[int, int] = (-1, -1)
        self._last_full = 0.0
        self._grace_until = 0.0
        self._fresh: set[str] = set()
        """Deployments created by this process (exempt from the start-up grace of Rule 5)."""
        self._active_work = False

    def __repr__(self) -> str:
        c = self.counters
        return (f"<DeploymentService ticks={c['ticks']} plans={c['plans']} loads={c['loads_sent']} "
                f"unloads={c['unloads_sent']} sending={len(self._sends)}>")

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load the model-access table from the store and start the reconcile loop."""
        hub = self.hub
        self._tenant_models.clear()
        self._tenant_deps.clear()
        self._scopes.clear()
        for dep in store.list_active(hub.db):
            self._own(dep.tenant, dep.model, dep.id, True)
        self._grace_until = self.clock.time() + hub.registry.detection_s
        self.tasks.spawn(self._loop(), name="reconcile")

    async def stop(self) -> None:
        """Cancel the loop and every command still in flight."""
        await self.tasks.close()
        self._sends.clear()

    def poke(self) -> None:
        """Reconcile as soon as possible (a deployment, a site or a command result changed)."""
        self._epoch += 1
        self._poked.set()

    def on_site(self, t: Transition) -> None:
        """Site listener: a lost site's replicas become ``lost`` at once (Rule 4)."""
        if t.new == "lost" and self.hub.db is not None:
            affected = store.mark_site_lost(self.hub.db, t.site, now=t.at)
            if affected:
                log.warning("event=replicas_lost site=%s deployments=%s", t.site, ",".join(affected))
        self.poke()

    async def _loop(self) -> None:
        while True:
            try:
                self.reconcile(self.clock.time())
            except Exception:
                self.counters["errors"] += 1
                log.exception("event=reconcile_failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_s):
                    await self._poked.wait()
            self._poked.clear()

    # ------------------------------------------------------------------ API for the gateway and cpn up

    def validate(self, spec: core.DeploymentSpec) -> None:
        """Check a spec against the layout; raise ``RequestError`` (400) naming the field."""
        hub = self.hub
        assert hub.layout is not None
        for i, origin in enumerate(spec.origins):
            if origin not in hub.origin_ids:
                raise RequestError(f"origins[{i}]: unknown origin {origin!r}: not a city of the layout",
                                    field=f"origins[{i}]")
        regions = {o.region for o in hub.layout.origins}
        for i, region in enumerate(spec.regions):
            if region not in regions:
                raise RequestError(f"regions[{i}]: unknown region {region!r}: no demand origin of the layout is in it",
                                    field=f"regions[{i}]")
        types = set(hub.layout.accelerators) | {a for s in hub.layout.sites for a in s.accelerators}
        types |= {a for v in hub.registry for a in v.accelerators}
        for i, acc in enumerate(spec.accelerators or []):
            if acc not in types:
                raise RequestError(f"accelerators[{i}]: unknown accelerator type {acc!r}", field=f"accelerators[{i}]")
        largest = 0.0
        for site in hub.layout.sites:
            if site.tier in core.HOSTING_TIERS:
                for acc, n in site.accelerators.items():
                    if spec.accelerators is None or acc in spec.accelerators:
                        largest = max(largest, float(n))
        for view in hub.registry:
            if view.tier in core.HOSTING_TIERS:
                for acc, n in view.accelerators.items():
                    if spec.accelerators is None or acc in spec.accelerators:
                        largest = max(largest, float(n))
        if spec.cards_per_replica > largest + 1e-9:
            raise RequestError(
                f"cards_per_replica: {spec.cards_per_replica:g} cards is more than any edge or regional site has "
                f"of an accepted accelerator (largest: {largest:g})", field="cards_per_replica")

    def create(self, tenant: str, spec: core.DeploymentSpec, *, deployment_id: str | None = None,
               idempotency_key: str | None = None) -> tuple[dict[str, Any], bool]:
        """Record, plan and persist a new deployment (all committed when this returns); loads follow.

        With ``idempotency_key``, a second call of ``tenant`` with the same key and an equal spec
        creates nothing and answers what the first call answered (its view, replicas as first
        planned), like ``POST /v1/jobs``; if that answer was never recorded (the hub stopped between
        the commit and the answer), the deployment's current view.

        Returns:
            ``(view, replayed)``: ``replayed`` is True when the answer is a replay.

        Raises:
            RequestError: (400) the spec names an unknown origin, region or accelerator, or more cards
                than any site has.
            Unprocessable: (422) ``tenant`` used ``idempotency_key`` with another spec.
        """
        self.validate(spec)
        db = self.hub.db
        dep_id = deployment_id or f"dep-{secrets.token_hex(6)}"
        dep, replay = store.create_or_replay(
            db, deployment_id=dep_id, tenant=tenant, model=spec.model, spec=spec, now=self.clock.time(),
            idem_key=idempotency_key, body_hash=spec_hash(spec) if idempotency_key is not None else "")
        if replay is not None:
            log.info("event=deployment_replayed deployment=%s tenant=%s", dep.id, tenant)
            return (replay.response if replay.response is not None else self._render(dep)), True
        self._own(tenant, spec.model, dep.id, True)
        if self.clock.time() < self._grace_until:
            self._fresh.add(dep.id)
        log.info("event=deployment_created deployment=%s tenant=%s model=%s", dep.id, tenant, spec.model)
        self._decide(self.clock.time(), only=dep.id)
        self.poke()
        view = self.view(tenant, dep.id)
        if idempotency_key is not None:
            store.record_answer(db, tenant=tenant, idem_key=idempotency_key, response=view)
        return view, False

    def view(self, tenant: str | None, deployment_id: str) -> dict[str, Any]:
        """The deployment as the API shows it; NotFound if missing, deleted or not ``tenant``'s."""
        dep = store.get(self.hub.db, deployment_id, tenant=tenant)
        if dep is None:
            raise NotFound(f"deployment {deployment_id!r} not found", field="id")
        return self._render(dep)

    def list_views(self, tenant: str) -> list[dict[str, Any]]:
        """A tenant's active deployments, oldest first."""
        return [self._render(d) for d in store.list_for_tenant(self.hub.db, tenant)]

    def delete(self, tenant: str | None, deployment_id: str) -> None:
        """Soft-delete a deployment and unload its replicas (sends follow; retried until gone)."""
        db = self.hub.db
        dep = store.get(db, deployment_id, tenant=tenant)
        if dep is None or not store.delete(db, deployment_id, tenant=tenant, now=self.clock.time()):
            raise NotFound(f"deployment {deployment_id!r} not found", field="id")
        self._own(dep.tenant, dep.model, dep.id, False)
        now = self.clock.time()
        for rep in store.replicas_of(db, dep.id):
            store.set_replica_state(db, dep.id, rep.site, "removed", now=now)
            self._send_unload(dep.id, dep.model, rep.site, now)
        log.info("event=deployment_deleted deployment=%s tenant=%s", dep.id, dep.tenant)
        self.poke()

    async def deploy_demo(self, tenant: str, model: str) -> str:
        """``cpn up``'s demo: ``model`` over every origin of the layout, 0.25 cards, 10 ms, two cities.

        Idempotent: an active deployment of ``model`` by ``tenant`` is reused (across restarts too).
        Returns the deployment id ("" when the tenant does not exist).
        """
        hub = self.hub
        assert hub.layout is not None
        for dep in store.list_for_tenant(hub.db, tenant):
            if dep.model == model:
                return dep.id
        if hub.tenant(tenant) is None:
            log.warning("event=demo_not_deployed tenant=%s reason=no such tenant", tenant)
            return ""
        spec = core.DeploymentSpec(model=model, origins=[o.id for o in hub.layout.origins], budget_ms=10.0,
                                   cards_per_replica=0.25, min_cities=2, slots_per_replica=8)
        view, _ = self.create(tenant, spec)
        return str(view["id"])

    def models_for_tenant(self, tenant: str | None) -> list[str]:
        """Model ids ``GET /v1/models`` shows: the tenant's deployed models plus the sites' own it may use."""
        if tenant is None:
            return sorted(self.hub.known_models())
        own = set(self._tenant_models.get(tenant, ()))
        return sorted(own | self._local_models(tenant))

    def _own(self, tenant: str, model: str, dep_id: str, add: bool) -> None:
        """Record that ``tenant``'s deployment ``dep_id`` of ``model`` became active (or went away)."""
        counts = self._tenant_models.setdefault(tenant, Counter())
        deps = self._tenant_deps.setdefault((tenant, model), set())
        if add:
            if dep_id not in deps:
                deps.add(dep_id)
                counts[model] += 1
        elif dep_id in deps:
            deps.discard(dep_id)
            counts[model] -= 1
            if counts[model] <= 0:
                del counts[model]
        self._scopes.pop((tenant, model), None)

    def serving_scope(self, tenant: str, model: str) -> frozenset[str] | None:
        """The deployments whose replicas may serve ``tenant``'s requests for ``model`` (Rule 6):
        its own and the sites' own; None (any replica) for an admin key."""
        if not tenant:
            return None
        scope = self._scopes.get((tenant, model))
        if scope is None:
            scope = self._scopes[(tenant, model)] = frozenset(self._tenant_deps.get((tenant, model), ())) | LOCAL_DEPLOYMENTS
        return scope

    def check_model_access(self, tenant: str, model: str) -> frozenset[str] | None:
        """Raise a 404 ``model_not_found`` unless ``tenant`` may call ``model``; else return the
        deployments that may serve it (:meth:`serving_scope`)."""
        if not tenant or model in self._tenant_models.get(tenant, ()) or model in self._local_models(tenant):
            return self.serving_scope(tenant, model)
        raise RequestError(
            f"model {model!r} not found: it is not deployed for this tenant (POST /v1/deployments)",
            field="model", status=404, code="model_not_found",
        )

    def _local_models(self, tenant: str) -> frozenset[str]:
        """Models some site offers itself to ``tenant`` (declarations Rule 5)."""
        registry = self.hub.registry
        version, models = self._local.get(tenant, (-1, frozenset()))
        if version != registry.version:
            models = frozenset(m for v in registry if may_use_local(v.local_model_tenants, tenant)
                               for m, r in v.replicas.items() if r.deployment in LOCAL_DEPLOYMENTS)
            if len(self._local) > 10_000:
                self._local.clear()
            self._local[tenant] = (registry.version, models)
        return models

    # ------------------------------------------------------------------ rendering

    def _city(self, site: str) -> str:
        view = self.hub.registry.get(site)
        if view is not None and view.city:
            return view.city
        assert self.hub.layout is not None
        try:
            return self.hub.layout.site(site).city
        except KeyError:
            return ""

    def _render(self, dep: store.Deployment) -> dict[str, Any]:
        report = dep.report or {}
        return {
            "id": dep.id,
            "object": "deployment",
            "model": dep.model,
            "owned_by": dep.tenant,
            "state": dep.state,
            "spec": dep.spec,
            "replicas": [
                {"site": r.site, "city": self._city(r.site), "accelerator": r.accelerator, "cards": r.cards,
                 "state": r.state}
                for r in store.replicas_of(self.hub.db, dep.id)
            ],
            "coverage": report.get("coverage", {}),
            "uncovered": report.get("uncovered", []),
            "targets": report.get("targets", {}),
            "details": report.get("details", []),
            "notes": report.get("notes", []),
            "created_at": dep.created_at,
            "updated_at": dep.updated_at,
        }

    # ------------------------------------------------------------------ decide

    def _candidates(
        self, deps: list[store.Deployment]
    ) -> tuple[list[core.Candidate], dict[str, list[store.Replica]]]:
        hub = self.hub
        assert hub.layout is not None
        reps = {d.id: store.replicas_of(hub.db, d.id) for d in deps}
        models = {d.id: d.model for d in deps}
        holding = [
            Holding(r.deployment, models[r.deployment], r.site, r.accelerator, r.cards)
            for lst in reps.values() for r in lst if r.state in store.HOLDING_STATES
        ]
        return planning_candidates(hub.layout.sites, hub.registry.views, holding), reps

    def reconcile(self, now: float) -> None:
        """One decide-then-do pass (the loop calls it; tests may too)."""
        registry = self.hub.registry
        sig = (registry.version, self._epoch)
        if sig == self._last_sig and not self._active_work and now - self._last_full < self.full_replan_s:
            return
        self._last_sig = sig
        self._last_full = now
        self.counters["ticks"] += 1
        self._decide(now)

    def _decide(self, now: float, only: str | None = None) -> None:
        hub = self.hub
        db = hub.db
        assert hub.layout is not None and hub.rtt is not None
        deps = store.list_active(db)
        cands, reps = self._candidates(deps)
        views = hub.registry.views
        regions: dict[str, list[str]] = {}
        for o in hub.layout.origins:
            regions.setdefault(o.region, []).append(o.id)
        weights = {o.id: o.weight for o in hub.layout.origins}
        in_grace = now < self._grace_until
        active_work = False
        by_model: dict[str, set[tuple[str, str]]] = {}
        for d in deps:
            for r in reps[d.id]:
                if r.state in store.HOLDING_STATES:
                    by_model.setdefault(d.model, set()).add((d.id, r.site))
        for k in [k for k, until in self._cooldown.items() if until <= now]:
            del self._cooldown[k]
        held: dict[str, float] = {}  # cards each tenant's deployments hold (Rule 8)
        for d in deps:
            for r in reps[d.id]:
                if r.state in store.HOLDING_STATES:
                    held[d.tenant] = held.get(d.tenant, 0.0) + r.cards
        training: dict[str, int] | None = None

        for dep in deps:
            if only is not None and dep.id != only:
                continue
            if only is None and in_grace and dep.id not in self._fresh:
                active_work = True
                continue
            spec = msgspec.convert(dep.spec, core.DeploymentSpec)
            replicas = self._sync_replicas(dep, reps[dep.id], now)
            existing = {r.site: r.state for r in replicas}
            # Rule 2, and sites that refused or failed this deployment lately.
            mine = {s for s, st in existing.items() if st in core.LIVE_STATES}
            shared = {s for d, s in by_model.get(dep.model, ()) if d != dep.id}
            shared |= {v.id for v in views.values() if (st := v.replicas.get(dep.model)) is not None
                       and st.deployment != dep.id}
            shared -= mine
            cooling = {s for (d, s) in self._cooldown if d == dep.id} - mine
            blocked = shared | cooling
            max_new, quota_note = None, ""
            quota = (hub.tenant(dep.tenant) or {}).get("quota_cards")
            if quota is not None:
                if training is None:
                    training = store_jobs.held_cards_by_tenant(db, (s.value for s in lifecycle.LIVE))
                mine_cards, theirs = held.get(dep.tenant, 0.0), training.get(dep.tenant, 0)
                left = float(quota) - mine_cards - theirs
                max_new = max(0, int((left + 1e-9) // spec.cards_per_replica))
                quota_note = (f"card quota: tenant {dep.tenant} holds {mine_cards + theirs:g} of {quota} cards "
                              f"({mine_cards:g} in deployments, {theirs} in training); a replica needs "
                              f"{spec.cards_per_replica:g}")
            plan = core.plan_replicas(spec, _without_capacity(cands, blocked), hub.rtt, existing, regions,
                                      origin_weights=weights, max_new=max_new, quota_note=quota_note)
            held[dep.tenant] = held.get(dep.tenant, 0.0) + len(plan.add) * spec.cards_per_replica
            self.counters["plans"] += 1
            if plan.add or plan.remove:
                store.apply_plan(db, dep.id, plan, now=now)
                for p in plan.add:
                    by_model.setdefault(dep.model, set()).add((dep.id, p.site))
                    existing[p.site] = "placed"
                for site in plan.remove:
                    existing[site] = "removed"
                log.info("event=deployment_planned deployment=%s add=%s remove=%s uncovered=%d", dep.id,
                         ",".join(p.site for p in plan.add) or "-", ",".join(plan.remove) or "-", len(plan.uncovered))
            cands = core.apply_debits(cands, plan)

            ready_by_site = {}
            for site, state in existing.items():
                view = views.get(site)
                status = shows(view, dep.model, dep.id)
                if state == "ready" and status is not None and status.state == "ready" and view is not None \
                        and view.state == "up" and not view.draining:
                    ready_by_site[site] = view.city or self._city(site)
            in_progress = any(s in ("placed", "loading") for s in existing.values())
            state, details = core.deployment_state(spec, ready_by_site, plan.targets, hub.rtt, previous=dep.state,
                                                   in_progress=in_progress)
            notes = list(plan.notes)
            notes += [f"site {s} not used: it already hosts {dep.model} for another deployment" for s in sorted(shared)]
            notes += [f"site {s} not used for now: it refused or failed to load this model" for s in sorted(cooling)]
            report = {
                "coverage": plan.coverage,
                "uncovered": [{"origin": u.origin, "reason": u.reason} for u in plan.uncovered],
                "targets": plan.targets,
                "details": details,
                "notes": notes,
            }
            report = msgspec.json.decode(msgspec.json.encode(report))
            if state != dep.state or report != dep.report:
                store.set_state(db, dep.id, state, report=report, now=now)
                if state != dep.state:
                    log.info("event=deployment_state deployment=%s state=%s was=%s", dep.id, state, dep.state)
            for site in plan.remove:
                self._send_unload(dep.id, dep.model, site, now)
            accelerators = {r.site: r.accelerator for r in replicas} | {p.site: p.accelerator for p in plan.add}
            for site, rstate in existing.items():
                if rstate == "placed":
                    self._send_load(dep.id, spec, site, accelerators.get(site, ""), now)
            active_work = active_work or in_progress

        if only is None:
            self._unload_orphans(deps, reps, now)
            self._active_work = active_work or bool(self._sends)
            cutoff = now - 60.0
            for sent in [k for k, t in self._last_sent.items() if t < cutoff]:
                del self._last_sent[sent]
            ids = {d.id for d in deps}
            for key in [key for key in self._accepted_hb if key[0] not in ids]:
                del self._accepted_hb[key]
            if not in_grace:
                self._fresh.clear()

    def _sync_replicas(self, dep: store.Deployment, reps: list[store.Replica], now: float) -> list[store.Replica]:
        """Rule 3: move replica states to what the sites report; return the updated list."""
        db = self.hub.db
        out = []
        for r in reps:
            state = r.state
            if state in store.HOLDING_STATES:
                view = self.hub.registry.get(r.site)
                status = shows(view, dep.model, dep.id)
                key = (dep.id, r.site)
                if view is not None and view.state == "up":
                    if status is not None:
                        self._accepted_hb[key] = view.heartbeats
                        if status.state == "failed":
                            state = "removed"
                            self._cooldown[key] = now + self.refused_cooldown_s
                            self._send_unload(dep.id, dep.model, r.site, now)
                            log.warning("event=replica_failed deployment=%s site=%s", dep.id, r.site)
                        elif status.state != state:
                            state = status.state
                    elif state in ("loading", "ready"):
                        seen = self._accepted_hb.setdefault(key, view.heartbeats)
                        if view.heartbeats - seen >= self.missing_heartbeats:
                            state = "placed"  # the agent forgot it (restarted unnoticed): load again
                            self._accepted_hb.pop(key, None)
                            # Expected after a site restarts (cpn up restarts them all): healed by loading it
                            # again, so INFO; a site that cannot load it says so as replica_failed.
                            log.info("event=replica_missing deployment=%s site=%s", dep.id, r.site)
                if state != r.state:
                    store.set_replica_state(db, dep.id, r.site, state, now=now)
                    r = msgspec.structs.replace(r, state=state, updated_at=now)
            out.append(r)
        return out

    def _unload_orphans(self, deps: list[store.Deployment], reps: dict[str, list[store.Replica]], now: float) -> None:
        """Unload replicas sites report for deployments of ours that no longer hold them there."""
        active = {d.id: d for d in deps}
        holding = {(r.deployment, r.site) for lst in reps.values() for r in lst if r.state in store.HOLDING_STATES}
        for view in self.hub.registry:
            if view.state != "up":
                continue
            for model, status in view.replicas.items():
                dep_id = status.deployment
                if dep_id in LOCAL_DEPLOYMENTS or (dep_id, view.id) in holding:
                    continue
                if dep_id not in active:
                    known = self._foreign.get(dep_id)
                    if known is None:
                        if len(self._foreign) > 10_000:
                            self._foreign.clear()
                        known = store.get(self.hub.db, dep_id, include_deleted=True) is not None \
                            if wire.is_valid_id(dep_id) else False
                        self._foreign[dep_id] = known
                    if not known:
                        continue  # loaded by someone else (an operator by hand): not ours to unload
                self._send_unload(dep_id, model, view.id, now)

    # ------------------------------------------------------------------ do

    def _send_load(self, dep_id: str, spec: core.DeploymentSpec, site: str, accelerator: str, now: float) -> None:
        cmd = wire.LoadModel(model=spec.model, deployment=dep_id, cards=spec.cards_per_replica,
                             slots=spec.slots_per_replica, accelerator=accelerator)
        self._send("load", dep_id, site, cmd, now)

    def _send_unload(self, dep_id: str, model: str, site: str, now: float) -> None:
        self._send("unload", dep_id, site, wire.UnloadModel(model=model, deployment=dep_id), now)

    def _send(self, kind: str, dep_id: str, site: str, cmd: Any, now: float) -> None:
        key = (kind, dep_id, site)
        if key in self._sends or now - self._last_sent.get(key, -1e18) < self.retry_s:
            return
        view = self.hub.registry.get(site)
        if kind == "load" and (view is None or view.state != "up"):
            return  # the plan will move it elsewhere; no point waiting on a silent site
        self._last_sent[key] = now
        self._sends[key] = self.tasks.spawn(self._command(key, site, cmd), name=f"{kind}-{site}")

    async def _command(self, key: tuple[str, str, str], site: str, cmd: Any) -> None:
        kind, dep_id, _ = key
        self.counters[f"{kind}s_sent"] += 1
        try:
            ack = await self.hub.bus.command(site, cmd, timeout_s=self.cmd_timeout_s)
        except SiteRefused as exc:
            self.counters[f"{kind}s_refused"] += 1
            log.warning("event=%s_refused deployment=%s site=%s code=%s error=%s", kind, dep_id, site, exc.code,
                        exc.message)
            if kind == "load" and exc.code in REFUSAL_CODES:
                self._refused(dep_id, site)
        except (PeerError, BusUnavailable) as exc:
            self.counters[f"{kind}s_failed"] += 1
            log.info("event=%s_failed deployment=%s site=%s error=%s retry=next reconcile", kind, dep_id, site, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.counters[f"{kind}s_failed"] += 1
            log.exception("event=%s_error deployment=%s site=%s", kind, dep_id, site)
        else:
            view = self.hub.registry.get(site)
            if kind == "load" and view is not None:
                self._accepted_hb[(dep_id, site)] = view.heartbeats
            log.debug("event=%s_acked deployment=%s site=%s detail=%s", kind, dep_id, site, ack.detail)
        finally:
            self._sends.pop(key, None)
            self._poked.set()

    def _refused(self, dep_id: str, site: str) -> None:
        """A site refused a load: take the replica off it and keep the deployment away for a while."""
        db = self.hub.db
        if db is None:
            return
        self._cooldown[(dep_id, site)] = self.clock.time() + self.refused_cooldown_s
        for r in store.replicas_of(db, dep_id):
            if r.site == site and r.state == "placed":
                store.set_replica_state(db, dep_id, site, "removed", now=self.clock.time())
        self.poke()


def install(hub: Hub, clock: Clock) -> DeploymentService:
    """Create the service and plug it into ``hub`` (before ``hub.start()``).

    Its routes (``gateway/deployments.py``) are added by the composition root (``compose.py``):
    a service never imports the gateway."""
    service = DeploymentService(hub, clock)
    hub.add_service(service)
    hub.site_listeners.append(service.on_site)
    return service
