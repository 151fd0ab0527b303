"""Which services a hub runs: the one place that plugs training, deployments and usage into a Hub.

``cpn hub``, ``cpn up`` and the tests all call :func:`install_services`, so they run the same hub.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from controlplane.hub import Hub


def install_services(hub: Hub) -> None:
    """Attach every optional service that exists in this build to ``hub`` (before ``start``)."""
    from controlplane.services import deployments, training
    from controlplane.gateway import sites as sites_api

    deployments.install(hub)
    training.install(hub)
    hub.route_modules.append(sites_api)  # operator declarations of sites
