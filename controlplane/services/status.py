"""What a process says about itself: liveness (``/healthz``), readiness (``/readyz``), its metrics
(``/metrics``), when it started.

Built with exactly what it reads: the hub id, the bus (connected or not), the site registry (sites
by state), the readiness checks, the metrics and what refreshes them at scrape time, the clock.
"""

from __future__ import annotations

from collections.abc import Callable

from controlplane.core.clock import Clock
from controlplane.core.registry import SiteRegistry
from controlplane.metrics import HubMetrics
from controlplane.readiness import Connection, Readiness


class ProcessStatus:
    """Liveness, readiness and metrics of one process (see the module docstring)."""

    name = "status"

    def __init__(self, *, hub_id: str, bus: Connection, registry: SiteRegistry, readiness: Readiness,
                 metrics: HubMetrics, refresh_metrics: Callable[[], None], clock: Clock) -> None:
        self.hub_id = hub_id
        self.bus = bus
        self.registry = registry
        self.readiness = readiness
        self.metrics = metrics
        self.refresh_metrics = refresh_metrics
        self.clock = clock
        self.started_at = 0.0

    def __repr__(self) -> str:
        return f"<ProcessStatus {self.hub_id} ready={self.ready()}>"

    async def start(self) -> None:
        self.started_at = self.clock.time()

    async def stop(self) -> None:
        return None

    @property
    def nats_connected(self) -> bool:
        return self.bus.connected

    def health(self) -> dict[str, object]:
        """The ``/healthz`` body: 200 while the process answers at all; it says what it sees."""
        ok = self.bus.connected
        return {
            "status": "ok" if ok else "degraded",
            "hub": self.hub_id,
            "nats": "connected" if ok else "disconnected",
            "sites": self.registry.counts(),
        }

    def ready(self) -> bool:
        return self.readiness.ready()

    def readiness_report(self) -> dict[str, object]:
        return self.readiness.report()

    def metrics_text(self) -> bytes:
        """The Prometheus exposition, refreshed now."""
        return self.metrics.render(self.refresh_metrics)
