"""The typed record of a process's services, built by the composition root and handed to the gateway.

The gateway reaches the services only through this record (one ``web.AppKey``, ``gateway.app.SERVICES``),
never by scanning the hub's services or reading attributes attached to the hub.
"""

from __future__ import annotations

from dataclasses import dataclass

from controlplane.services.dashboard_history import DashboardHistory
from controlplane.services.deployments import DeploymentService
from controlplane.services.inference import InferenceService
from controlplane.services.market import MarketService
from controlplane.services.training import TrainingService


@dataclass(frozen=True, slots=True)
class Services:
    """The services of one hub process."""

    inference: InferenceService
    training: TrainingService
    deployments: DeploymentService
    dashboard: DashboardHistory
    market: MarketService
