"""The composition root: the one place that builds a hub process from its parts.

It builds the hub (store, bus, registry, router: ``hub.py``), installs the services (training,
deployments; ``services/``), adds their HTTP routes (``gateway/``) and hands the hub the function that
starts the gateway. Nothing below this module imports it; it alone imports every layer, so no layer
has to import the one above it (tests/unit/test_import_rules.py).

``cpn hub``, ``cpn up`` and the tests all call :func:`build_hub`, so they run the same hub. A
gateway-only or a controller-only process is another function here that composes a different
subset of the same parts.
"""

from __future__ import annotations

from controlplane.config import HubConfig
from controlplane.gateway import deployments as deployments_api
from controlplane.gateway import jobs as jobs_api
from controlplane.gateway import server
from controlplane.gateway import sites as sites_api
from controlplane.hub import Hub
from controlplane.services import deployments, training
from topology import layout as topo_layout


def build_hub(config: HubConfig, *, layout: topo_layout.Layout | None = None) -> Hub:
    """A hub with every service and the gateway (``cpn hub``, ``cpn up``, the tests); ``await hub.start()`` next."""
    hub = Hub(config, layout=layout, serve_http=server.start)
    install_services(hub)
    return hub


def install_services(hub: Hub) -> None:
    """Attach the services and their routes to ``hub`` (before ``start``)."""
    deployments.install(hub)
    hub.route_modules.append(deployments_api)
    training.install(hub)
    hub.route_modules.append(jobs_api)
    hub.route_modules.append(sites_api)  # operator declarations of sites
