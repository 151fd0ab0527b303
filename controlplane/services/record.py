"""The typed record of a process's services, built by the composition root and handed to the gateway.

The gateway reaches the services only through this record (one ``web.AppKey``, ``gateway.app.SERVICES``),
never by scanning the services of the hub process or reading attributes attached to it. Besides the
services it holds the few plain parts the gateway reads itself: the config, the metrics, the clock
and the request ids.
"""

from __future__ import annotations

from dataclasses import dataclass

from controlplane.config import HubConfig
from controlplane.core.clock import Clock
from controlplane.metrics import HubMetrics
from controlplane.services.accounting import UsageAccounts
from controlplane.services.dashboard_history import DashboardHistory
from controlplane.services.deployments import DeploymentService
from controlplane.services.inference import InferenceService, RequestIds
from controlplane.services.job_feed import JobFeed
from controlplane.services.job_views import JobViews
from controlplane.services.leadership import Leadership
from controlplane.services.sites import SiteService
from controlplane.services.status import ProcessStatus
from controlplane.services.tenancy import TenancyService
from controlplane.services.market import MarketService
from controlplane.services.training import TrainingService


@dataclass(frozen=True, slots=True)
class Services:
    """The services of one hub process."""

    inference: InferenceService
    training: TrainingService
    deployments: DeploymentService
    dashboard: DashboardHistory
    job_views: JobViews
    """Job list, detail and usage figures from one rule; admission of new jobs."""
    job_feed: JobFeed
    """A job's events after a cursor, long-polled; progress marks."""
    leadership: Leadership
    tenancy: TenancyService
    sites: SiteService
    accounting: UsageAccounts
    status: ProcessStatus
    config: HubConfig
    metrics: HubMetrics
    clock: Clock
    request_ids: RequestIds
    market: MarketService
