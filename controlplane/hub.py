"""A hub process: its parts, started and stopped in order.

The composition root (``compose.py``) builds the parts, each service with exactly what it uses,
and hands them to :class:`Hub`, which owns the order of things: open the record, load the sites,
connect to NATS, start the services, ask known sites to register, serve HTTP; and the reverse at
stop. It owns the process's background tasks (:attr:`Hub.tasks`, one :class:`BackgroundTasks` whose
scopes the services, the bus and the outboxes spawn into).

Services never reach through the hub: no service or gateway module imports this one
(tests/unit/test_import_rules.py). What the hub still exposes (``db``, ``registry``, ``layout`` ...)
is for the tools and tests that drive a whole process, and for the services not yet built with
their own parts.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from controlplane.config import HubConfig
from controlplane.core.clock import Clock
from controlplane.core.errors import BusUnavailable, RecordUnavailable
from controlplane.core.registry import SiteRegistry
from controlplane.core.router import Router
from controlplane.metrics import HubMetrics
from controlplane.nats.bus import HubBus
from controlplane.readiness import Readiness
from controlplane.replicated.errors import NoQuorum
from controlplane.runtime import BackgroundTasks
from controlplane.services.accounting import UsageAccounts
from controlplane.services.inference import InferenceService
from controlplane.services.sites import SiteListener, SiteService
from controlplane.services.status import ProcessStatus
from controlplane.services.tenancy import TenancyService
from controlplane.store.handle import Store
from topology import latency
from topology import layout as topo_layout

log = logging.getLogger("cpn.hub")

START_RETRY_S = 1.0
"""Wait between two attempts to start a part that lacked the record's quorum or JetStream."""

__all__ = ["Hub", "Service", "ServeHttp", "SiteListener"]


class Gateway(Protocol):
    """What the hub needs of a running gateway: its port and a way to stop it."""

    @property
    def port(self) -> int: ...

    @property
    def scheme(self) -> str: ...

    async def stop(self) -> None: ...


ServeHttp = Callable[[str, int], Awaitable[Gateway]]
"""Starts the gateway on (host, port); handed in by the composition root (``compose.py``), so the
hub never imports the gateway (the gateway is the outer layer)."""


class Service(Protocol):
    """A part of the process with its own loop (training, deployments, usage, ...)."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Hub:
    """One hub process. ``await start()``, then serve; ``await stop()`` drains and closes.

    Built by ``compose.build`` (every argument is a part it made).
    """

    def __init__(self, *, config: HubConfig, clock: Clock, layout: topo_layout.Layout, rtt: latency.RttIndex,
                 router: Router, registry: SiteRegistry, store: Store, bus: HubBus, metrics: HubMetrics,
                 tasks: BackgroundTasks, readiness: Readiness, status: ProcessStatus, sites: SiteService,
                 tenancy: TenancyService, accounting: UsageAccounts, inference: InferenceService,
                 serve_http: ServeHttp | None = None) -> None:
        self.config = config
        self.clock = clock
        self.layout = layout
        self.rtt = rtt
        self.router = router
        self.registry = registry
        self.store = store
        self.bus = bus
        self.metrics = metrics
        self.tasks = tasks
        """Every background task of the process (services, bus and outboxes spawn into its scopes)."""
        self.readiness = readiness
        """What ``/readyz`` reports; composition roots may hold gates of their own (``cpn up``)."""
        self.status = status
        self.sites = sites
        self.tenancy = tenancy
        self.accounting = accounting
        self.inference = inference
        self.services: list[Service] = []
        self.permission_violations = 0
        """Set by whoever watches the NATS server's log (``cpn up``); exported at scrape time."""
        self.gateway: Gateway | None = None
        self._serve_http = serve_http

    def __repr__(self) -> str:
        return f"<Hub {self.config.hub_id} sites={len(self.registry)} {self.registry!r} {self.bus!r}>"

    # ------------------------------------------------------------------ lifecycle

    async def start(self, *, serve_http: bool = True) -> None:
        """Open the record, load the sites, connect to NATS, start the services and the gateway.

        A part that cannot start yet for want of the replicated record's quorum or of JetStream (a
        restart during a NATS fault) is tried again every :data:`START_RETRY_S`, with a warning
        line each time (``event=hub_waiting``), for as long as it takes: the process neither exits
        nor listens meanwhile (a load balancer sees it not ready), and starts once quorum returns."""
        await self.status.start()  # started_at: before any service reads it
        await self._until_available("record", self.store.start)
        seen_before = self.sites.load()
        await self.bus.connect()
        replicas = self.config.event_stream_replicas or (3 if self.bus.clustered else 1)
        await self._until_available("event_stream", lambda: self.bus.ensure_event_stream(
            replicas, regions=self.config.event_regions))
        for service in self.services:
            await self._until_available(service.name, service.start)
        await self.sites.ask_known_sites_to_register(seen_before)
        if serve_http:
            if self._serve_http is None:
                raise RuntimeError("this hub was built without a gateway (see controlplane.compose.build)")
            self.gateway = await self._serve_http(self.config.listen_host, self.config.listen_port)
        log.info("event=hub_started hub=%s nats=%s db=%s event_replicas=%d strict_inboxes=%s", self.config.hub_id,
                 self.config.nats_url, self.config.db_path, replicas, self.bus.strict_inboxes)

    async def _until_available(self, part: str, start: Callable[[], Awaitable[object]]) -> None:
        """``start()``, again and again while it fails for want of the record or of NATS."""
        attempt = 1
        while True:
            try:
                await start()
            except (RecordUnavailable, NoQuorum, BusUnavailable) as exc:
                log.warning("event=hub_waiting hub=%s part=%s attempt=%d retry_in_s=%g reason=%r (not serving "
                            "until it starts: the record's quorum or JetStream is not there yet)",
                            self.config.hub_id, part, attempt, START_RETRY_S, str(exc))
                attempt += 1
                await self.clock.sleep(START_RETRY_S)
                continue
            if attempt > 1:
                log.warning("event=hub_wait_over hub=%s part=%s attempts=%d", self.config.hub_id, part, attempt)
            return

    async def stop(self) -> None:
        """Stop serving HTTP, stop services and every task, close NATS and the record."""
        if self.gateway is not None:
            await self.gateway.stop()
            self.gateway = None
        for service in reversed(self.services):
            with contextlib.suppress(Exception):
                await service.stop()
        await self.tasks.close()
        await self.bus.close()
        self.store.close()

    @property
    def http_port(self) -> int:
        return int(self.gateway.port) if self.gateway is not None else 0

    @property
    def http_scheme(self) -> str:
        """``https`` when the gateway serves TLS, else ``http``."""
        return self.gateway.scheme if self.gateway is not None else "http"

    def add_service(self, service: Service) -> None:
        """Register a service; it is started after the bus connects and stopped before it closes."""
        self.services.append(service)

    # ------------------------------------------------------------------ for tools, tests and the
    # services still built on the hub (training, deployments): plain reads of the parts above

    @property
    def db(self) -> Any:
        """The open record, or None before start and after stop."""
        return self.store.db if self.store.is_open else None

    @property
    def site_listeners(self) -> list[SiteListener]:
        return self.sites.listeners

    @property
    def origin_ids(self) -> frozenset[str]:
        return self.sites.origin_ids

    @property
    def started_at(self) -> float:
        return self.status.started_at

    def known_models(self) -> frozenset[str]:
        return self.sites.known_models()

    def tenant(self, tenant_id: str) -> dict[str, Any] | None:
        return self.tenancy.tenant(tenant_id)

    def create_tenant(self, tenant_id: str, **fields: Any) -> str:
        """:meth:`TenancyService.create_tenant` (the tools' and tests' way to make a tenant)."""
        return self.tenancy.create_tenant(tenant_id, **fields)

    def create_admin_key(self, label: str = "") -> str:
        return self.tenancy.create_admin_key(label)
