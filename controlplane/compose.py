"""The composition root: the one place that builds a hub process from its parts.

It builds the parts (config, clock, layout and RTT index, router, site registry, record, bus,
metrics, the process's task owner), then each service with exactly the parts it uses (``services/``),
records them in the typed :class:`~controlplane.services.record.Services`, and hands the hub
(``hub.py``) the function that starts the gateway (``gateway/``) with that record. Nothing below this
module imports it; it alone imports every layer, so no layer has to import the one above it
(tests/unit/test_import_rules.py).

``cpn hub``, ``cpn up`` and the tests all build through here, so they run the same hub. A
gateway-only or a controller-only process is another function here that composes a different
subset of the same parts (docs/architecture.md, "Processes are compositions").
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from controlplane.config import AutoscaleConfig, HubConfig
from controlplane.core import auth, overhead
from controlplane.core.clock import Clock
from controlplane.core.errors import RequestError
from controlplane.core.ratelimit import TokenBuckets
from controlplane.core.registry import SiteRegistry
from controlplane.core.router import for_gateway as router_for_gateway
from controlplane.gateway import cluster as cluster_api
from controlplane.gateway import dashboard as dashboard_api
from controlplane.gateway import deployments as deployments_api
from controlplane.gateway import jobs as jobs_api
from controlplane.gateway import market as market_api
from controlplane.gateway import server
from controlplane.gateway import sites as sites_api
from controlplane.hub import Hub
from controlplane.metrics import HubMetrics
from controlplane.nats.bus import HubBus
from controlplane.readiness import Readiness
from controlplane.runtime import BackgroundTasks, TaskScope, WallClock
from controlplane.services import deployments, handover, market, training
from controlplane.services.accounting import UsageAccounts
from controlplane.services.dashboard_history import DashboardHistory
from controlplane.services.demand_share import DemandShare, LearntDemand
from controlplane.services.waits import WaitShare
from controlplane.services.job_feed import JobFeed
from controlplane.services.job_views import JobViews
from controlplane.services.inference import InferenceService, RequestIds
from controlplane.services.leadership import Leadership
from controlplane.services.record import Services
from controlplane.services.sites import SiteService
from controlplane.services.status import ProcessStatus
from controlplane.services.tenancy import TenancyService
from controlplane.store.handle import Store
from controlplane.replicated.bridge import RecordBridge
from controlplane.replicated.kv import Fence
from controlplane import scrape
from edge_agent import wire
from topology import latency, loader
from topology import layout as topo_layout


@dataclass(frozen=True, slots=True)
class HubProcess:
    """A hub and the record of its services (``await hub.start()`` next)."""

    hub: Hub
    services: Services


def _bus(config: HubConfig, sites: list[SiteService], tasks: TaskScope,
         layout: topo_layout.Layout | None = None) -> HubBus:
    """The hub's NATS adapter; what sites send goes to the site service (built next, hence the list)."""

    def event_region_of(site: str) -> str | None:
        region = layout.region_of_site(site) if layout is not None and layout.has_site(site) else None
        return region if region in config.event_regions else None

    def on_register(msg: wire.Register) -> wire.RegisterAck | wire.ErrorReply:
        return sites[0].on_register(msg)

    def on_heartbeat(msg: wire.Heartbeat) -> None:
        sites[0].on_heartbeat(msg)

    return HubBus(
        config.nats_url,
        name=f"cpn-hub-{config.hub_id}",
        user=config.nats_user,
        password=config.nats_password,
        on_register=on_register,
        on_heartbeat=on_heartbeat,
        on_disconnect=lambda: sites[0].on_bus_down(),
        on_reconnect=lambda: sites[0].on_bus_up(),
        ping_interval_s=config.nats_ping_interval_s,
        max_outstanding_pings=config.nats_max_outstanding_pings,
        strict_inboxes=config.strict_inboxes if config.strict_inboxes is not None else bool(config.nats_user),
        site_limits=config.site_limits,
        tls_ca=config.nats_tls_ca,
        tls_cert=config.nats_tls_cert,
        tls_key=config.nats_tls_key,
        tasks=tasks,
        event_region_of=event_region_of,
    )


def build(config: HubConfig, *, layout: topo_layout.Layout | None = None, clock: Clock | None = None) -> HubProcess:
    """The hub (gateway and controller in one process) with every service and its routes."""
    clock = clock or WallClock()
    if layout is None:
        layout = loader.load(config.layout) if config.layout else loader.load_default()
    rtt = latency.RttIndex.build(layout)
    router = router_for_gateway(layout, rtt, config.gateway_city)
    registry = SiteRegistry(heartbeat_s=config.heartbeat_s, miss_limit=config.miss_limit)
    # With record = "nats" the store is this process's projection of the replicated record; rows
    # other processes write there drop what tenancy caches of them (tenancy is built below, before
    # the process starts and opens the store).
    bridges: list[RecordBridge] = []  # the store's link to the replicated record, once opened
    def record_changed(table: str, row: dict[str, Any]) -> None:
        """A row another process wrote reached this one's record: drop cached keys and tenants, and
        a deployment made or deleted elsewhere changes its tenant's model access here too."""
        tenancy.record_changed(table, row)
        if waits is not None:
            waits.record_changed(table, row)
        if table == "deployments" and {"tenant", "model", "id", "state"} <= row.keys():
            deployer.model_access_changed(row["tenant"], row["model"], row["id"], row["state"] != "deleted")

    store = Store(config.db_path, opener=(lambda: open_replicated_store(config, record_changed, bridges))
                  if config.record == "nats" else None)
    metrics = HubMetrics()
    tasks = BackgroundTasks("hub")
    wants_sites: list[SiteService] = []
    bus = _bus(config, wants_sites, tasks.scope("bus"), layout)
    readiness = Readiness(store=store, bus=bus)

    sites = SiteService(config=config, layout=layout, rtt=rtt, router=router, registry=registry, store=store,
                        bus=bus, metrics=metrics, clock=clock, tasks=tasks.scope("sites"))
    wants_sites.append(sites)
    tenancy = TenancyService(store=store, keys=auth.KeyRing(clock=clock.time),
                             rate_limiter=TokenBuckets(config.default_rate_per_s, config.default_burst),
                             clock=clock, metrics=metrics)
    accounting = UsageAccounts(store=store, metrics=metrics, clock=clock, tasks=tasks.scope("accounting"),
                               flush_s=config.usage_flush_s, process=config.hub_id)
    inference = InferenceService(registry=registry, router=router, origin_ids=sites.origin_ids,
                                 known_models=sites.known_models, bus=bus, accounting=accounting, metrics=metrics,
                                 clock=clock, rng=random.Random(config.seed), site_timeout_s=config.site_timeout_s,
                                 site_ack_timeout_s=config.site_ack_timeout_s,
                                 budget_counts_overhead=config.budget_counts_overhead)
    status = ProcessStatus(hub_id=config.hub_id, bus=bus, registry=registry, readiness=readiness, metrics=metrics,
                           refresh_metrics=sites.refresh_metrics, clock=clock)
    history = DashboardHistory(registry=registry, store=store, clock=clock, tasks=tasks.scope("dashboard"))
    sites.listeners.append(history.on_site)

    services: Services | None = None
    # sites_api: operator declarations; dashboard_api: the operator page and its data
    extra_routes = [deployments_api, jobs_api, sites_api, dashboard_api, market_api, cluster_api]

    async def serve_http(host: str, port: int) -> server.GatewayServer:
        assert services is not None  # built below, before anyone can start the hub
        return await server.start(services, host, port, extra_routes=extra_routes)

    hub = Hub(config=config, clock=clock, layout=layout, rtt=rtt, router=router, registry=registry, store=store,
              bus=bus, metrics=metrics, tasks=tasks, readiness=readiness, status=status, sites=sites, tenancy=tenancy,
              accounting=accounting, inference=inference, serve_http=serve_http)
    for part in (tenancy, sites, accounting, history):
        hub.add_service(part)
    # sites, cards, replicas, jobs, deployments, NATS counters: read at scrape time
    hub_state = scrape.HubState(config=config, bus=bus, registry=registry, store=store, readiness=readiness,
                                inference=inference, clock=clock, permission_violations=lambda: hub.permission_violations,
                                role=config.role)
    metrics.add_collector(hub_state)
    # Who decides (services/leadership.py): the deciding services run only while this process leads;
    # the leader's epoch goes on every command the bus sends, its fence on every commit of the record.
    def stamp(epoch: int) -> None:
        bus.epoch = lambda: epoch

    def fence_commits(fence: Fence | None) -> None:
        for bridge in bridges:
            bridge.fence = fence

    def leading_changed(leading: bool, epoch: int) -> None:
        metrics.leading.labels(config.role).set(1 if leading else 0)
        metrics.leader_epoch.set(epoch)

    def listening() -> str:
        return f"{config.listen_host}:{hub.http_port}" if hub.http_port else ""

    leadership = Leadership(
        mode=("sole" if config.record == "sqlite" else "never" if config.role == "gateway" else "elected"),
        hub_id=config.hub_id, role=config.role, clock=clock, tasks=tasks.scope("leadership"),
        record_urls=record_connection(config)[0] if config.record == "nats" else (), set_epoch=stamp,
        record_connect=record_connection(config)[1] if config.record == "nats" else None,
        set_fence=fence_commits, listen=listening, on_change=leading_changed)
    metrics.add_collector(scrape.LeadershipState(lambda: leadership.elector))  # takeovers, ride-outs, changes
    hub_state.is_leader = lambda: leadership.leading  # cpn_leader: this process, not "always" (a single hub always is)
    tenancy.gateways = lambda: leadership.gateways  # each gateway enforces its share of a tenant's rate
    # Demand counts: a gateway publishes its own, a hub or controller adds what gateways publish.
    share = DemandShare(hub_id=config.hub_id, role=config.role, bus=bus, local=inference.drain_demand, clock=clock,
                        interval_s=config.autoscale.interval_s)
    hub.add_service(share)
    # Tidal lending's forecast is learnt from the same counts, per region, by local hour.
    origin_region = {o.id: o.region for o in layout.origins}
    learnt = LearntDemand(region_of_origin=origin_region.get, region_of_site=lambda s: _region_of_site(layout, s),
                          clock=clock)
    deployer = install_deployments(hub, store=store, layout=layout, rtt=rtt, sites=sites, tenancy=tenancy, clock=clock,
                                   demand=learnt.tap(share.drain), autoscale=config.autoscale,
                                   plan_overhead_ms=overhead.FLOOR_MS if config.budget_counts_overhead else 0.0)
    if config.lending.enabled:  # new replicas take the types inference keeps first (lendable cards stay free)
        deployer.settings = msgspec.structs.replace(deployer.settings,
                                                    prefer_accelerators=tuple(config.lending.inference_first))
        deployer.lending = True
    trainer = install_training(hub, store=store, layout=layout, sites=sites, tenancy=tenancy, clock=clock)
    trainer.lending_profiles = learnt.site_profiles
    waits: WaitShare | None = None
    if config.record == "nats":  # each process its own SQLite: the leader's wait reasons reach the others
        waits = WaitShare(hub_id=config.hub_id, bus=bus, db=lambda: store.db, epoch=lambda: leadership.epoch,
                          leading=lambda: leadership.leading, clock=clock)
        trainer.waits_out = waits.publish
        hub.add_service(waits)
    # The market prices the usage flush and training's metering (in their transactions).
    seller = market.install(market.MarketService(store=store, tenancy=tenancy, sites=sites,
                                                 accounting=accounting, clock=clock, training=trainer),
                            accounting, trainer)
    hub.add_service(seller)
    feed = JobFeed(store=store, training=trainer, clock=clock)
    trainer.tick_listeners.append(feed.record_progress)
    for service in (deployer, trainer):
        hub.services.remove(service)
        leadership.follow(service)
    hub.add_service(_ModelAccess(deployer))  # every process's gateway serves the deployed models, leading or not
    # Handover (services/handover.py): a new leader sends again what the record says was decided
    # but its own outbox never held; a process that stops leading stops taking sites' events.
    leadership.on_lead.append(lambda epoch: handover.rebuild_starts_awaited(trainer, clock.time()))

    async def announce_epoch(epoch: int) -> None:
        notice = wire.LeaderEpoch(epoch=epoch, hub=config.hub_id)
        for view in list(registry):
            await bus.publish_command(view.id, notice)

    def announce(epoch: int) -> None:
        """A new leader says its epoch to every site it knows at once (``wire.LeaderEpoch``): a
        deposed leader's command is then refused there before this one has sent anything. In the
        background: taking the lead (under the leadership's lock) never waits on NATS for it."""
        if epoch:
            tasks.spawn(asyncio.wait_for(announce_epoch(epoch), 10.0), name="announce-epoch")

    leadership.on_lead.insert(0, announce)
    leadership.on_step_down.append(bus.stop_consuming)
    bus.deciding = leadership.deciding
    hub.add_service(leadership)
    services = Services(
        inference=inference,
        deployments=deployer,
        training=trainer,
        leadership=leadership,
        dashboard=history,
        job_views=JobViews(sites=sites, training=trainer, clock=clock),
        job_feed=feed,
        market=seller,
        tenancy=tenancy,
        sites=sites,
        accounting=accounting,
        status=status,
        config=config,
        metrics=metrics,
        clock=clock,
        request_ids=RequestIds(),
    )
    return HubProcess(hub=hub, services=services)


def install_deployments(hub: Hub, *, store: Store, layout: topo_layout.Layout, rtt: latency.RttIndex,
                        sites: SiteService, tenancy: TenancyService, clock: Clock,
                        demand: Callable[[], Mapping[tuple[str, str, str, float], int]] | None = None,
                        autoscale: AutoscaleConfig = AutoscaleConfig(),
                        plan_overhead_ms: float = 0.0) -> deployments.DeploymentService:
    """The deployments service, built from exactly what it uses and plugged into ``hub`` (installed
    before training, as ever: start order). Its routes (``gateway/deployments.py``) are added by
    :func:`build`."""
    service = deployments.DeploymentService(
        db=lambda: store.db, registry=hub.registry, bus=hub.bus, layout=lambda: layout, rtt=lambda: rtt, clock=clock,
        tenant=tenancy.tenant, known_models=sites.known_models, metrics=hub.metrics, demand=demand,
        autoscale_interval_s=autoscale.interval_s, scale_in_after_s=autoscale.scale_in_after_s,
        demand_fast_s=autoscale.demand_fast_s, demand_slow_s=autoscale.demand_slow_s,
        plan_overhead_ms=plan_overhead_ms)
    hub.add_service(service)
    sites.listeners.append(service.on_site)
    return service


def _region_of_site(layout: topo_layout.Layout, site: str) -> str | None:
    return layout.site(site).region if layout.has_site(site) else None


def install_training(hub: Hub, *, store: Store, layout: topo_layout.Layout, sites: SiteService,
                     tenancy: TenancyService, clock: Clock) -> training.TrainingService:
    """The training service, built from exactly what it uses and plugged into ``hub`` (after
    deployments: start order). Its routes (``gateway/jobs.py``) are added by :func:`build`."""
    service = training.TrainingService(
        db=lambda: store.db, bus=hub.bus, registry=hub.registry, layout=lambda: layout, clock=clock,
        metrics=hub.metrics, config=hub.config, tenant=tenancy.tenant)
    hub.add_service(service)
    sites.listeners.append(service.on_site)
    return service


def build_hub(config: HubConfig, *, layout: topo_layout.Layout | None = None, clock: Clock | None = None) -> Hub:
    """:func:`build`'s hub (``cpn hub``, the tests)."""
    return build(config, layout=layout, clock=clock).hub


def record_urls(config: HubConfig) -> list[str]:
    """NATS URLs of the cluster holding the replicated record."""
    return config.record_nats_urls or [u.strip() for u in config.nats_url.split(",") if u.strip()]


def record_connection(config: HubConfig) -> tuple[list[str], dict[str, Any]]:
    """URLs and ``nats.connect`` options of this process's connections to the record: its own NATS
    identity (``nats_user``) and TLS files (``nats_tls_*``), as its bus uses them, so a record on
    servers with cpn's identities and TLS (``cpn deploy nats-config``) opens. User info in a URL of
    ``record_nats_urls`` still wins (nats-py prefers it).

    Raises:
        RequestError: a TLS file is missing or not PEM.
    """
    from edge_agent import tls

    urls = record_urls(config)
    options: dict[str, Any] = {}
    if config.nats_user:
        options.update(user=config.nats_user, password=config.nats_password or "")
    if config.nats_tls_ca:
        try:
            options["tls"] = tls.client_context(config.nats_tls_ca, config.nats_tls_cert, config.nats_tls_key)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise RequestError(f"NATS TLS files: {exc}") from None
        urls = ["tls://" + u.split("://", 1)[-1] for u in urls]  # never in clear to a server without TLS
    return urls, options


async def open_replicated_store(config: HubConfig, on_change: Callable[[str, dict[str, Any]], None],
                                bridges: list[RecordBridge]) -> Any:
    """The store of a process on the replicated record (``record = "nats"``): its SQLite file as a
    projection of the ``CPN_RECORD`` bucket; ``on_change`` hears of every row another process wrote;
    the link to the record is added to ``bridges`` (the leader's fence goes there)."""
    from controlplane.store import replica

    urls, connect = record_connection(config)
    bridge = RecordBridge(urls, write_deadline_s=config.record_write_deadline_s,
                          name=f"cpn-record-{config.hub_id}", connect=connect)
    bridges.append(bridge)
    try:
        db = await replica.open_replicated(config.db_path, bridge, config.hub_id)
    except BaseException:
        bridges.remove(bridge)  # closed: the next attempt (Hub.start waits for quorum) makes another
        raise
    assert db.write_hook is not None
    db.write_hook.listeners.append(on_change)
    db.write_hook.pipelined = config.record_pipelined_writes
    return db


class _ModelAccess:
    """Loads the deployments' model-access table when the process starts, whether or not it leads
    (the deployments service itself runs only on the leader)."""

    name = "model_access"

    def __init__(self, deployer: deployments.DeploymentService) -> None:
        self.deployer = deployer

    async def start(self) -> None:
        self.deployer.load_model_access()

    async def stop(self) -> None:
        return None
