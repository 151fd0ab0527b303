"""Site soft state: what the hub knows of every site, fed by registrations and heartbeats.

Pure: no I/O, no clock (``now`` is an argument). The hub feeds it messages and calls
:meth:`SiteRegistry.sweep` a few times a second; the router and the scheduler read
:class:`SiteView` objects.

Rule 1: a site is ``up`` from its registration (or its first heartbeat after a hub restart, when the
store still knows it) until ``miss_limit`` heartbeats in a row are missing; then it is ``lost`` and gets
no traffic until it is heard again.
Rule 2: a NATS outage of the *hub* is not evidence against sites. While the hub's own connection is
down nothing is declared lost, and after it comes back every site gets a full detection period
before it can be.
Rule 3: a heartbeat from a site the registry does not know is reported to the caller (who asks the
site to register again) and otherwise ignored.
Rule 4: a site's figures are clamped to their physical range on receipt (``declarations.clamp_*``;
what was out of range is counted in :attr:`SiteRegistry.clamped`). The caller applies only a
``Register`` the operator's declaration allows (``declarations.check_register``).
Rule 5: a site's state (:class:`SiteState`) changes only by :data:`SITE_TRANSITIONS` (as the job
lifecycle's); an event the table does not hold for the state is refused and counted in
:attr:`SiteRegistry.illegal_transitions`, never applied.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from controlplane.core import declarations
from edge_agent import wire


class SiteState(enum.StrEnum):
    UP = "up"
    LOST = "lost"


class SiteEvent(enum.StrEnum):
    REGISTER = "register"    # a Register the hub accepted
    HEARD = "heard"          # a heartbeat
    SILENT = "silent"        # no heartbeat for the detection period (sweep)
    MARK_LOST = "mark_lost"  # declared lost by someone who knows better (an operator, a test)


SITE_TRANSITIONS: dict[SiteState, dict[SiteEvent, SiteState]] = {
    SiteState.UP: {SiteEvent.REGISTER: SiteState.UP, SiteEvent.HEARD: SiteState.UP,
                   SiteEvent.SILENT: SiteState.LOST, SiteEvent.MARK_LOST: SiteState.LOST},
    SiteState.LOST: {SiteEvent.REGISTER: SiteState.UP, SiteEvent.HEARD: SiteState.UP},
}


def site_transition(state: SiteState | str, event: SiteEvent) -> SiteState | None:
    """The state after ``event`` in ``state``, or None when the table has no such edge (Rule 5)."""
    try:
        return SITE_TRANSITIONS[SiteState(state)][event]
    except (KeyError, ValueError):
        return None


@dataclass(slots=True)
class SiteView:
    """The hub's current picture of one site (mutable, owned by :class:`SiteRegistry`)."""

    id: str
    tier: str = "edge"
    city: str = ""
    provider: str = ""
    region: str = ""
    state: SiteState = SiteState.UP
    draining: bool = False
    accelerators: dict[str, int] = field(default_factory=dict)
    free_cards: dict[str, float] = field(default_factory=dict)
    replicas: dict[str, wire.ReplicaStatus] = field(default_factory=dict)
    attempts: list[wire.AttemptRef] = field(default_factory=list)
    backends: list[str] = field(default_factory=list)
    executors: list[str] = field(default_factory=list)
    tee: bool = False
    infer_acks: bool = False
    """The agent acknowledges inference requests (``Register.infer_acks``)."""
    silent: bool = False
    """A request sent here went unacknowledged: passed over by the router until the site is heard
    from again (its next heartbeat or registration), so one partition costs one slow failover."""
    queue_depth: int = 0
    inflight: int = 0
    """Requests in flight at the site, from its last heartbeat."""
    sent: int = 0
    """Requests the hub has sent and not yet seen answered (fresher than ``inflight``)."""
    service_ms_p50: float = 0.0
    service_ms_p99: float = 0.0
    """The site's declared p99 service time (its heartbeat): bounds the service time it may claim on
    one answer (``InferenceService.relayed``)."""
    health: str = "ok"
    last_seen: float = 0.0
    registered_at: float = 0.0
    lost_at: float | None = None
    heartbeats: int = 0
    registered: bool = False
    """True once this hub process received a Register from it (False: restored from the store)."""
    local_model_tenants: frozenset[str] = frozenset()
    """Tenants the operator allowed to use the replicas this site loads itself (``*``: all)."""

    @property
    def routable(self) -> bool:
        return self.state == "up" and not self.draining and self.health == "ok" and not self.silent

    def slots_free(self, model: str) -> int:
        """Free inference slots for ``model`` as far as the hub can tell."""
        rep = self.replicas.get(model)
        if rep is None or rep.state != "ready":
            return 0
        return rep.slots - rep.busy - self.sent

    def load(self, model: str) -> float:
        """Load for power-of-two choices: busy share of the model's slots plus the site's queue."""
        rep = self.replicas.get(model)
        slots = rep.slots if rep is not None and rep.slots > 0 else 1
        busy = (rep.busy if rep is not None else 0) + self.sent
        return busy / slots + self.queue_depth

    def as_dict(self, now: float) -> dict[str, object]:
        return {
            "id": self.id,
            "state": self.state,
            "tier": self.tier,
            "city": self.city,
            "provider": self.provider,
            "region": self.region,
            "draining": self.draining,
            "health": self.health,
            "silent": self.silent,
            "accelerators": dict(self.accelerators),
            "free_cards": dict(self.free_cards),
            "models": {
                m: {"state": r.state, "slots": r.slots, "busy": r.busy, "cards": r.cards, "deployment": r.deployment}
                for m, r in self.replicas.items()
            },
            "attempts": [{"job": a.job, "attempt": a.attempt, "progress": a.progress} for a in self.attempts],
            "queue_depth": self.queue_depth,
            "inflight": self.inflight,
            "service_ms_p50": self.service_ms_p50,
            "last_seen_s_ago": round(max(0.0, now - self.last_seen), 3),
            "heartbeats": self.heartbeats,
        }


@dataclass(frozen=True, slots=True)
class Transition:
    site: str
    old: str
    new: str
    at: float


@dataclass(frozen=True, slots=True)
class StaticSite:
    """What the store or the layout knows of a site before it speaks (after a hub restart)."""

    id: str
    tier: str = "edge"
    city: str = ""
    provider: str = ""
    region: str = ""
    accelerators: dict[str, int] = field(default_factory=dict)
    local_model_tenants: frozenset[str] = frozenset()


class SiteRegistry:
    """All sites' soft state.

    Args:
        heartbeat_s: the agents' heartbeat period.
        miss_limit: heartbeats missed in a row before a site is lost (detection = both multiplied).
    """

    def __init__(self, *, heartbeat_s: float = 1.0, miss_limit: int = 3) -> None:
        self.heartbeat_s = heartbeat_s
        self.miss_limit = miss_limit
        self._sites: dict[str, SiteView] = {}
        self._known: dict[str, StaticSite] = {}
        self._bus_down_since: float | None = None
        self.version = 0
        """Bumped whenever the set of routable replicas may have changed (router caches key on it)."""
        self.unknown_heartbeats = 0
        self.clamped: dict[str, int] = {}
        """Figures clamped to their physical range, by kind (Rule 4)."""
        self.illegal_transitions = 0
        """Site state changes the table refused (Rule 5)."""

    def __repr__(self) -> str:
        c = self.counts()
        return f"<SiteRegistry up={c['up']} lost={c['lost']} draining={c['draining']} known={len(self._known)}>"

    @property
    def detection_s(self) -> float:
        return self.heartbeat_s * self.miss_limit

    # ------------------------------------------------------------------ reads

    def get(self, site: str) -> SiteView | None:
        return self._sites.get(site)

    def __contains__(self, site: str) -> bool:
        return site in self._sites

    def __iter__(self) -> Iterator[SiteView]:
        return iter(self._sites.values())

    def __len__(self) -> int:
        return len(self._sites)

    @property
    def views(self) -> dict[str, SiteView]:
        return self._sites

    def counts(self) -> dict[str, int]:
        out = {"up": 0, "lost": 0, "draining": 0}
        for s in self._sites.values():
            out[s.state] = out.get(s.state, 0) + 1
            if s.draining:
                out["draining"] += 1
        return out

    # ------------------------------------------------------------------ writes

    def _move(self, view: SiteView, event: SiteEvent) -> bool:
        """Apply ``event`` to ``view.state`` by the table; False (counted) when it refuses."""
        new = site_transition(view.state, event)
        if new is None:
            self.illegal_transitions += 1
            return False
        view.state = new
        return True

    def remember(self, sites: Iterable[StaticSite]) -> None:
        """Static knowledge from the store: lets heartbeats of known sites count after a hub restart."""
        for s in sites:
            self._known[s.id] = s

    def register(self, msg: wire.Register, now: float, *,
                 local_model_tenants: frozenset[str] | None = None) -> tuple[SiteView, bool]:
        """Apply a registration the caller has checked against the site's declaration (its cards,
        tier, city are the believed ones). Returns the view and whether the site was new here.

        Args:
            local_model_tenants: who may use the site's own replicas (None: keep what is known).
        """
        view = self._sites.get(msg.site)
        new = view is None
        if view is None:
            view = SiteView(id=msg.site)
            self._sites[msg.site] = view
        view.tier = msg.tier
        view.city = msg.city
        view.provider = msg.provider
        view.accelerators = dict(msg.accelerators)
        if not view.free_cards:
            view.free_cards = {k: float(v) for k, v in msg.accelerators.items()}
        view.backends = list(msg.backends)
        view.executors = list(msg.executors)
        view.tee = msg.tee
        view.infer_acks = msg.infer_acks
        view.silent = False
        total = sum(msg.accelerators.values())
        view.replicas = {r.model: r for r in declarations.clamp_replicas(msg.models, total, self.clamped)}
        view.attempts = declarations.clamp_attempts(list(msg.attempts), total, self.clamped)
        if local_model_tenants is None:
            known = self._known.get(msg.site)
            local_model_tenants = known.local_model_tenants if known is not None else frozenset()
        view.local_model_tenants = local_model_tenants
        view.registered = True
        view.registered_at = now
        view.last_seen = now
        if view.state != SiteState.UP and self._move(view, SiteEvent.REGISTER):
            view.lost_at = None
        self._known[msg.site] = StaticSite(
            id=msg.site, tier=msg.tier, city=msg.city, provider=msg.provider, region=view.region,
            accelerators=dict(msg.accelerators), local_model_tenants=local_model_tenants,
        )
        self.version += 1
        return view, new

    def heartbeat(self, msg: wire.Heartbeat, now: float) -> tuple[SiteView | None, bool]:
        """Apply a heartbeat.

        Returns:
            (view, came_back): view is None when the site is unknown (ask it to register);
            came_back is True when a lost site was heard again.
        """
        view = self._sites.get(msg.site)
        if view is None:
            static = self._known.get(msg.site)
            if static is None:
                self.unknown_heartbeats += 1
                return None, False
            view = SiteView(
                id=static.id, tier=static.tier, city=static.city, provider=static.provider,
                region=static.region, accelerators=dict(static.accelerators),
                local_model_tenants=static.local_model_tenants,
            )
            self._sites[msg.site] = view
            self.version += 1
        msg = declarations.clamp_heartbeat(msg, view.accelerators, self.clamped)
        came_back = view.state == SiteState.LOST and self._move(view, SiteEvent.HEARD)
        if came_back:
            view.lost_at = None
        changed_models = _replica_key(view.replicas) != _replica_key_list(msg.models)
        view.free_cards = dict(msg.free_cards)
        view.replicas = {r.model: r for r in msg.models}
        view.attempts = list(msg.attempts)
        view.queue_depth = msg.queue_depth
        view.inflight = msg.inflight
        view.service_ms_p50 = msg.service_ms_p50
        view.service_ms_p99 = msg.service_ms_p99
        if view.draining != msg.draining or view.health != msg.health:
            changed_models = True
        view.draining = msg.draining
        view.health = msg.health
        view.silent = False
        view.last_seen = now
        view.heartbeats += 1
        if changed_models or came_back:
            self.version += 1
        return view, came_back

    def declare(self, static: StaticSite) -> None:
        """The operator (re)declared a site: remember it, and narrow a live view to it at once."""
        self._known[static.id] = static
        view = self._sites.get(static.id)
        if view is None:
            return
        view.local_model_tenants = static.local_model_tenants
        view.tier, view.city, view.provider = static.tier, static.city or view.city, static.provider or view.provider
        view.accelerators = {a: min(n, static.accelerators.get(a, 0)) for a, n in view.accelerators.items()
                             if static.accelerators.get(a, 0) > 0}
        view.free_cards = {a: min(v, float(view.accelerators.get(a, 0))) for a, v in view.free_cards.items()
                           if a in view.accelerators}
        self.version += 1

    def set_draining(self, site: str, draining: bool) -> None:
        view = self._sites.get(site)
        if view is not None and view.draining != draining:
            view.draining = draining
            self.version += 1

    def mark_lost(self, site: str, now: float) -> Transition | None:
        """Declare a site lost at once (e.g. an operator or a test knows better than heartbeats)."""
        view = self._sites.get(site)
        if view is None or view.state == SiteState.LOST or not self._move(view, SiteEvent.MARK_LOST):
            return None
        view.lost_at = now
        view.sent = 0
        self.version += 1
        return Transition(site, "up", "lost", now)

    def bus_down(self, now: float) -> None:
        """The hub lost its NATS connection: silence from sites means nothing until it is back."""
        if self._bus_down_since is None:
            self._bus_down_since = now

    def bus_up(self, now: float) -> None:
        """The hub is connected again: every site gets a full detection period from now."""
        self._bus_down_since = None
        for view in self._sites.values():
            if view.state == "up" and view.last_seen < now:
                view.last_seen = now

    def sweep(self, now: float) -> list[Transition]:
        """Declare lost every up site silent for longer than the detection period."""
        if self._bus_down_since is not None:
            return []
        out: list[Transition] = []
        deadline = now - self.detection_s
        for view in self._sites.values():
            if view.state == SiteState.UP and view.last_seen < deadline and self._move(view, SiteEvent.SILENT):
                view.lost_at = now
                view.sent = 0
                out.append(Transition(view.id, "up", "lost", now))
        if out:
            self.version += 1
        return out


def _replica_key(replicas: dict[str, wire.ReplicaStatus]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((m, r.state) for m, r in replicas.items()))


def _replica_key_list(replicas: list[wire.ReplicaStatus]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((r.model, r.state) for r in replicas))
