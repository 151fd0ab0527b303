"""The composition root: the one place that builds a hub process from its parts.

It builds the hub (store, bus, registry, router: ``hub.py``), installs the services (training,
deployments; ``services/``), records them in the typed :class:`~controlplane.services.record.Services`,
adds their HTTP routes (``gateway/``) and hands the hub the function that starts the gateway with
that record. Nothing below this module imports it; it alone imports every layer, so no layer has to
import the one above it (tests/unit/test_import_rules.py).

``cpn hub``, ``cpn up`` and the tests all build through here, so they run the same hub. A
gateway-only or a controller-only process is another function here that composes a different
subset of the same parts.
"""

from __future__ import annotations

from dataclasses import dataclass

from controlplane.config import HubConfig
from controlplane.gateway import dashboard as dashboard_api
from controlplane.gateway import deployments as deployments_api
from controlplane.gateway import jobs as jobs_api
from controlplane.gateway import server
from controlplane.gateway import sites as sites_api
from controlplane.hub import Hub
from controlplane.runtime import WallClock
from controlplane.services import deployments, training
from controlplane.services.dashboard_history import DashboardHistory
from controlplane.services.record import Services
from topology import layout as topo_layout


@dataclass(frozen=True, slots=True)
class HubProcess:
    """A hub and the record of its services (``await hub.start()`` next)."""

    hub: Hub
    services: Services


def build(config: HubConfig, *, layout: topo_layout.Layout | None = None) -> HubProcess:
    """The hub (gateway and controller in one process) with every service and its routes."""
    services: Services | None = None

    async def serve_http(hub: Hub, host: str, port: int) -> server.GatewayServer:
        assert services is not None  # built below, before anyone can start the hub
        return await server.start(hub, services, host, port)

    clock = WallClock()
    hub = Hub(config, layout=layout, serve_http=serve_http, clock=clock)
    history = DashboardHistory(hub)
    hub.add_service(history)
    hub.site_listeners.append(history.on_site)
    jobs = training.TrainingService(
        db=lambda: hub.db, bus=hub.bus, registry=hub.registry, layout=lambda: hub.layout, clock=clock,
        metrics=hub.metrics, config=config, tenant=hub.tenant)
    hub.add_service(jobs)
    hub.site_listeners.append(jobs.on_site)
    services = Services(
        inference=hub.inference,
        deployments=deployments.install(hub, clock),
        training=jobs,
        dashboard=history,
    )
    # sites_api: operator declarations; dashboard_api: the operator page and its data
    hub.route_modules.extend([deployments_api, jobs_api, sites_api, dashboard_api])
    return HubProcess(hub=hub, services=services)


def build_hub(config: HubConfig, *, layout: topo_layout.Layout | None = None) -> Hub:
    """:func:`build`'s hub (``cpn hub``, the tests)."""
    return build(config, layout=layout).hub
