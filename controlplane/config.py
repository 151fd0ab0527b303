"""The hub's configuration: one frozen Struct, from TOML (``cpn hub --config``) or flags.

Unknown keys are rejected with the key's name (``forbid_unknown_fields``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import msgspec

from controlplane.core.errors import RequestError
from controlplane.core.sitegate import SiteLimits as SiteLimits  # a part of HubConfig, defined beside its rules


class AutoscaleConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Deployments that scale (``min_replicas``/``max_replicas``; docs/inference.md, "Autoscaling")."""

    interval_s: float = 5.0
    """How often the autoscaler decides."""
    scale_in_after_s: float = 600.0
    """How long a replica the autoscaler added sits idle (and at least how old it is) before it is
    removed: the cool-down."""
    demand_fast_s: float = 60.0
    """Time constant of the demand meter's fast mean (how quickly a rise is followed)."""
    demand_slow_s: float = 900.0
    """Time constant of its slow mean (how slowly a fall is believed)."""

    def __post_init__(self) -> None:
        for name in ("interval_s", "scale_in_after_s", "demand_fast_s", "demand_slow_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"autoscale.{name} must be > 0")


TIDAL_PROFILE_24H = (0.35, 0.25, 0.18, 0.14, 0.12, 0.14, 0.25, 0.5, 0.8, 1.0, 1.05, 1.0,
                     0.9, 0.9, 0.95, 1.0, 1.0, 0.95, 0.95, 1.05, 1.15, 1.2, 1.0, 0.65)
"""A weekday-like inference demand curve by China local hour (illustrative, as ``cpn sim``'s)."""


class LendingConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Tidal lending (``[lending]``; docs/training.md, "Tidal lending"): idle inference cards of
    sites of ``tiers`` offered to training until before the forecast ramp, reclaimed checkpoint-first."""

    enabled: bool = False
    """Off: training may use any free card of any site (the scheduler's pools as heartbeats say)."""
    tiers: tuple[str, ...] = ("edge",)
    profile: tuple[float, ...] = TIDAL_PROFILE_24H
    """The declared demand profile: 24 relative rates by China local hour (the forecast's shape)."""
    peak_need_share: float = 1.0
    """At the profile's peak hour inference may need this share of a site's cards."""
    headroom: float = 1.5
    """What replicas hold now, grown along the profile, times this, is needed too."""
    margin_s: float = 900.0
    """Lent cards are back this long before the hour that needs them."""
    min_lend_s: float = 3600.0
    """No offer shorter than this."""
    inference_first: tuple[str, ...] = ()
    """Accelerator types inference keeps first (Rule 6 of ``core/lending.py``): a site's forecast is
    met by its cards of these types before its others, and they are never lent (e.g. ``["H20"]``
    beside lendable L20)."""
    forecast: str = "learnt"
    """``learnt``: each lending site's forecast shape is its region's requests by local hour as this
    process observed them (the autoscaler's demand counts; ``profile`` the prior for hours not
    observed yet); ``declared``: ``profile`` alone."""

    def __post_init__(self) -> None:
        if len(self.profile) != 24 or min(self.profile) < 0 or max(self.profile) <= 0:
            raise ValueError("lending.profile: 24 non-negative rates by local hour, not all zero")
        if self.forecast not in ("learnt", "declared"):
            raise ValueError(f"lending.forecast: want 'learnt' or 'declared', got {self.forecast!r}")
        if not 0 < self.peak_need_share <= 1:
            raise ValueError("lending.peak_need_share must be in (0, 1]")
        if self.headroom < 1 or self.margin_s < 0 or self.min_lend_s <= 60:
            raise ValueError("lending: headroom >= 1, margin_s >= 0, min_lend_s > 60 (a gang's stop comes "
                             "its checkpoint time and 60 s before the reclaim)")


class GatewayConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The HTTP gateway's own switches (``[gateway]``; docs/architecture.md, "The hot path")."""

    hot_routes: bool = True
    """Answer ``POST /v1/chat/completions`` and ``/v1/completions`` below aiohttp, in the
    connection's own protocol (the same guard, routing, relay and answers; any other request hands
    the connection to aiohttp for good). Off: aiohttp serves every request."""


class HubConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    hub_id: str = "hub"
    nats_url: str = "nats://127.0.0.1:4222"
    nats_user: str | None = None
    nats_password: str | None = None
    db_path: str = ".cpn/hub.db"
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    layout: str | None = None
    """Layout file; None means the shipped national layout."""
    gateway_city: str | None = None
    """The city (an origin id of the layout) where this process's gateway stands. Set, every request
    is routed and budgeted on the full path origin -> this city -> site, reported in
    ``X-CPN-RTT-Ms`` with ``X-CPN-Ingress: <city>``, and an origin nearer to another of the layout's
    gateway cities gets ``X-CPN-Nearer-Gateway``. None: the gateway's place is not modelled and the
    RTT counts origin -> site only (a laptop's ``cpn up``)."""
    heartbeat_s: float = 1.0
    miss_limit: int = 3
    """Heartbeats missed in a row before a site is lost (detection = heartbeat_s x miss_limit)."""
    sweep_s: float = 0.25
    default_budget_ms: float = 10.0
    budget_counts_overhead: bool = True
    """The budget is checked on the promise, RTT + cpn's own measured time (``X-CPN-Promise-Ms``,
    docs/topology.md); false: on the network's RTT alone (the overhead is still stated)."""
    site_timeout_s: float = 5.0
    """Longest the gateway waits for one site's first answer before failing over."""
    site_ack_timeout_s: float = 1.0
    """Longest the gateway waits for a site that acknowledges requests (``Register.infer_acks``) to
    answer or acknowledge one before failing over: a partitioned site is left after this, not
    after ``site_timeout_s``. 0 turns it off."""
    max_body_bytes: int = 1 << 20
    max_connections: int = 1024
    header_timeout_s: float = 10.0
    default_rate_per_s: float = 200.0
    default_burst: int = 400
    usage_flush_s: float = 1.0
    scheduler_tick_s: float = 0.5
    scheduler_poke_gap_s: float = 0.05
    """A tick asked for at once (a submission, an exit, a cancellation) starts at least this long
    after the last tick ended, and at least 4x as long as that tick held the event loop (never
    more than ``scheduler_tick_s``): pokes that come meanwhile share one tick, so a burst of
    submissions over a long queue does not re-plan the whole queue once per submission."""
    scheduler_full_plan_s: float = 5.0
    """A tick after which nothing changed but new submissions (the pools, running jobs, tenants
    and the rest of the queue as the last full plan saw them, and that plan started and stopped
    nothing) plans only the new jobs, as the full plan would; a full plan of the whole queue runs
    at least this often, and on any other change. 0: every tick plans the whole queue."""
    event_stream_replicas: int = 0
    """Replicas of the ``CPN_EVENTS`` stream. 0 (default): 3 when the NATS server the hub connects
    to is part of a cluster (its INFO names one), else 1."""
    event_regions: dict[Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")],
                        Annotated[int, msgspec.Meta(ge=1, le=5)]] = {}
    """Regional event streams of a super-cluster: region id (of the layout) -> replicas of its stream
    ``CPN_EVENTS_<region>``, placed in that region (JetStream tag ``region:<id>``). The events of the
    layout's sites in those regions are stored there, so a region cut off from the controller keeps
    them durably in-region. Empty (default): every site's events go to ``CPN_EVENTS``."""
    strict_inboxes: bool | None = None
    """Drop registrations whose reply subject is not in the site's own inbox (agents always use
    ``_INBOX.<site>``). None (default): on when the hub authenticates to NATS (``nats_user``), i.e.
    with the per-site identities of ``cpn deploy nats-config``; off for an open development server."""
    seed: int | None = None
    """Seed of the router's random choices (None: from the OS)."""
    sim_time_scale: float = 1.0
    """Simulated seconds per wall second for sim training attempts (demos run hours in minutes)."""
    accept_undeclared_sites: bool = False
    """Believe sites that are neither in the layout nor declared (``PUT /v1/sites/{site}``), within
    sanity bounds. For development only: by default such a site's ``Register`` is refused."""
    local_model_tenants: list[str] = []
    """Tenants allowed to call every site's own models (``*``: all), on top of each site's declared
    ``local_model_tenants``. Empty by default: a site's own models serve only tenants declared for it."""
    vanished_heartbeats: int = 5
    """Heartbeats in a row an up site may omit a started attempt before the hub fails it ``vanished``
    and restarts it from its checkpoint."""

    keepalive_timeout_s: float = 30.0
    """An idle keep-alive connection (no request under way, no byte of a next one) is closed after
    this. ``header_timeout_s`` bounds each request's headers, from their first byte to their end."""
    max_connections_per_client: int = 256
    """Open gateway connections one client address may hold; beyond it a new one gets a 503.
    Connections from ``trusted_proxies`` count only toward ``max_connections``."""
    trusted_proxies: tuple[str, ...] = ()
    """CIDRs of the reverse proxies in front of the gateway: only from these is ``X-Forwarded-For``
    believed (the client address origin-by-CIDR reads), and they are exempt from the per-client cap."""
    tls_cert: str | None = None
    """PEM certificate chain of the gateway: with ``tls_key`` it serves HTTPS only (TLS 1.2 or newer)."""
    tls_key: str | None = None
    """PEM private key of ``tls_cert``."""
    body_timeout_s: float = 30.0
    """Longest a request body may take to arrive once its headers have (else 408 ``body_timeout``)."""
    site_limits: SiteLimits = SiteLimits()
    nats_tls_ca: str | None = None
    """CA file that signed the NATS servers' certificates: TLS on, server verified (host name too)."""
    nats_tls_cert: str | None = None
    """Client certificate (with ``nats_tls_key``) for servers that verify clients (mutual TLS)."""
    nats_tls_key: str | None = None
    record: Literal["sqlite", "nats"] = "sqlite"
    """Where the record (tenants, keys, idempotency keys, jobs, attempts, deployments, replicas,
    usage) lives. ``sqlite`` (default): the SQLite file at ``db_path`` alone, no extra server.
    ``nats``: the replicated JetStream KV bucket ``CPN_RECORD`` (3 replicas) on ``record_nats_urls``,
    shared by every hub process; ``db_path`` is then this process's projection of it (docs/architecture.md §16)."""
    record_nats_urls: list[str] = []
    """NATS URLs of the cluster holding the record (default: ``nats_url``)."""
    record_write_deadline_s: float = 12.0
    """How long a write to the replicated record keeps trying before it is refused (503
    ``record_unavailable``). It must outlast a stream leader election (4-9 s) to ride out the loss of
    one NATS node; the event loop waits meanwhile."""
    record_pipelined_writes: bool = True
    """Writes that may (submissions) await the record's quorum without holding the event loop, several
    in flight at once (docs/architecture.md §16); false: every write blocks the loop until the
    record answers, one at a time (the earlier behaviour, kept for same-run comparisons)."""
    role: Literal["hub", "gateway", "controller"] = "hub"
    """What this process does: ``hub`` both (the default), ``gateway`` tenants' HTTP only (never
    decides), ``controller`` decides (scheduler, deployments, commands to sites) without HTTP. A
    ``gateway`` or ``controller`` shares the replicated record (``record = "nats"``) with the others;
    controllers elect one leader among themselves (docs/architecture.md, "Roles and the leader")."""

    autoscale: AutoscaleConfig = AutoscaleConfig()
    """The deployments autoscaler's period, cool-down and demand meter (``[autoscale]``)."""
    training_min_wait_saving_pct: Annotated[float, msgspec.Meta(ge=0, le=100)] = 20.0
    """A training job waits for a cheaper tariff window only if that saves at least this percentage
    of its start-now energy cost (and its deadline allows it, or it asked ``prefer: cost``;
    docs/training.md, "Waiting for a cheaper window")."""
    lending: LendingConfig = LendingConfig()
    """Tidal lending of idle inference cards to training (``[lending]``)."""
    nats_ping_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 0.5
    """How often the hub's NATS connections (its bus: requests to sites, and sites' traffic) PING
    their server. With ``nats_max_outstanding_pings`` a dead or frozen server (a paused node keeps
    its sockets open) is left for another node within ``nats_ping_interval_s *
    (nats_max_outstanding_pings + 1)`` = 1.5 s (docs/operations.md, "NATS client timeouts")."""
    nats_max_outstanding_pings: Annotated[int, msgspec.Meta(ge=1)] = 2
    """Unanswered PINGs in a row after which a connection is dropped as stale and another server tried."""
    gateway: GatewayConfig = GatewayConfig()
    """The HTTP gateway's switches (``[gateway]``)."""

    def __post_init__(self) -> None:
        if self.role != "hub" and self.record != "nats":
            raise ValueError(f"role {self.role!r} needs the replicated record (record = \"nats\"): a {self.role} "
                             "on a SQLite file of its own would never meet the other role")


def load_hub_config(path: Path | str, **overrides: object) -> HubConfig:
    """Decode a TOML file into :class:`HubConfig`; flags given as ``overrides`` win."""
    try:
        cfg = msgspec.toml.decode(Path(path).read_bytes(), type=HubConfig)
    except FileNotFoundError:
        raise RequestError(f"config file {path} not found") from None
    except msgspec.ValidationError as exc:
        raise RequestError(f"{path}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise RequestError(f"{path}: not valid TOML: {exc}") from None
    return msgspec.structs.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
