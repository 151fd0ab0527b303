"""The hub service: wires the store, the bus, the pure core and the gateway, and runs their loops.

What it owns: the SQLite database (the record), the site registry (soft state, rebuilt from agents),
the RTT index of the layout, the router, and the background loops (loss detection, usage flush,
services such as training and deployments that plug in through :meth:`Hub.add_service`).

Promises: nothing is declared lost while the hub itself is cut off from NATS (Rule 2 of
registry.py); a site that speaks after a hub restart is asked to register again; all times passed to
the pure core are wall-clock epoch seconds read here, never inside the core.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec

from controlplane.core import auth, declarations
from controlplane.core.clock import Clock
from controlplane.services import keys as keys_lifecycle
from controlplane.nats.bus import HubBus
from controlplane.config import HubConfig
from controlplane.core.errors import RateLimited, Unauthorized
from controlplane.services.inference import InferenceService, RequestIds
from controlplane.core.ratelimit import TokenBuckets
from controlplane import scrape
from controlplane.readiness import Readiness
from controlplane.metrics import HubMetrics
from controlplane.core.registry import SiteRegistry, StaticSite, Transition
from controlplane.core.router import Router
from controlplane.runtime import BackgroundTasks, WallClock
from controlplane.store import db as store_db
from controlplane.store import sites as store_sites
from controlplane.store import tenants as store_tenants
from controlplane.store import usage as store_usage
from controlplane.core.usage import UsageBuffer
from edge_agent import wire
from topology import latency, loader
from topology import layout as topo_layout

log = logging.getLogger("cpn.hub")

SiteListener = Callable[[Transition], None]


ServeHttp = Callable[["Hub", str, int], Awaitable[Any]]
"""Starts the gateway of a hub on (host, port); handed in by the composition root (``compose.py``),
so the hub never imports the gateway (the gateway is the outer layer)."""


class Service(Protocol):
    """A part of the hub with its own loop (training, deployments, usage, ...)."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Hub:
    """One hub process. ``await start()``, then serve; ``await stop()`` drains and closes.

    Args:
        config: the hub's configuration.
        layout: a layout already loaded (tests, ``cpn up``); else read from ``config.layout``.
    """

    def __init__(self, config: HubConfig, *, layout: topo_layout.Layout | None = None,
                 serve_http: ServeHttp | None = None, clock: Clock | None = None,
                 open_store: Callable[[], Awaitable[Any]] | None = None) -> None:
        self.config = config
        self._open_store = open_store
        """Opens the store (compose: the replicated record's projection); None: the SQLite file."""
        self.clock: Clock = clock or WallClock()
        self._serve_http = serve_http
        self.layout = layout
        self.metrics = HubMetrics()
        self.registry = SiteRegistry(heartbeat_s=config.heartbeat_s, miss_limit=config.miss_limit)
        self.keys = auth.KeyRing(clock=self.clock.time)
        self.rng = random.Random(config.seed)
        self.rate_limiter = TokenBuckets(config.default_rate_per_s, config.default_burst)
        self.rtt: latency.RttIndex | None = None
        self.router: Router = None  # type: ignore[assignment]  # set in start()
        self.origin_ids: set[str] = set()
        self.db: Any = None
        self.bus = HubBus(
            config.nats_url,
            name=f"cpn-hub-{config.hub_id}",
            user=config.nats_user,
            password=config.nats_password,
            on_register=self._on_register,
            on_heartbeat=self._on_heartbeat,
            on_disconnect=self._on_bus_down,
            on_reconnect=self._on_bus_up,
            strict_inboxes=config.strict_inboxes if config.strict_inboxes is not None else bool(config.nats_user),
            site_limits=config.site_limits,
            tls_ca=config.nats_tls_ca,
            tls_cert=config.nats_tls_cert,
            tls_key=config.nats_tls_key,
        )
        self.inference = InferenceService(self)
        self.request_ids = RequestIds()
        self.site_listeners: list[SiteListener] = []
        self.services: list[Service] = []
        self.permission_violations = 0
        self.started_at = 0.0
        self.tasks = BackgroundTasks("hub")
        """The hub's own background work (the sweep, re-registration requests)."""
        self._reregister_asked: dict[str, float] = {}
        self._models_cache: tuple[int, frozenset[str]] = (-1, frozenset())
        self.usage = UsageBuffer()
        self.gateway: Any = None
        self._tenants: dict[str, dict[str, Any]] = {}
        self._key_misses: dict[str, tuple[float, str]] = {}
        self._cidrs: list[tuple[Any, str]] = []
        self.route_modules: list[Any] = []
        """Extra gateway modules (each with ``add_routes(app)``) that services plug in."""
        self.declarations: dict[str, declarations.Declaration] = {}
        """What the operator declared of each site: the layout's sites, then ``PUT /v1/sites/{site}``."""
        self.readiness = Readiness()
        """What ``/readyz`` reports; composition roots may hold gates of their own (``cpn up``)."""
        scrape.install(self)  # sites, cards, replicas, jobs, deployments, NATS counters at scrape time

    def __repr__(self) -> str:
        return f"<Hub {self.config.hub_id} sites={len(self.registry)} {self.registry!r} {self.bus!r}>"

    # ------------------------------------------------------------------ lifecycle

    async def start(self, *, serve_http: bool = True) -> None:
        """Open the store, load the layout, connect to NATS, start loops and the gateway."""
        self.started_at = self.clock.time()
        self.db = await self._open_store() if self._open_store is not None else store_db.open_db(self.config.db_path)
        for principal in store_tenants.load_keys(self.db, now=self.clock.time()):
            self.keys.add(principal)
        if self.layout is None:
            self.layout = loader.load(self.config.layout) if self.config.layout else loader.load_default()
        self.rtt = latency.RttIndex.build(self.layout)
        self.router = Router(self.rtt)
        self.origin_ids = {o.id for o in self.layout.origins}
        nets = [(ipaddress.ip_network(cidr, strict=False), origin) for cidr, origin in self.layout.cidrs.items()]
        # Longest prefix first, so a /24 inside a /16 wins.
        self._cidrs = sorted(nets, key=lambda pair: -pair[0].prefixlen)
        for row in store_tenants.list_tenants(self.db):
            self._tenants[row["id"]] = row
        self.declarations = {s.id: self._layout_declaration(s.id) for s in self.layout.sites}
        for site_id, fields in store_sites.declarations(self.db).items():
            try:
                self.declarations[site_id] = self._merge_declaration(site_id, fields)
            except (msgspec.ValidationError, TypeError) as exc:
                log.error("event=bad_stored_declaration site=%s error=%s", site_id, exc)
        static = [self._static(d) for d in self.declarations.values()]
        seen_before = []
        for row in store_sites.list_sites(self.db):
            seen_before.append(row["id"])
            if row["id"] not in self.declarations and self.config.accept_undeclared_sites:
                static.append(StaticSite(id=row["id"], tier=row["tier"] or "edge", city=row["city"] or "",
                                         provider=row["provider"] or "", accelerators=row["accelerators"],
                                         local_model_tenants=frozenset(self.config.local_model_tenants)))
        self.registry.remember(static)
        await self.bus.connect()
        replicas = self.config.event_stream_replicas or (3 if self.bus.clustered else 1)
        await self.bus.ensure_event_stream(replicas)
        self.tasks.spawn(self._sweep_loop(), name="sweep")
        for service in self.services:
            await service.start()
        await self._ask_known_sites_to_register(seen_before)
        if serve_http:
            if self._serve_http is None:
                raise RuntimeError("this hub was built without a gateway (see controlplane.compose.build_hub)")
            self.gateway = await self._serve_http(self, self.config.listen_host, self.config.listen_port)
        log.info("event=hub_started hub=%s nats=%s db=%s event_replicas=%d strict_inboxes=%s", self.config.hub_id,
                 self.config.nats_url, self.config.db_path, replicas, self.bus.strict_inboxes)

    async def stop(self) -> None:
        """Stop serving HTTP, stop services and loops, close NATS and the database."""
        if self.gateway is not None:
            await self.gateway.stop()
            self.gateway = None
        for service in reversed(self.services):
            with contextlib.suppress(Exception):
                await service.stop()
        await self.tasks.close()
        await self.bus.close()
        self._flush_usage()
        if self.db is not None:
            store_db.close(self.db)
            self.db = None

    @property
    def http_port(self) -> int:
        return int(self.gateway.port) if self.gateway is not None else 0

    def add_service(self, service: Service) -> None:
        """Register a service; it is started after the bus connects and stopped before it closes."""
        self.services.append(service)

    def spawn(self, coro: Awaitable[None], name: str) -> None:
        """Run a background coroutine owned by the hub (dropped when done, cancelled at stop)."""
        self.tasks.spawn(coro, name)

    # ------------------------------------------------------------------ sites

    def set_draining(self, site: str, on: bool) -> None:
        """Drain a site (``on``) or undo it: recorded first (it survives restarts), then routed around."""
        store_sites.set_draining(self.db, site, on)
        self.registry.set_draining(site, on)

    # ------------------------------------------------------------------ declarations

    def _layout_declaration(self, site_id: str) -> declarations.Declaration:
        assert self.layout is not None
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
        if "region" not in fields and self.layout is not None and merged.get("city"):
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

    def declare_site(self, site_id: str, fields: dict[str, Any]) -> declarations.Declaration:
        """Keep an operator's declaration of a site and apply it at once (a live site is narrowed to
        it; its next ``Register`` is checked against it).

        Raises:
            msgspec.ValidationError: the fields do not make a declaration.
        """
        decl = self._merge_declaration(site_id, fields)
        store_sites.declare_site(self.db, site_id, fields, self.clock.time())
        self.declarations[site_id] = decl
        self.registry.declare(self._static(decl))
        log.info("event=site_declared site=%s tier=%s city=%s accelerators=%s local_model_tenants=%s",
                 site_id, decl.tier, decl.city, decl.accelerators, ",".join(decl.local_model_tenants))
        return decl

    def _on_register(self, msg: wire.Register) -> wire.RegisterAck | wire.ErrorReply:
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
        assert self.layout is not None and self.rtt is not None
        try:
            static = self.layout.site(msg.site)
            view.region = static.region
        except KeyError:
            known = False
            view.region = decl.region if decl is not None else ""
            self._attach_unknown_site(msg)
        store_sites.upsert_site(
            self.db, site=msg.site, tier=msg.tier, city=msg.city, provider=msg.provider,
            accelerators=dict(msg.accelerators), now=now,
        )
        self._reregister_asked.pop(msg.site, None)
        log.info("event=site_registered site=%s tier=%s city=%s new=%s known=%s", msg.site, msg.tier, msg.city, new, known)
        return wire.RegisterAck(hub=self.config.hub_id, heartbeat_s=self.config.heartbeat_s, known=known)

    def _attach_unknown_site(self, msg: wire.Register) -> None:
        """A site not in the layout is placed at its city (or its own coordinates)."""
        assert self.layout is not None and self.rtt is not None
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
        self.router.invalidate()

    def _on_heartbeat(self, msg: wire.Heartbeat) -> None:
        now = self.clock.time()
        view, came_back = self.registry.heartbeat(msg, now)
        if view is None or not view.registered:
            last = self._reregister_asked.get(msg.site, 0.0)
            if now - last > 2.0:
                self._reregister_asked[msg.site] = now
                self.spawn(self._ask_reregister(msg.site), name=f"reregister-{msg.site}")
        if came_back:
            log.info("event=site_back site=%s", msg.site)
            for listener in self.site_listeners:
                listener(Transition(msg.site, "lost", "up", now))

    async def _ask_known_sites_to_register(self, sites: list[str]) -> None:
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

    def _on_bus_down(self) -> None:
        self.registry.bus_down(self.clock.time())

    def _on_bus_up(self) -> None:
        self.registry.bus_up(self.clock.time())

    async def _sweep_loop(self) -> None:
        last_flush = self.clock.monotonic()
        while True:
            before = self.clock.monotonic()
            await self.clock.sleep(self.config.sweep_s)
            stalled_s = self.clock.monotonic() - before - self.config.sweep_s
            if stalled_s > self.config.heartbeat_s:
                # This process stood still (a write waiting for the replicated record's quorum, a
                # pause): the heartbeats it missed are queued, not lost. Read them before judging.
                log.warning("event=loop_stalled seconds=%.2f", stalled_s)
                continue
            now = self.clock.time()
            for t in self.registry.sweep(now):
                self._site_lost(t)
            if self.clock.monotonic() - last_flush >= self.config.usage_flush_s:
                last_flush = self.clock.monotonic()
                self._flush_usage()

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
        for listener in self.site_listeners:
            try:
                listener(t)
            except Exception:
                log.exception("event=site_listener_failed site=%s", t.site)

    def known_models(self) -> frozenset[str]:
        version, models = self._models_cache
        if version != self.registry.version:
            models = frozenset(m for v in self.registry for m in v.replicas)
            self._models_cache = (self.registry.version, models)
        return models

    # ------------------------------------------------------------------ accounting

    def account(self, req: wire.InferRequest, result: wire.InferResult, site: str) -> None:
        """Count a served request (flushed to the store in batches, never per request)."""
        self.usage.add(req.tenant, req.model, site, result.prompt_tokens, result.completion_tokens)
        self.metrics.served(req.tenant, req.model, site, result.prompt_tokens, result.completion_tokens, result.service_ms)

    def _flush_usage(self) -> None:
        """Write buffered usage in one transaction; on failure keep it for the next flush."""
        if not len(self.usage) or self.db is None:
            return
        rows = self.usage.drain()
        try:
            store_usage.add_rows(self.db, rows)
        except Exception:
            self.usage.restore(rows)
            log.exception("event=usage_flush_failed rows=%d", len(rows))

    def usage_for(self, tenant: str) -> dict[str, Any]:
        """A tenant's usage, flushed rows plus what is still buffered."""
        return store_usage.for_tenant(self.db, tenant, pending=self.usage.peek(tenant))

    # ------------------------------------------------------------------ tenants and keys

    def list_tenants(self) -> list[dict[str, Any]]:
        """Every tenant as recorded."""
        return store_tenants.list_tenants(self.db)

    def create_tenant(self, tenant_id: str, *, name: str = "", default_origin: str | None = None,
                      quota_cards: int | None = None, rate_per_s: float | None = None,
                      burst: int | None = None) -> str:
        """Create a tenant with one API key; returns the key (shown once, stored hashed)."""
        now = self.clock.time()
        row = store_tenants.create_tenant(
            self.db, tenant_id, name=name, now=now, default_origin=default_origin, quota_cards=quota_cards,
            rate_per_s=rate_per_s, burst=burst,
        )
        key = auth.new_key(tenant_id[:12])
        self.keys.add(store_tenants.add_key(self.db, key, role="tenant", tenant_id=tenant_id, now=now, label="first"))
        self._tenants[tenant_id] = row
        return key

    def add_tenant_key(self, tenant_id: str, label: str = "") -> str:
        """Issue one more key for an existing tenant."""
        key = auth.new_key(tenant_id[:12])
        self.keys.add(store_tenants.add_key(self.db, key, role="tenant", tenant_id=tenant_id, now=self.clock.time(), label=label))
        return key

    def create_admin_key(self, label: str = "") -> str:
        key = auth.new_key("admin")
        self.keys.add(store_tenants.add_key(self.db, key, role="admin", tenant_id=None, now=self.clock.time(), label=label))
        return key

    def rate_limit(self, principal: auth.Principal, request: object) -> None:
        """Per-tenant token bucket (the tenant's own plan, else the hub's defaults).

        Raises:
            RateLimited: with the seconds until the next request would be allowed.
        """
        tenant = principal.tenant_id
        if tenant is None:  # operators are not rate limited
            return
        row = self.tenant(tenant) or {}
        ok, retry_after_s = self.rate_limiter.take(
            tenant, self.clock.monotonic(), rate_per_s=row.get("rate_per_s") or None, burst=row.get("burst") or None,
        )
        if not ok:
            raise RateLimited(f"tenant {tenant!r} is over its request rate; retry in {retry_after_s:.2f} s",
                              retry_after_s=retry_after_s)

    def lookup_key_in_store(self, key: str) -> auth.Principal | None:
        """A key the in-memory ring does not answer for: issued elsewhere (``cpn key create``), not
        re-read within the last second, or expired. None if no such key; raises Unauthorized
        ("API key revoked" / "API key expired") for a key that stopped working (controlplane/services/keys.py)."""
        try:
            return keys_lifecycle.lookup_in_store(self.db, self.keys, key, self._key_misses, now=self.clock.time(),
                                                  monotonic=self.clock.monotonic())
        except Unauthorized as exc:
            self.metrics.key_refused(exc.code.removeprefix("api_key_"))
            raise

    def record_changed(self, table: str, row: dict[str, Any]) -> None:
        """A row written by another hub process reached this one's store: drop what is cached of it."""
        if table == "api_keys" and "key_hash" in row:
            self.keys.remove(row["key_hash"])
            self._key_misses.pop(row["key_hash"], None)
        elif table == "tenants" and "id" in row:
            self._tenants.pop(row["id"], None)

    def tenant(self, tenant_id: str) -> dict[str, Any] | None:
        row = self._tenants.get(tenant_id)
        if row is None and self.db is not None:
            try:
                row = store_tenants.get_tenant(self.db, tenant_id)
            except Exception:
                return None
            self._tenants[tenant_id] = row
        return row

    def tenant_default_origin(self, tenant_id: str) -> str | None:
        row = self.tenant(tenant_id)
        return row.get("default_origin") if row else None

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

    # ------------------------------------------------------------------ views for the gateway

    def sites_snapshot(self) -> list[dict[str, object]]:
        now = self.clock.time()
        return [v.as_dict(now) for v in sorted(self.registry, key=lambda v: v.id)]

    def refresh_metrics(self) -> None:
        counts = self.registry.counts()
        for state in ("up", "lost", "draining"):
            self.metrics.sites.labels(state).set(counts.get(state, 0))
        # NATS error and malformed-message counters are read by controlplane/scrape.py.
        self.metrics.site_figures_clamped.counts = {(k,): n for k, n in self.registry.clamped.items()}

