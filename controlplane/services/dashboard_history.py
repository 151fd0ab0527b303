"""What the operator dashboard remembers: utilisation samples by tier and recent site transitions.

A hub service (started and stopped with the hub; ``on_site`` is a site listener), built by the
composition root and reached by the gateway's dashboard through the typed services record.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any

from controlplane.store import stats as store_stats

if TYPE_CHECKING:
    from controlplane.core.clock import Clock
    from controlplane.core.registry import SiteRegistry, Transition
    from controlplane.runtime import TaskScope
    from controlplane.store.handle import Store

SAMPLE_S = 30.0
"""Seconds between utilisation samples."""
HISTORY_S = 6 * 3600.0
"""How far back the utilisation history reaches."""
FAULTS_KEPT = 50
"""Site losses and returns kept."""


class DashboardHistory:
    """What the dashboard remembers: utilisation samples by tier and recent site transitions.

    A hub service (started and stopped with the hub); ``on_site`` is a site listener.
    """

    name = "dashboard-history"

    def __init__(self, *, registry: SiteRegistry, store: Store, clock: Clock, tasks: TaskScope,
                 sample_s: float = SAMPLE_S, history_s: float = HISTORY_S) -> None:
        self.registry = registry
        self.store = store
        self.clock = clock
        self.tasks = tasks
        self.sample_s = sample_s
        self.samples: collections.deque[dict[str, Any]] = collections.deque(maxlen=max(1, int(history_s / sample_s)))
        self.faults: collections.deque[dict[str, Any]] = collections.deque(maxlen=FAULTS_KEPT)

    def __repr__(self) -> str:
        return f"<History samples={len(self.samples)} faults={len(self.faults)}>"

    def on_site(self, t: Transition) -> None:
        view = self.registry.get(t.site)
        kind = "back" if t.new == "up" else ("left" if view is not None and view.draining else "lost")
        self.faults.appendleft({"site": t.site, "kind": kind, "at": t.at})

    def sample(self, now: float) -> dict[str, Any]:
        busy: dict[str, float] = {}
        total: dict[str, float] = {}
        for view in self.registry:
            if view.state != "up":
                continue
            for acc, cards in view.accelerators.items():
                free = max(0.0, min(float(cards), float(view.free_cards.get(acc, cards))))
                total[view.tier] = total.get(view.tier, 0.0) + cards
                busy[view.tier] = busy.get(view.tier, 0.0) + cards - free
        point = {"at": now, "busy_share": {t: round(busy[t] / total[t], 4) for t in total if total[t] > 0}}
        self.samples.append(point)
        return point

    async def _loop(self) -> None:
        while True:
            self.sample(self.clock.time())
            await self.clock.sleep(self.sample_s)

    async def start(self) -> None:
        self.tasks.spawn(self._loop(), "sample")

    async def stop(self) -> None:
        await self.tasks.close()

    def deployments(self) -> list[dict[str, Any]]:
        """Active deployments and their replicas, from the record."""
        return store_stats.active_deployments(self.store.db) if self.store.is_open else []

    def jobs(self) -> list[dict[str, Any]]:
        """Recent jobs with each placement's explanation, from the record."""
        return store_stats.recent_jobs(self.store.db) if self.store.is_open else []
