"""The sites of the network as the hub keeps them: declarations, registrations, heartbeats, losses.

Built by the composition root with exactly what it uses: the config, the layout and its RTT index,
the router (told when the index changes), the site registry (pure core, soft state), the record, the
bus, the metrics, the clock and the process's task owner. The bus hands it registrations and
heartbeats; other services listen to site transitions through :attr:`SiteService.listeners`.

Promises: nothing is declared lost while the hub itself is cut off from NATS (Rule 2 of
registry.py); a site that speaks after a hub restart is asked to register again; every time passed
to the core is read from the injected clock, never inside the core.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from typing import Any

import msgspec

from controlplane.config import HubConfig
from controlplane.core import declarations
from controlplane.core.clock import Clock
from controlplane.core.registry import SiteRegistry, SiteView, StaticSite, Transition
from controlplane.core.router import Router
from controlplane.metrics import HubMetrics
from controlplane.nats.bus import HubBus
from controlplane.runtime import TaskScope
from controlplane.store import sites as store_sites
from controlplane.store.handle import Store
from edge_agent import wire
from topology.ingress import IngressRtt
from topology import latency
from topology import layout as topo_layout

log = logging.getLogger("cpn.hub")

SiteListener = Callable[[Transition], None]

REREGISTER_EVERY_S = 2.0
"""How often an unregistered site that keeps sending heartbeats is asked to register again."""


class SiteService:
    """Sites: what the operator declared, what the agents say, and when they went silent."""

    name = "sites"

    def __init__(self, *, config: HubConfig, layout: topo_layout.Layout, rtt: latency.RttIndex, router: Router,
                 registry: SiteRegistry, store: Store, bus: HubBus, metrics: HubMetrics, clock: Clock,
                 tasks: TaskScope) -> None:
        self.config = config
        self.layout = layout
        self.rtt = rtt
        self.router = router
        self.registry = registry
        self.store = store
        self.bus = bus
        self.metrics = metrics
        self.clock = clock
        self.tasks = tasks
        self.listeners: list[SiteListener] = []
        """Told about every site transition (lost, back); other services plug in here."""
        self.origin_ids: frozenset[str] = frozenset(o.id for o in layout.origins)
        nets = [(ipaddress.ip_network(cidr, strict=False), origin) for cidr, origin in layout.cidrs.items()]
        # Longest prefix first, so a /24 inside a /16 wins.
        self._cidrs = sorted(nets, key=lambda pair: -pair[0].prefixlen)
        self.declarations: dict[str, declarations.Declaration] = {}
        """What the operator declared of each site: the layout's sites, then ``PUT /v1/sites/{site}``."""
        self._reregister_asked: dict[str, float] = {}
        self._models_cache: tuple[int, frozenset[str]] = (-1, frozenset())

    def __repr__(self) -> str:
        return f"<SiteService sites={len(self.registry)} declared={len(self.declarations)}>"

    # ------------------------------------------------------------------ lifecycle

    def load(self) -> list[str]:
        """Read the declarations and the sites seen before from the record (opened already) into the
        registry; returns the ids of the sites seen before (to ask them to register)."""
        db = self.store.db
        self.declarations = {s.id: self._layout_declaration(s.id) for s in self.layout.sites}
        for site_id, fields in store_sites.declarations(db).items():
            try:
                self.declarations[site_id] = self._merge_declaration(site_id, fields)
            except (msgspec.ValidationError, TypeError) as exc:
                log.error("event=bad_stored_declaration site=%s error=%s", site_id, exc)
        static = [self._static(d) for d in self.declarations.values()]
        seen_before = []
        for row in store_sites.list_sites(db):
            seen_before.append(row["id"])
            if row["id"] not in self.declarations and self.config.accept_undeclared_sites:
                static.append(StaticSite(id=row["id"], tier=row["tier"] or "edge", city=row["city"] or "",
                                         provider=row["provider"] or "", accelerators=row["accelerators"],
                                         local_model_tenants=frozenset(self.config.local_model_tenants)))
        self.registry.remember(static)
        return seen_before

    async def start(self) -> None:
        self.tasks.spawn(self._sweep_loop(), "sweep")

    async def stop(self) -> None:
        await self.tasks.close()

    # ------------------------------------------------------------------ declarations

    def _layout_declaration(self, site_id: str) -> declarations.Declaration:
        s = self.layout.site(site_id)
        return declarations.Declaration(id=s.id, tier=s.tier, city=s.city, provider=s.provider, region=s.region,
                                        accelerators=dict(s.accelerators), lat=s.lat, lon=s.lon, tee=s.tee)

    def _merge_declaration(self, site_id: str, fields: dict[str, Any]) -> declarations.Declaration:
        """An operator's declaration over the layout's entry for the site (if any): given fields win."""
        try:
            base = msgspec.to_builtins(self._layout_declaration(site_id))
        except KeyError:
            base = {"id": site_id}
        merged = {**base, **{k: v for k, v in fields.items() if v is not None}, "id": site_id, "source": "operator"}
        if "region" not in fields and merged.get("city"):
            try:
                merged["region"] = self.layout.origin(merged["city"]).region
            except KeyError:
                pass
        return msgspec.convert(merged, declarations.Declaration)

    def _local_tenants(self, decl: declarations.Declaration | None) -> frozenset[str]:
        extra = frozenset(self.config.local_model_tenants)
        return extra | frozenset(decl.local_model_tenants) if decl is not None else extra

    def _static(self, d: declarations.Declaration) -> StaticSite:
        return StaticSite(id=d.id, tier=d.tier, city=d.city, provider=d.provider, region=d.region,
                          accelerators=dict(d.accelerators), local_model_tenants=self._local_tenants(d))

    def declare(self, site_id: str, fields: dict[str, Any]) -> declarations.Declaration:
        """Keep an operator's declaration of a site and apply it at once (a live site is narrowed to
        it; its next ``Register`` is checked against it).

        Raises:
            msgspec.ValidationError: the fields do not make a declaration.
        """
        decl = self._merge_declaration(site_id, fields)
        store_sites.declare_site(self.store.db, site_id, fields, self.clock.time())
        self.declarations[site_id] = decl
        self.registry.declare(self._static(decl))
        log.info("event=site_declared site=%s tier=%s city=%s accelerators=%s local_model_tenants=%s",
                 site_id, decl.tier, decl.city, decl.accelerators, ",".join(decl.local_model_tenants))
        return decl

    def declaration(self, site_id: str) -> declarations.Declaration | None:
        return self.declarations.get(site_id)

    # ------------------------------------------------------------------ what agents say

    def on_register(self, msg: wire.Register) -> wire.RegisterAck | wire.ErrorReply:
        now = self.clock.time()
        if msg.proto > wire.PROTO:
            log.warning("event=newer_agent site=%s proto=%s", msg.site, msg.proto)
        decl = self.declarations.get(msg.site)
        verdict = declarations.check_register(decl, msg, accept_undeclared=self.config.accept_undeclared_sites)
        if verdict.refused or verdict.believed is None:
            self.metrics.count(self.metrics.site_claims_refused, verdict.refused)
            log.warning("event=site_refused site=%s reason=%s detail=%s", msg.site, verdict.refused, verdict.detail)
            return wire.ErrorReply(code="refused", message=f"{verdict.refused}: {verdict.detail}", retryable=False)
        for claim in verdict.ignored:
            self.metrics.count(self.metrics.site_claims_refused, f"{claim}_ignored")
            log.info("event=site_claim_ignored site=%s claim=%s", msg.site, claim)
        msg = verdict.believed
        view, new = self.registry.register(msg, now, local_model_tenants=self._local_tenants(decl))
        known = True
        try:
            static = self.layout.site(msg.site)
            view.region = static.region
        except KeyError:
            known = False
            view.region = decl.region if decl is not None else ""
            self._attach_unknown_site(msg)
        store_sites.upsert_site(
            self.store.db, site=msg.site, tier=msg.tier, city=msg.city, provider=msg.provider,
            accelerators=dict(msg.accelerators), now=now,
        )
        self._reregister_asked.pop(msg.site, None)
        log.info("event=site_registered site=%s tier=%s city=%s new=%s known=%s", msg.site, msg.tier, msg.city, new, known)
        return wire.RegisterAck(hub=self.config.hub_id, heartbeat_s=self.config.heartbeat_s, known=known)

    def _attach_unknown_site(self, msg: wire.Register) -> None:
        """A site not in the layout is placed at its city (or its own coordinates)."""
        lat, lon = msg.lat, msg.lon
        region = ""
        if lat is None or lon is None:
            try:
                origin = self.layout.origin(msg.city)
            except KeyError:
                log.warning("event=site_unplaced site=%s city=%s reason=unknown city and no coordinates", msg.site, msg.city)
                return
            lat, lon, region = origin.lat, origin.lon, origin.region
        if self.rtt.has_site(msg.site):
            return
        template = self.layout.sites[0]
        site = topo_layout.Site(
            id=msg.site, name=msg.site, city=msg.city or msg.site, region=region, lat=lat, lon=lon, tier=msg.tier,
            provider=msg.provider or "unknown", accelerators=dict(msg.accelerators), tariff=template.tariff,
            pue=template.pue, failure_rate_per_card_hour=template.failure_rate_per_card_hour, tee=msg.tee,
            restart_s=template.restart_s, egress_gbps=template.egress_gbps,
            sources={"*": "registered at run time; tariff, PUE and failure rate copied from the layout's first site"},
        )
        self.rtt.add_site(site)
        if isinstance(self.router.rtt, IngressRtt):
            self.router.rtt.forget()  # a new site can shorten the leg origin -> gateway
        self.router.invalidate()

    def on_heartbeat(self, msg: wire.Heartbeat) -> None:
        now = self.clock.time()
        view, came_back = self.registry.heartbeat(msg, now)
        if view is None or not view.registered:
            last = self._reregister_asked.get(msg.site, 0.0)
            if now - last > REREGISTER_EVERY_S:
                self._reregister_asked[msg.site] = now
                self.tasks.spawn(self._ask_reregister(msg.site), f"reregister-{msg.site}")
        if came_back:
            log.info("event=site_back site=%s", msg.site)
            for listener in self.listeners:
                listener(Transition(msg.site, "lost", "up", now))

    async def ask_known_sites_to_register(self, sites: list[str]) -> None:
        """After a restart: ask every site this hub has seen before to register now.

        Their next heartbeats would restore them too, but up to ``heartbeat_s`` later, and until
        then the router knows no replica: models look "not found". A ``Reregister`` on each command
        subject (no reply wanted) brings their replicas back within a round trip.
        """
        now = self.clock.time()
        for site in sites:
            self._reregister_asked[site] = now  # their first heartbeats need not ask again
            await self.bus.publish_command(site, wire.Reregister(hub=self.config.hub_id))
        if sites:
            log.info("event=asked_sites_to_register count=%d", len(sites))

    async def _ask_reregister(self, site: str) -> None:
        try:
            await self.bus.command(site, wire.Reregister(hub=self.config.hub_id), timeout_s=2.0)
        except Exception as exc:
            log.debug("event=reregister_failed site=%s error=%s", site, exc)

    def on_bus_down(self) -> None:
        self.registry.bus_down(self.clock.time())

    def on_bus_up(self) -> None:
        self.registry.bus_up(self.clock.time())

    async def _sweep_loop(self) -> None:
        while True:
            before = self.clock.monotonic()
            await self.clock.sleep(self.config.sweep_s)
            stalled_s = self.clock.monotonic() - before - self.config.sweep_s
            if stalled_s > self.config.heartbeat_s:
                # This process stood still (a write waiting for the replicated record's quorum, a
                # pause): it was not listening, so the silence is its own, not the sites'. Like a
                # reconnection, every site gets a full detection period from now (registry Rule 2).
                log.warning("event=loop_stalled seconds=%.2f", stalled_s)
                self.registry.bus_up(self.clock.time())
                continue
            self.sweep()

    def sweep(self) -> list[Transition]:
        """Declare lost the sites silent too long (now, on this clock); returns the transitions."""
        lost = self.registry.sweep(self.clock.time())
        for t in lost:
            self._site_lost(t)
        return lost

    def _site_lost(self, t: Transition) -> None:
        self.bus.fail_requests(t.site)  # requests in flight there fail over now, not at their timeout
        view = self.registry.get(t.site)
        if view is not None and view.draining:
            # It announced a drain or a stop (an agent stopping gracefully says so in a last
            # heartbeat): expected, so INFO and not counted as a loss (no "site lost" alert).
            self.metrics.site_departures.inc()
            log.info("event=site_left site=%s silent_for_s=%.2f", t.site, self.registry.detection_s)
        else:
            self.metrics.site_losses.inc()
            log.warning("event=site_lost site=%s silent_for_s=%.2f", t.site, self.registry.detection_s)
        for listener in self.listeners:
            try:
                listener(t)
            except Exception:
                log.exception("event=site_listener_failed site=%s", t.site)

    # ------------------------------------------------------------------ the operator's view and actions

    def known_models(self) -> frozenset[str]:
        """Every model some site reports a replica of (cached per registry version)."""
        version, models = self._models_cache
        if version != self.registry.version:
            models = frozenset(m for v in self.registry for m in v.replicas)
            self._models_cache = (self.registry.version, models)
        return models

    def snapshot(self) -> list[dict[str, object]]:
        """Every site's live state, by id."""
        now = self.clock.time()
        return [v.as_dict(now) for v in sorted(self.registry, key=lambda v: v.id)]

    def view(self, site: str) -> SiteView | None:
        return self.registry.get(site)

    def view_dict(self, site: str) -> dict[str, object] | None:
        view = self.registry.get(site)
        return view.as_dict(self.clock.time()) if view is not None else None

    def set_draining(self, site: str, on: bool) -> None:
        """Drain a site (``on``) or undo it: recorded first (it survives restarts), then routed around."""
        store_sites.set_draining(self.store.db, site, on)
        self.registry.set_draining(site, on)

    async def drain(self, site: str, on: bool) -> bool:
        """:meth:`set_draining`, then tell the site; True if it acknowledged within 2 s."""
        self.set_draining(site, on)
        try:
            await self.bus.command(site, wire.Drain(on=on), timeout_s=2.0)
        except Exception:
            return False
        return True

    def origin_for_ip(self, ip: str) -> str | None:
        """The layout's CIDR map: which origin a client address belongs to."""
        if not ip or not self._cidrs:
            return None
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None
        for net, origin in self._cidrs:
            if addr.version == net.version and addr in net:
                return origin
        return None

    def refresh_metrics(self) -> None:
        """The site gauges, set at scrape time."""
        counts = self.registry.counts()
        for state in ("up", "lost", "draining"):
            self.metrics.sites.labels(state).set(counts.get(state, 0))
        # NATS error and malformed-message counters are read by controlplane/scrape.py.
        self.metrics.site_figures_clamped.counts = {(k,): n for k, n in self.registry.clamped.items()}
