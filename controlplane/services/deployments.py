"""The hub's deployments service: carry out what ``core.deployments.reconcile`` decides.

What it holds: :class:`DeploymentService` (built by the composition root, ``compose.py``), the one owner of the
``deployments``/``replicas`` rows while the hub runs. The gateway (``controlplane/gateway/deployments.py``)
calls :meth:`DeploymentService.create`, ``view``, ``list_views`` and ``delete``; the OpenAI endpoints
call ``check_model_access`` and ``models_for_tenant`` (through ``services.record.Services``); ``cpn up``
calls ``deploy_demo``.

Decide, then do (architecture: "services decide, then do"). Every ``interval_s`` (at once when poked)
the service builds a :class:`~controlplane.core.deployments.Snapshot` from the store, the registry
and the layout, asks ``reconcile(snapshot, now)`` for a plan, and writes the plan's replica and
deployment state changes *and* its ``LoadModel``/``UnloadModel`` commands into the command outbox
(``services/outbox.py``, the table training uses) in ONE transaction. The outbox then sends them:
durably (a hub restart re-sends what is pending), in order per site, retried with back-off. Every
deployment rule lives in the core module; this one only reads, writes and reports.

Rule 1 (replica states): a replica changes state only by ``replica_lifecycle.transition``; a change
the table refuses is counted (``counters["illegal_transitions"]``, ``cpn_illegal_transitions_total``)
and never written. Changes are written compare-and-set on the state the plan read.
Rule 2 (answers): an acknowledged ``LoadModel`` moves a placed replica to ``loading``; a refusal goes
through ``after_refusal`` (no capacity, draining: removed, and the deployment kept off the site for
``refused_cooldown_s``); a ``LoadModel`` for a replica that is no longer ``placed`` is dropped as
obsolete before it is sent.
Rule 3 (site loss): the site listener marks the site's replicas ``lost`` at once; the next plan
replaces them.
Rule 4 (model access): a tenant may call the models of its own active deployments and models that
sites offer themselves (deployment ``local`` or none) to that tenant (the operator allows tenants per
site: ``declarations`` Rule 5); an admin key may call any model. A tenant's requests are served only
by replicas of its own deployments or sites' own ones (``serving_scope``).
Rule 6 (autoscaling, ``core/autoscale.py``): every ``autoscale_interval_s`` the demand the inference
path counted per (tenant, model, origin, budget) since the last time (``demand``, drained) is folded
into one ``DemandMeter`` per scaling deployment (``min_replicas``/``max_replicas``), with the mean
service time its sites report; ``autoscale.decide`` sizes it and its plan goes to ``reconcile`` as
``Snapshot.scaling`` (carried out there like any placement, its reasons in the deployment's
``scaling`` status). Replicas the autoscaler added are recorded as such (``replicas.scaled_at``,
in the same transaction as the placement) and are the only ones it may scale in; the others
(coverage, floor) are protected. The mark is in the record, so a restarted hub or a newly elected
controller scales in what any leader's autoscaler added.
Rule 5 (Idempotency-Key, as for jobs): per tenant, a key with an equal spec replays the first answer
and creates nothing; with another spec it is a 422. The key is committed with the deployment in one
transaction; the answer is recorded once rendered.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import secrets
from collections import Counter
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from controlplane.core import autoscale
from controlplane.core import deployments as decide
from controlplane.core import lifecycle
from controlplane.core import replicas as core
from controlplane.core.clock import Clock
from controlplane.core.declarations import LOCAL_DEPLOYMENTS, may_use_local
from controlplane.core.errors import NotFound, RecordFenced, RequestError
from controlplane.core.registry import SiteRegistry, Transition
from controlplane.core.replica_lifecycle import (
    HOLDING, IllegalReplicaTransition, ReplicaEvent, ReplicaState, transition,
)
from controlplane.runtime import BackgroundTasks
from controlplane.services.outbox import LOAD, MODEL_KINDS, UNLOAD, CommandOutbox
from controlplane.store import deployments as store
from controlplane.store import jobs as store_jobs
from controlplane.store import outbox as store_outbox
from controlplane.store.db import Database, transaction, write
from controlplane.store.outbox import OutboxRow
from edge_agent import wire

if TYPE_CHECKING:
    from controlplane.metrics import HubMetrics
    from topology import latency
    from topology import layout as topo_layout

log = logging.getLogger("cpn.deployments")

_KIND = {LOAD: decide.LOAD, UNLOAD: decide.UNLOAD}
"""Outbox kind (wire tag) -> the core's command kind."""


@dataclasses.dataclass(frozen=True)
class _Made:
    """What a creation's transaction made (or found): the deployment, its answer, whether that is a
    replay, and the plan written with it (None: not planned here)."""

    deployment: store.Deployment
    view: dict[str, Any]
    replayed: bool
    plan: decide.Plan | None


def plan_changes(plan: decide.Plan) -> bool:
    """Whether a reconcile plan has anything to write (the usual pass has not: the registry's
    version moves with every heartbeat)."""
    return bool(plan.replicas or plan.deployments or plan.loads or plan.unloads)


def spec_hash(spec: core.DeploymentSpec) -> str:
    """Hash of a decoded spec: equal specs (whatever their key order, spacing or defaults left out)
    hash equal, as the jobs API hashes its bodies for ``Idempotency-Key``."""
    body = msgspec.to_builtins(spec)
    for added in ("min_replicas", "max_replicas"):  # fields added later: unset, a stored key's hash is unchanged
        if body.get(added) is None:
            body.pop(added, None)
    return hashlib.sha256(msgspec.json.encode(body, order="sorted")).hexdigest()


class DeploymentService:
    """Deployments of one hub (see the module docstring for its rules).

    Args (keywords; the ones only known once the hub has started are given as zero-argument getters):
        db: the store's database (getter).
        registry: the site registry (views, heartbeats, detection period).
        bus: anything with ``async command(site, cmd, timeout_s) -> wire.Ack`` (the outbox sends with it).
        layout, rtt: the layout and its RTT index (getters).
        clock: time for decisions and records.
        tenant: a tenant's row (``quota_cards``) or None.
        known_models: every model some site reports (for an admin's ``/v1/models``).
        metrics: the hub's metrics (illegal transitions), if any.
        interval_s: reconcile period when nothing pokes it.
        full_replan_s: re-plan at least this often even if nothing visible changed (free cards).
        cmd_timeout_s: how long a command waits for the agent's Ack.
        settings: the core's knobs (retry_s, refused_cooldown_s, missing_heartbeats).
        demand: drains the inference path's request counts per (tenant, model, origin, budget_ms)
            (``InferenceService.drain_demand``); None: no autoscaling.
        autoscale_interval_s, scale_in_after_s, demand_fast_s, demand_slow_s: the autoscaler's
            period, idle time before a scale-in (the cool-down) and the meter's time constants.
        plan_overhead_ms: cpn's own time the router counts in a budget (``core/overhead.py``):
            replicas are placed, and demand is met, for the network's share of each budget (the
            budget less this), as ``cpn sim`` does with its ``inference.overhead_ms``; 0 when the
            router checks the network RTT alone.
    """

    name = "deployments"

    def __init__(self, *, db: Callable[[], Any], registry: SiteRegistry, bus: Any,
                 layout: Callable[[], topo_layout.Layout], rtt: Callable[[], latency.RttIndex], clock: Clock,
                 tenant: Callable[[str], Mapping[str, Any] | None], known_models: Callable[[], frozenset[str]],
                 metrics: HubMetrics | None = None, interval_s: float = 0.5, full_replan_s: float = 5.0,
                 cmd_timeout_s: float = 2.0, settings: decide.Settings = decide.Settings(),
                 demand: Callable[[], Mapping[tuple[str, str, str, float], int]] | None = None,
                 autoscale_interval_s: float = 5.0, scale_in_after_s: float = 600.0, demand_fast_s: float = 60.0,
                 demand_slow_s: float = 900.0, plan_overhead_ms: float = 0.0) -> None:
        self._db = db
        self.plan_overhead_ms = plan_overhead_ms
        self.lending = False
        """Tidal lending is on: new replicas take ``settings.prefer_accelerators`` (inference's own
        types), then the types no waiting training gang accepts (``autoscale.lending_preference``)."""
        self.registry = registry
        self.bus = bus
        self._layout = layout
        self._rtt = rtt
        self.clock = clock
        self._tenant = tenant
        self._known_models = known_models
        self.metrics = metrics
        self.interval_s = interval_s
        self.full_replan_s = full_replan_s
        self.cmd_timeout_s = cmd_timeout_s
        self.settings = settings
        self.outbox: CommandOutbox | None = None
        self.deciding = False
        """Between :meth:`start` and :meth:`stop` (only while this process leads, under a leader)."""
        self.counters: Counter[str] = Counter()
        self._poked = asyncio.Event()
        self.tasks = BackgroundTasks("deployments")
        """The reconcile loop and the outbox sender."""
        self.memory = decide.Memory()
        """What the last reconcile handed to the next (core.deployments.Memory)."""
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
        """Deployments created by this process (exempt from the start-up grace)."""
        self._active_work = False
        self._demand = demand
        self.autoscale_interval_s = autoscale_interval_s
        self.scale_in_after_s = scale_in_after_s
        self.demand_fast_s = demand_fast_s
        self.demand_slow_s = demand_slow_s
        self._next_scale = 0.0
        self._meters: dict[str, autoscale.DemandMeter] = {}
        self._scale_memory: dict[str, autoscale.Memory] = {}

    def __repr__(self) -> str:
        c = self.counters
        return (f"<DeploymentService ticks={c['ticks']} plans={c['plans']} loads={c['loads_queued']} "
                f"unloads={c['unloads_queued']} illegal={c['illegal_transitions']}>")

    @property
    def db(self) -> Any:
        return self._db()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load the model-access table, start the outbox sender (re-sending what a previous run
        left pending) and the reconcile loop."""
        self.load_model_access()
        self._scopes.clear()
        self._grace_until = self.clock.time() + self.registry.detection_s
        self.outbox = CommandOutbox(
            self.db, self.bus, kinds=MODEL_KINDS, is_lost=self._site_is_lost, obsolete=self._obsolete,
            on_ack=self._on_ack, on_refused=self._on_refused, clock=self.clock.time, timeout_s=self.cmd_timeout_s)
        self.tasks.spawn(self.outbox.run(), name="outbox")
        self.tasks.spawn(self._loop(), name="reconcile")
        self.deciding = True

    async def stop(self) -> None:
        """Cancel the loop and the sender (pending commands stay in the outbox for the next start)."""
        self.deciding = False
        await self.tasks.close()
        if self.outbox is not None:
            await self.outbox.close()

    def poke(self) -> None:
        """Reconcile as soon as possible (a deployment, a site or a command result changed)."""
        self._epoch += 1
        self._poked.set()

    def on_site(self, t: Transition) -> None:
        """Site listener: a lost site's replicas become ``lost`` at once (Rule 3; ``site_lost`` is
        legal from every holding state, the only ones the store marks). Only the deciding process
        writes it: a gateway cut off from the others sees every site beyond the cut "lost", and its
        write, retried until the link heals, would mark healthy replicas lost."""
        if t.new == "lost" and self.db is not None and self.deciding:
            self.tasks.spawn(self._site_lost(t.site, t.at), name=f"site-lost-{t.site}")
        self.poke()

    async def _site_lost(self, site: str, now: float) -> None:
        """Its replicas marked lost, written awaited (the loop goes on while the record answers)."""
        affected = await write(self.db, lambda db: store.mark_site_lost(db, site, now=now))
        if affected:
            log.warning("event=replicas_lost site=%s deployments=%s", site, ",".join(affected))
        self.poke()

    async def _loop(self) -> None:
        while True:
            try:
                await self.reconcile_async(self.clock.time())
            except Exception:
                self.counters["errors"] += 1
                log.exception("event=reconcile_failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_s):
                    await self._poked.wait()
            self._poked.clear()

    # ------------------------------------------------------------------ API for the gateway and cpn up

    def validate(self, spec: core.DeploymentSpec) -> None:
        """Check a spec against the layout and the sites heard (``deployments.check_spec``)."""
        decide.check_spec(spec, self._layout(), self.registry.views)

    def create(self, tenant: str, spec: core.DeploymentSpec, *, deployment_id: str | None = None,
               idempotency_key: str | None = None) -> tuple[dict[str, Any], bool]:
        """:meth:`create_async` committed the blocking way (tests, a SQLite hub's callers that
        cannot await): on the replicated record the loop waits for the quorum."""
        now, commit = self._creation(tenant, spec, deployment_id, idempotency_key, self.deciding)
        with transaction(self.db):
            made = commit(self.db)
        return self._created(tenant, spec, made, now)

    async def create_async(self, tenant: str, spec: core.DeploymentSpec, *, deployment_id: str | None = None,
                           idempotency_key: str | None = None) -> tuple[dict[str, Any], bool]:
        """Record, plan and persist a new deployment; loads follow. One write (``store.db.write``,
        awaited: on the replicated record the loop goes on while a quorum acknowledges, through a
        stream election too): the deployment, its idempotency key *with its answer*, and, in the
        deciding process, its first plan with the loads it must send (decide, then do). The answer
        is given only once all of it is on a quorum. A process that does not decide (a gateway, a
        controller that does not lead) records the deployment alone; the leader's next pass plans it.
        So does a deciding process deposed without knowing it yet: its fenced write is refused
        (``RecordFenced``, nothing written) and goes again unfenced, without a plan.

        With ``idempotency_key``, a second call of ``tenant`` with the same key and an equal spec
        creates nothing and answers what the first call answered (its view, replicas as first
        planned), like ``POST /v1/jobs``; if that answer was never recorded (a deployment stored
        before answers were written with it), the deployment's current view.

        Returns:
            ``(view, replayed)``: ``replayed`` is True when the answer is a replay.

        Raises:
            RequestError: (400) the spec names an unknown origin, region or accelerator, or more cards
                than any site has.
            Unprocessable: (422) ``tenant`` used ``idempotency_key`` with another spec.
            RecordConflict: (409) another process wrote a row of it first; nothing was written.
            RecordUnavailable: (503) no quorum: the outcome is unknown, retry with the same key.
        """
        now, commit = self._creation(tenant, spec, deployment_id, idempotency_key, self.deciding)
        try:
            made = await write(self.db, commit, fenced=self.deciding)
        except RecordFenced:
            now, commit = self._creation(tenant, spec, deployment_id, idempotency_key, False)
            made = await write(self.db, commit, fenced=False)
        return self._created(tenant, spec, made, now)

    def _creation(self, tenant: str, spec: core.DeploymentSpec, deployment_id: str | None,
                  idempotency_key: str | None, deciding: bool) -> tuple[float, Callable[[Database], _Made]]:
        """The time of a creation and its transaction (it may run more than once: ``store.db.write``);
        ``deciding``: with the deployment's first plan."""
        self.validate(spec)
        dep_id = deployment_id or f"dep-{secrets.token_hex(6)}"
        now = self.clock.time()
        body_hash = spec_hash(spec) if idempotency_key is not None else ""

        def commit(db: Database) -> _Made:
            dep, replay = store.create_or_replay(
                db, deployment_id=dep_id, tenant=tenant, model=spec.model, spec=spec, now=now,
                idem_key=idempotency_key, body_hash=body_hash)
            if replay is not None:
                return _Made(dep, (replay.response if replay.response is not None else self._render(dep)), True, None)
            plan = None
            if deciding and self.outbox is not None:
                plan, _ = self._plan(now, dep.id)
                if plan_changes(plan):
                    self._persist(db, plan, now)
            view = self.view(tenant, dep.id)  # as this transaction leaves it: the replicas first planned
            if idempotency_key is not None:
                store.record_answer(db, tenant=tenant, idem_key=idempotency_key, response=view)
            return _Made(dep, view, False, plan)

        return now, commit

    def _created(self, tenant: str, spec: core.DeploymentSpec, made: _Made, now: float) -> tuple[dict[str, Any], bool]:
        """After a creation's commit: the access table, the plan's logs and counters, the loop poked."""
        dep = made.deployment
        if made.replayed:
            log.info("event=deployment_replayed deployment=%s tenant=%s", dep.id, tenant)
            return made.view, True
        self._own(tenant, spec.model, dep.id, True)
        if now < self._grace_until:
            self._fresh.add(dep.id)
        log.info("event=deployment_created deployment=%s tenant=%s model=%s", dep.id, tenant, spec.model)
        if made.plan is not None:
            self._planned(made.plan, now, dep.id)
        self.poke()
        return made.view, False

    def view(self, tenant: str | None, deployment_id: str) -> dict[str, Any]:
        """The deployment as the API shows it; NotFound if missing, deleted or not ``tenant``'s."""
        dep = store.get(self.db, deployment_id, tenant=tenant)
        if dep is None:
            raise NotFound(f"deployment {deployment_id!r} not found", field="id")
        return self._render(dep)

    def list_views(self, tenant: str) -> list[dict[str, Any]]:
        """A tenant's active deployments, oldest first."""
        return [self._render(d) for d in store.list_for_tenant(self.db, tenant)]

    def delete(self, tenant: str | None, deployment_id: str) -> None:
        """:meth:`delete_async` committed the blocking way (tests)."""
        now = self.clock.time()
        with transaction(self.db):
            dep, unloads = self._deletion(self.db, tenant, deployment_id, now, self.deciding)
        self._deleted(dep, unloads)

    async def delete_async(self, tenant: str | None, deployment_id: str) -> None:
        """Soft-delete a deployment and unplace its replicas, in one write awaited (the loop goes on
        while a quorum acknowledges); the deciding process queues their unloads in it (decide, then
        do: sent once it is on a quorum, retried until gone). Elsewhere the leader unloads what sites
        still report of a deleted deployment (``deployments.orphan_unloads``).

        Raises:
            NotFound: (404) missing, deleted or not ``tenant``'s.
            RecordConflict, RecordUnavailable: (409, 503) as :meth:`create_async`; nothing was deleted
                (or, for 503, the outcome is unknown: the delete may be sent again).
        """
        now = self.clock.time()
        try:
            dep, unloads = await write(self.db, lambda db: self._deletion(db, tenant, deployment_id, now, self.deciding),
                                       fenced=self.deciding)
        except RecordFenced:  # deposed without knowing it yet: the delete alone; the leader unloads
            dep, unloads = await write(self.db, lambda db: self._deletion(db, tenant, deployment_id, now, False),
                                       fenced=False)
        self._deleted(dep, unloads)

    def _deletion(self, db: Database, tenant: str | None, deployment_id: str,
                  now: float, deciding: bool) -> tuple[store.Deployment, int]:
        """The delete, the replicas' unplace and (deciding) their unloads, in the caller's transaction;
        the deployment and how many unloads were queued."""
        dep = store.get(db, deployment_id, tenant=tenant)
        if dep is None or not store.delete(db, deployment_id, tenant=tenant, now=now):
            raise NotFound(f"deployment {deployment_id!r} not found", field="id")
        outbox = self.outbox if deciding else None
        unloads = 0
        for rep in store.replicas_of(db, dep.id):
            if self._move(dep.id, rep.site, ReplicaEvent.UNPLACE, now) is not None and outbox is not None:
                outbox.add(rep.site, wire.UnloadModel(model=dep.model, deployment=dep.id), now)
                unloads += 1
        return dep, unloads

    def _deleted(self, dep: store.Deployment, unloads: int) -> None:
        self._own(dep.tenant, dep.model, dep.id, False)
        self.counters["unloads_queued"] += unloads
        if unloads and self.outbox is not None:
            self.outbox.kick()
        log.info("event=deployment_deleted deployment=%s tenant=%s", dep.id, dep.tenant)
        self.poke()

    async def deploy_demo(self, tenant: str, model: str) -> str:
        """``cpn up``'s demo: ``model`` over every origin of the layout, 0.25 cards, 10 ms, two cities.

        Idempotent: an active deployment of ``model`` by ``tenant`` is reused (across restarts too).
        Returns the deployment id ("" when the tenant does not exist).
        """
        layout = self._layout()
        for dep in store.list_for_tenant(self.db, tenant):
            if dep.model == model:
                return dep.id
        if self._tenant(tenant) is None:
            log.warning("event=demo_not_deployed tenant=%s reason=no such tenant", tenant)
            return ""
        spec = core.DeploymentSpec(model=model, origins=[o.id for o in layout.origins], budget_ms=10.0,
                                   cards_per_replica=0.25, min_cities=2, slots_per_replica=8)
        view, _ = await self.create_async(tenant, spec)
        return str(view["id"])

    def load_model_access(self) -> None:
        """Who may call which deployed model, from the record as it is now. Every process needs it
        (its gateway serves the models), leading or not: a process restarted on a projection that
        is already current hears of no deployment change, so the table cannot wait for one."""
        self._tenant_models.clear()
        self._tenant_deps.clear()
        for dep in store.list_active(self.db):
            self._own(dep.tenant, dep.model, dep.id, True)

    def models_for_tenant(self, tenant: str | None) -> list[str]:
        """Model ids ``GET /v1/models`` shows: the tenant's deployed models plus the sites' own it may use."""
        if tenant is None:
            return sorted(self._known_models())
        own = set(self._tenant_models.get(tenant, ()))
        return sorted(own | self._local_models(tenant))

    def model_access_changed(self, tenant: str, model: str, dep_id: str, active: bool) -> None:
        """Another hub process made (``active``) or deleted ``tenant``'s deployment ``dep_id`` of
        ``model`` (the replicated record told this one): who may call the model here changes too."""
        self._own(tenant, model, dep_id, active)

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
        registry = self.registry
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
        view = self.registry.get(site)
        if view is not None and view.city:
            return view.city
        try:
            return self._layout().site(site).city
        except KeyError:
            return ""

    def _render(self, dep: store.Deployment) -> dict[str, Any]:
        report = dep.report or {}
        view = {
            "id": dep.id,
            "object": "deployment",
            "model": dep.model,
            "owned_by": dep.tenant,
            "state": dep.state,
            "spec": dep.spec,
            "replicas": [
                {"site": r.site, "city": self._city(r.site), "accelerator": r.accelerator, "cards": r.cards,
                 "state": r.state}
                for r in store.replicas_of(self.db, dep.id)
            ],
            "coverage": report.get("coverage", {}),
            "uncovered": report.get("uncovered", []),
            "targets": report.get("targets", {}),
            "details": report.get("details", []),
            "notes": report.get("notes", []),
            "created_at": dep.created_at,
            "updated_at": dep.updated_at,
        }
        if "scaling" in report:
            view["scaling"] = report["scaling"]
        return view

    # ------------------------------------------------------------------ decide, then do

    def reconcile(self, now: float) -> None:
        """One decide-then-do pass, its changes committed the blocking way (tests; the loop
        awaits :meth:`reconcile_async`)."""
        if self._due(now):
            self._decide(now)

    async def reconcile_async(self, now: float) -> None:
        """One decide-then-do pass whose changes are written awaited (``store.db.write``, fenced):
        on the replicated record the loop goes on while they wait for a quorum, through a stream
        election too. The plan is written only if what it was decided from (deployments and
        replicas, ``store.marks``) is unchanged when the write runs; else nothing is written and
        the next pass decides again."""
        if not self._due(now):
            return
        plan, seen = self._plan(now, None)
        if not plan_changes(plan):
            self._planned(plan, now, None)
            return

        def commit(db: Database) -> bool:
            if store.marks(db) != seen:
                return False
            self._persist(db, plan, now)
            return True

        if not await write(self.db, commit):
            self.counters["plans_outdated"] += 1
            log.info("event=deployment_plan_outdated (the deployments changed while it waited; decided again)")
            self.poke()
            return
        self._planned(plan, now, None)

    def _due(self, now: float) -> bool:
        sig = (self.registry.version, self._epoch)
        scale_due = self._demand is not None and now >= self._next_scale
        if sig == self._last_sig and not self._active_work and now - self._last_full < self.full_replan_s \
                and not scale_due:
            return False
        self._last_sig = sig
        self._last_full = now
        self.counters["ticks"] += 1
        return True

    def _decide(self, now: float, only: str | None = None) -> None:
        plan, _ = self._plan(now, only)
        if plan_changes(plan):
            with transaction(self.db):
                self._persist(self.db, plan, now)
        self._planned(plan, now, only)

    def _plan(self, now: float, only: str | None) -> tuple[decide.Plan, tuple[tuple[Any, ...], ...]]:
        """A pass's plan, and the marks of what it read (one synchronous step: no await between)."""
        seen = store.marks(self.db)
        snap = self._snapshot(now, only)
        if only is None and self._demand is not None and now >= self._next_scale:
            self._next_scale = now + self.autoscale_interval_s
            snap = dataclasses.replace(snap, scaling=self._autoscale(now, snap))
        return decide.reconcile(snap, now), seen

    def _planned(self, plan: decide.Plan, now: float, only: str | None) -> None:
        """After a plan is written (or had nothing to write): its logs and counters, the sender kicked."""
        self._carried_out(plan)
        self.memory = self._with_cooldowns(plan.memory)
        if only is None:
            self._active_work = plan.active_work
            if now >= self._grace_until:
                self._fresh.clear()

    def _with_cooldowns(self, memory: decide.Memory) -> decide.Memory:
        """A plan's memory, with the cool-downs a refusal set since the plan read it (``_on_refused``):
        a pass whose write waited for the record (seconds without a quorum) must not forget them,
        or the refused site is planned, loaded and refused again at once."""
        newer = {k: t for k, t in self.memory.cooldown.items() if t > memory.cooldown.get(k, float("-inf"))}
        if not newer:
            return memory
        return msgspec.structs.replace(memory, cooldown={**memory.cooldown, **newer})

    def _network_share(self, spec: core.DeploymentSpec) -> core.DeploymentSpec:
        """``spec`` as it is planned: for the budget less cpn's own time (``plan_overhead_ms``)."""
        if not self.plan_overhead_ms:
            return spec
        return msgspec.structs.replace(spec, budget_ms=max(1e-3, spec.budget_ms - self.plan_overhead_ms))

    def _snapshot(self, now: float, only: str | None) -> decide.Snapshot:
        db, layout = self.db, self._layout()
        rows = store.list_active(db)
        deps = [decide.Deployment(id=d.id, tenant=d.tenant, model=d.model, state=d.state, report=d.report,
                                  spec=self._network_share(msgspec.convert(d.spec, core.DeploymentSpec)))
                for d in rows]
        replicas = {d.id: [decide.Replica(deployment=r.deployment, site=r.site, accelerator=r.accelerator,
                                          cards=r.cards, state=ReplicaState(r.state))
                           for r in store.replicas_of(db, d.id)] for d in rows}
        regions: dict[str, list[str]] = {}
        for o in layout.origins:
            regions.setdefault(o.region, []).append(o.id)
        quotas = {t: (self._tenant(t) or {}).get("quota_cards") for t in {d.tenant for d in rows}}
        training: Mapping[str, int] = {}
        if any(q is not None for q in quotas.values()):
            training = store_jobs.held_cards_by_tenant(db, (s.value for s in lifecycle.LIVE))
        return decide.Snapshot(
            deployments=deps, replicas=replicas, sites=layout.sites, views=self.registry.views, rtt=self._rtt(),
            regions=regions, weights={o.id: o.weight for o in layout.origins}, quota_cards=quotas,
            training_cards={t: float(n) for t, n in training.items()}, ours=self._ours({d.id for d in rows}),
            pending=frozenset((_KIND[k], j, s) for k, j, s in store_outbox.pending_keys(db, MODEL_KINDS)),
            memory=self.memory, grace_until=self._grace_until, fresh=frozenset(self._fresh), only=only,
            settings=self.settings)

    def _autoscale(self, now: float, snap: decide.Snapshot) -> dict[str, autoscale.ScalePlan]:
        """Rule 6: fold the demand counted since the last call into each scaling deployment's meter
        and ask ``autoscale.decide`` what to add and remove."""
        assert self._demand is not None
        counts: dict[tuple[str, str], dict[tuple[str, float], int]] = {}
        for (tenant, model, origin, budget_ms), n in self._demand().items():
            per = counts.setdefault((tenant, model), {})
            share = max(1e-3, budget_ms - self.plan_overhead_ms) if self.plan_overhead_ms else budget_ms
            per[(origin, share)] = per.get((origin, share), 0) + n
        scaling = [d for d in snap.deployments if d.spec.scales]
        for gone in set(self._meters) - {d.id for d in scaling}:
            self._meters.pop(gone, None)
            self._scale_memory.pop(gone, None)
        if not scaling:
            return {}
        models = {d.id: d.model for d in snap.deployments}
        holding = [r for d in snap.deployments for r in snap.replicas.get(d.id, ()) if r.state in HOLDING]
        cands = decide.planning_candidates(
            snap.sites, snap.views,
            (decide.Holding(r.deployment, models[r.deployment], r.site, r.accelerator, r.cards) for r in holding))
        tier = {c.id: c.tier for c in cands}
        prefer = self.settings.prefer_accelerators
        if self.lending:  # then the types no waiting gang accepts: lendable cards stay free
            prefer = autoscale.lending_preference(
                prefer, (a for site in snap.sites for a in site.accelerators),
                store_jobs.accelerators_wanted(self.db, lifecycle.WAITING))
        scaled = store.scaled_replicas(self.db)  # what the autoscaler added, by whichever leader
        out: dict[str, autoscale.ScalePlan] = {}
        for dep in scaling:
            spec = dep.spec
            mine = [r for r in snap.replicas.get(dep.id, ()) if r.state in HOLDING]
            times = [v.service_ms_p50 for r in mine if (v := snap.views.get(r.site)) is not None
                     and v.service_ms_p50 > 0 and decide.shows(v, dep.model, dep.id) is not None]
            meter = self._meters.get(dep.id)
            if meter is None:
                meter = self._meters[dep.id] = autoscale.DemandMeter(fast_s=self.demand_fast_s, slow_s=self.demand_slow_s)
            meter.observe(now, counts.get((dep.tenant, dep.model), {}),
                          sum(times) / len(times) / 1000.0 if times else None)
            reps = [autoscale.Replica(
                site=r.site, tier=tier.get(r.site, "edge"), state="ready" if r.state is ReplicaState.READY else "loading",
                slots=spec.slots_per_replica, accelerator=r.accelerator,
                added_at=scaled.get((dep.id, r.site), 0.0), protected=(dep.id, r.site) not in scaled)
                for r in mine]
            knobs = autoscale.ScaleSpec(
                model=dep.model, cards_per_replica=spec.cards_per_replica, slots_per_replica=spec.slots_per_replica,
                accelerators=spec.accelerators, min_replicas=spec.min_replicas or 0, max_replicas=spec.max_replicas,
                scale_in_after_s=self.scale_in_after_s)
            plan = autoscale.decide(now, knobs, meter.demand(), reps, cands, snap.rtt,
                                    self._scale_memory.get(dep.id, autoscale.Memory()), prefer=prefer)
            self._scale_memory[dep.id] = plan.memory
            out[dep.id] = plan
            for a in plan.add:
                log.info("event=scale_out deployment=%s site=%s reason=%r", dep.id, a.site, a.reason)
            for r in plan.remove:
                log.info("event=scale_in deployment=%s site=%s reason=%r", dep.id, r.site, r.reason)
        return out

    def _ours(self, active: set[str]) -> frozenset[str]:
        """Deleted deployments of ours that sites still report (the store is asked once per id)."""
        out = set()
        for view in self.registry:
            for status in view.replicas.values():
                dep_id = status.deployment
                if dep_id in active or dep_id in LOCAL_DEPLOYMENTS:
                    continue
                known = self._foreign.get(dep_id)
                if known is None:
                    if len(self._foreign) > 10_000:
                        self._foreign.clear()
                    known = wire.is_valid_id(dep_id) and store.get(self.db, dep_id, include_deleted=True) is not None
                    self._foreign[dep_id] = known
                if known:
                    out.add(dep_id)
        return frozenset(out)

    def _persist(self, db: Database, plan: decide.Plan, now: float) -> None:
        """The plan's state changes and its commands, in the caller's transaction (a pass that
        changes nothing, the usual one, opens none: ``plan_changes``)."""
        assert self.outbox is not None
        for c in plan.replicas:
            if c.event is ReplicaEvent.PLACE:
                store.upsert_replicas(db, c.deployment, [(c.site, c.accelerator, c.cards)], now=now,
                                      scaled_at=now if c.reason.startswith("scale out:") else None)
            else:
                store.set_replica_state(db, c.deployment, c.site, c.new.value, now=now,
                                        expect=None if c.old is None else c.old.value)
        for d in plan.deployments:
            store.set_state(db, d.deployment, d.new, report=d.report, now=now)
        for load in plan.loads:
            self.outbox.add(load.site, load.command, now)
        for unload in plan.unloads:
            self.outbox.add(unload.site, unload.command, now)

    def _carried_out(self, plan: decide.Plan) -> None:
        """A persisted plan's counters and logs; the sender kicked."""
        assert self.outbox is not None
        self.counters["plans"] += len(plan.planned)
        self.counters["loads_queued"] += len(plan.loads)
        self.counters["unloads_queued"] += len(plan.unloads)
        for why in plan.illegal:
            self._illegal(why)
        for dep_id, rp in plan.planned:
            if rp.add or rp.remove:
                log.info("event=deployment_planned deployment=%s add=%s remove=%s uncovered=%d", dep_id,
                         ",".join(p.site for p in rp.add) or "-", ",".join(rp.remove) or "-", len(rp.uncovered))
        for c in plan.replicas:
            level = logging.WARNING if c.event is ReplicaEvent.REPORTED_FAILED else logging.INFO
            log.log(level, "event=replica_%s deployment=%s site=%s state=%s reason=%r", c.event.value, c.deployment,
                    c.site, c.new.value, c.reason)
        for d in plan.deployments:
            if d.new != d.old:
                log.info("event=deployment_state deployment=%s state=%s was=%s", d.deployment, d.new, d.old)
        if plan.loads or plan.unloads:
            self.outbox.kick()

    def _illegal(self, why: str) -> None:
        self.counters["illegal_transitions"] += 1
        if self.metrics is not None:
            self.metrics.illegal_transition("replica")
        log.warning("event=illegal_transition lifecycle=replica detail=%r", why)

    def _move(self, dep_id: str, site: str, event: ReplicaEvent, now: float, *,
              only_from: frozenset[ReplicaState] | None = None) -> ReplicaState | None:
        """Apply ``event`` to one stored replica by the table (in the caller's transaction); the new
        state, or None when it is not in ``only_from`` (a stale answer) or the table refuses it."""
        rep = next((r for r in store.replicas_of(self.db, dep_id, include_removed=True) if r.site == site), None)
        if rep is None:
            return None
        old = ReplicaState(rep.state)
        if only_from is not None and old not in only_from:
            return None
        try:
            new = transition(old, event)
        except IllegalReplicaTransition as exc:
            self._illegal(f"deployment {dep_id} site {site}: {exc}")
            return None
        store.set_replica_state(self.db, dep_id, site, new.value, now=now, expect=old.value)
        return new

    # ------------------------------------------------------------------ outbox callbacks

    def _site_is_lost(self, site: str) -> bool:
        view = self.registry.get(site)
        return view is not None and view.state == "lost"

    def _obsolete(self, entry: OutboxRow, cmd: Any, now: float) -> str | None:
        if not isinstance(cmd, wire.LoadModel):
            return None  # unloading is never obsolete; it expires instead
        dep = store.get(self.db, cmd.deployment)
        if dep is None:
            return "deployment deleted"
        rep = next((r for r in store.replicas_of(self.db, dep.id) if r.site == entry.site), None)
        if rep is None or rep.state != ReplicaState.PLACED:
            return f"replica at {entry.site} is {rep.state if rep else 'gone'}"
        return None

    async def _on_ack(self, entry: OutboxRow, cmd: Any, ack: wire.Ack, now: float) -> None:
        if isinstance(cmd, wire.UnloadModel):
            self.counters["unloads_sent"] += 1
            return
        if not isinstance(cmd, wire.LoadModel):
            return
        self.counters["loads_sent"] += 1
        new = await write(self.db, lambda db: self._move(cmd.deployment, entry.site, ReplicaEvent.ACCEPTED, now,
                                                         only_from=frozenset({ReplicaState.PLACED})))
        view = self.registry.get(entry.site)
        if new is not None and view is not None:
            seen = dict(self.memory.seen_hb)
            seen[(cmd.deployment, entry.site)] = view.heartbeats
            self.memory = msgspec.structs.replace(self.memory, seen_hb=seen)
        self.poke()

    async def _on_refused(self, entry: OutboxRow, cmd: Any, why: str, now: float) -> None:
        """A load or unload refused (or given up); a load's replica moves by the table, written
        awaited (its sender waits for the quorum, the loop does not)."""
        kind = "load" if isinstance(cmd, wire.LoadModel) else "unload"
        self.counters[f"{kind}s_refused"] += 1
        log.warning("event=%s_refused deployment=%s site=%s error=%s", kind, getattr(cmd, "deployment", ""),
                    entry.site, why)
        if not isinstance(cmd, wire.LoadModel):
            return
        code = why.split(":", 1)[0].strip()

        def event_of(db: Database) -> ReplicaEvent | None:
            rep = next((r for r in store.replicas_of(db, cmd.deployment) if r.site == entry.site), None)
            return decide.after_refusal(ReplicaState(rep.state), code) if rep is not None else None

        def commit(db: Database) -> ReplicaState | None:
            event = event_of(db)
            return None if event is None else self._move(cmd.deployment, entry.site, event, now)

        if event_of(self.db) is not None:
            # The site refused: it cools for the deployment now, before the write, which may fail
            # with its outcome unknown (no quorum) and land later: a cool-down set only after an
            # acknowledged write was missed then, and the site planned, loaded and refused again.
            # A replica still placed there (the write lost) is not blocked by it: it is loaded again.
            cooldown = dict(self.memory.cooldown)
            cooldown[(cmd.deployment, entry.site)] = now + self.settings.refused_cooldown_s
            self.memory = msgspec.structs.replace(self.memory, cooldown=cooldown)
        try:
            await write(self.db, commit)
        finally:
            self.poke()

