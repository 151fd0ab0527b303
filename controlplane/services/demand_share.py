"""Demand counts shared from gateways to the deciding controller, over NATS.

What it holds: :class:`DemandShare`, the deployments autoscaler's demand source. A ``gateway``
process (``cpn gateway``) serves tenants but never decides: every ``interval_s`` it drains the
request counts its inference path made, per (tenant, model, origin, budget), and publishes them as
one :class:`Report` on :data:`SUBJECT`. A ``hub`` or ``controller`` process subscribes; its
:meth:`DemandShare.drain` gives the autoscaler its own counts plus every report received since the
last call (a follower's reports are drained and dropped by its deployments service, which does not
decide; the leader's are the ones that count).

Rule 1: counts are soft state: a report lost (no subscriber, a reconnect) is demand not seen for
one interval, never a wrong decision about the record. Reports not drained for three intervals (a
process that does not lead) are dropped, so a new leader does not act on old demand.
Rule 2: a malformed report (not JSON, a negative count, a budget out of range, an oversized list)
is counted (``counters["malformed"]``, the bus's malformed counter of kind ``demand``) and dropped
whole; sites cannot publish on the subject (the hub's NATS permissions are the only ones that
allow ``cpn.v1.hub.>``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Annotated, Protocol

import msgspec

from controlplane.core import demand_hours
from controlplane.core.clock import Clock
from controlplane.runtime import BackgroundTasks

log = logging.getLogger("cpn.demand")

SUBJECT = "cpn.v1.hub.demand"

Key = tuple[str, str, str, float]
"""(tenant, model, origin, budget_ms)"""

_Name = Annotated[str, msgspec.Meta(max_length=200)]


class Count(msgspec.Struct, frozen=True, array_like=True):
    tenant: _Name
    model: _Name
    origin: _Name
    budget_ms: Annotated[float, msgspec.Meta(gt=0, le=60_000)]
    requests: Annotated[int, msgspec.Meta(ge=0)]


class Report(msgspec.Struct, frozen=True, kw_only=True):
    hub: _Name
    counts: Annotated[list[Count], msgspec.Meta(max_length=100_000)]


_decoder = msgspec.json.Decoder(Report)


class Bus(Protocol):
    """What the share needs of the hub's NATS adapter."""

    async def publish_hub(self, subject: str, data: bytes) -> None: ...

    async def subscribe_hub(self, subject: str, handler: Callable[[bytes], None]) -> None: ...

    def malformed(self, kind: str) -> None: ...


def encode(hub: str, counts: Mapping[Key, int]) -> bytes:
    return msgspec.json.encode(Report(hub=hub, counts=[Count(t, m, o, float(b), n)
                                                       for (t, m, o, b), n in sorted(counts.items())]))


class DemandShare:
    """The autoscaler's demand source: this process's counts, plus the gateways' (see the module)."""

    name = "demand_share"

    def __init__(self, *, hub_id: str, role: str, bus: Bus, local: Callable[[], Mapping[Key, int]], clock: Clock,
                 interval_s: float) -> None:
        self.hub_id = hub_id
        self.role = role
        self.bus = bus
        self.local = local
        self.clock = clock
        self.interval_s = interval_s
        self.tasks = BackgroundTasks("demand")
        self._pending: dict[Key, int] = {}
        self._drained_at = clock.monotonic()
        self.last: Report | None = None
        """The last well-formed report received (for operators and tests)."""
        self.counters: dict[str, int] = {"published": 0, "received": 0, "malformed": 0, "publish_failed": 0}

    def __repr__(self) -> str:
        c = self.counters
        return (f"<DemandShare role={self.role} published={c['published']} received={c['received']} "
                f"malformed={c['malformed']}>")

    async def start(self) -> None:
        if self.role == "gateway":
            self.tasks.spawn(self._publish_loop(), name="demand-publish")
        else:
            await self.bus.subscribe_hub(SUBJECT, self.receive)

    async def stop(self) -> None:
        await self.tasks.close()

    async def _publish_loop(self) -> None:
        while True:
            await self.clock.sleep(self.interval_s)
            await self.publish_once()

    async def publish_once(self) -> None:
        """Drain this process's counts and publish them (nothing when there were none)."""
        counts = self.local()
        if not counts:
            return
        try:
            await self.bus.publish_hub(SUBJECT, encode(self.hub_id, counts))
            self.counters["published"] += 1
        except Exception as exc:  # disconnected: the counts are soft state (Rule 1)
            self.counters["publish_failed"] += 1
            log.warning("event=demand_publish_failed error=%r", exc)

    def receive(self, data: bytes) -> None:
        """A gateway's report: merged into what :meth:`drain` gives next (Rule 2: malformed, dropped)."""
        try:
            report = _decoder.decode(data)
        except msgspec.DecodeError as exc:
            self.counters["malformed"] += 1
            self.bus.malformed("demand")
            log.warning("event=demand_malformed error=%r", str(exc)[:200])
            return
        self.counters["received"] += 1
        self.last = report
        now = self.clock.monotonic()
        if now - self._drained_at > 3 * self.interval_s:
            # Nobody drained for a while (this process does not lead): old demand is not news.
            self._pending = {}
            self._drained_at = now
        for c in report.counts:
            key = (c.tenant, c.model, c.origin, c.budget_ms)
            self._pending[key] = self._pending.get(key, 0) + c.requests

    def drain(self) -> dict[Key, int]:
        """This process's counts since the last call plus the gateways' reports received meanwhile."""
        out: dict[Key, int] = dict(self.local())
        for key, n in self._pending.items():
            out[key] = out.get(key, 0) + n
        self._pending = {}
        self._drained_at = self.clock.monotonic()
        return out



class LearntDemand:
    """Tidal lending's forecast, learnt live: every drain of the demand counts (the autoscaler's,
    :meth:`tap`) is summed per region of its origin and folded into ``core/demand_hours`` by local
    hour; :meth:`site_profiles` gives each lending site its region's learnt profile, the declared
    one as the prior for hours not observed yet. Soft state, like the counts: a new leader learns
    afresh (until then the forecast is the declared profile)."""

    def __init__(self, *, region_of_origin: Callable[[str], str | None], region_of_site: Callable[[str], str | None],
                 clock: Clock) -> None:
        self.region_of_origin = region_of_origin
        self.region_of_site = region_of_site
        self.clock = clock
        self.hours: dict[str, demand_hours.DemandHours] = {}

    def __repr__(self) -> str:
        return f"<LearntDemand regions={len(self.hours)}>"

    def observe(self, counts: Mapping[Key, int]) -> None:
        now = self.clock.time()
        by_region: dict[str, float] = {}
        for (_, _, origin, _), n in counts.items():
            region = self.region_of_origin(origin)
            if region is not None and n > 0:
                by_region[region] = by_region.get(region, 0.0) + n
        for region, total in by_region.items():
            self.hours[region] = demand_hours.observe(self.hours.get(region, demand_hours.DemandHours()), now, total)

    def tap(self, drain: Callable[[], Mapping[Key, int]]) -> Callable[[], Mapping[Key, int]]:
        """``drain``, observed on the way (what the deployments service calls every interval)."""
        def drained() -> Mapping[Key, int]:
            counts = drain()
            self.observe(counts)
            return counts
        return drained

    def site_profiles(self, sites: Iterable[str], prior: Sequence[float]) -> dict[str, list[float]]:
        learnt = {region: demand_hours.profile(d, prior) for region, d in self.hours.items()}
        out = {}
        for site in sites:
            region = self.region_of_site(site)
            if region is not None and region in learnt:
                out[site] = learnt[region]
        return out
