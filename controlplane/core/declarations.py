"""What the operator declared about each site, and how much of a site's own word the hub believes.

Pure: no I/O, no clock. The hub builds :class:`Declaration` objects from its layout and from the
operator's ``PUT /v1/sites/{site}`` (kept in the record), then asks :func:`check_register` about each
``Register`` and :func:`clamp_heartbeat` / :func:`clamp_replicas` about each heartbeat.

Rule 1 (declared facts win): tier, city, provider, region, TEE and the cards of a declared site come
from its declaration, never from the agent. A claim that differs is replaced by the declared value
and counted (``ignored`` reasons).
Rule 2 (cards): an agent may claim *fewer* cards than declared (it holds some back); that is
honoured. A claim of more cards than declared, of an accelerator type not declared, of a negative
or absurd count refuses the whole registration with a reason (an ``ErrorReply`` the agent logs).
Rule 3 (undeclared sites): a site neither in the layout nor declared is refused, unless the hub runs
with ``accept_undeclared_sites`` (development), where its claims are believed within the sanity
bounds of Rule 2.
Rule 4 (load figures): every figure of a heartbeat is clamped to its physical range on receipt:
free cards within 0..the site's cards, queue depth and in-flight counts >= 0, replica busy slots
within 0..slots, slots within 0..:data:`MAX_SLOTS`, service times finite and >= 0, progress within
0..1, and no more running attempts listed than the site has cards (each attempt holds at least one).
Rule 5 (site-local models): a replica a site loaded itself (no deployment, or ``local``) may serve a
tenant only if the operator allowed that tenant for that site (``local_model_tenants``; ``*`` is
every tenant). Replicas placed by a deployment are governed by the deployment's own scope.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import msgspec

from edge_agent import wire

MAX_CARDS = 100_000
"""More cards of one type than any real pool holds: a claim above this is absurd, declared or not."""
MAX_SLOTS = 100_000
"""Concurrent inference slots a replica may claim at most."""
TIERS = ("hub", "regional", "edge")
LOCAL_DEPLOYMENTS = frozenset({"", "local"})
"""Deployment ids of replicas a site loaded itself (not placed by a deployment)."""


class Declaration(msgspec.Struct, frozen=True, kw_only=True):
    """The operator's word on one site (from the layout or ``PUT /v1/sites/{site}``)."""

    id: str
    tier: str = "edge"
    city: str = ""
    provider: str = ""
    region: str = ""
    accelerators: dict[str, int] = {}
    lat: float | None = None
    lon: float | None = None
    tee: bool = False
    """The site has a trusted execution environment (a site may claim not to, never to have one)."""
    local_model_tenants: tuple[str, ...] = ()
    """Tenants that may call the models the site loads itself (``*``: every tenant)."""
    source: str = "layout"
    """``layout`` or ``operator``."""


class RegisterVerdict(msgspec.Struct, frozen=True, kw_only=True):
    """What the hub believes of one ``Register``: ``refused`` (a reason code) or the message to apply."""

    refused: str = ""
    detail: str = ""
    believed: wire.Register | None = None
    ignored: tuple[str, ...] = ()
    """Claims replaced by declared values (``tier``, ``city``, ``provider``)."""


def _bad_count(n: object) -> str:
    if not isinstance(n, int) or isinstance(n, bool):
        return "absurd_cards"
    if n < 0:
        return "negative_cards"
    if n > MAX_CARDS:
        return "absurd_cards"
    return ""


def check_register(decl: Declaration | None, msg: wire.Register, *, accept_undeclared: bool) -> RegisterVerdict:
    """Decide how much of ``msg`` to believe (Rules 1-3)."""
    for acc, n in msg.accelerators.items():
        why = _bad_count(n)
        if why:
            return RegisterVerdict(refused=why, detail=f"{n!r} {acc} cards is not a card count (0..{MAX_CARDS})")
    if decl is None:
        if not accept_undeclared:
            return RegisterVerdict(
                refused="undeclared_site",
                detail=f"site {msg.site!r} is not in the hub's layout and no operator declared it "
                       f"(PUT /v1/sites/{msg.site}/declaration)")
        return RegisterVerdict(believed=msg)
    for acc, n in msg.accelerators.items():
        declared = decl.accelerators.get(acc, 0)
        if n > declared:
            return RegisterVerdict(
                refused="over_declared",
                detail=f"claims {n} {acc} cards; the operator declared {declared} for {msg.site}")
    ignored = tuple(f for f, claimed, declared in (
        ("tier", msg.tier, decl.tier), ("city", msg.city, decl.city), ("provider", msg.provider, decl.provider),
    ) if claimed and declared and claimed != declared)
    tier = decl.tier if decl.tier in TIERS else "edge"
    believed = msgspec.structs.replace(
        msg, tier=tier, city=decl.city or msg.city, provider=decl.provider or msg.provider,
        accelerators={a: n for a, n in msg.accelerators.items() if n > 0},
        lat=decl.lat if decl.lat is not None else msg.lat, lon=decl.lon if decl.lon is not None else msg.lon,
        tee=msg.tee and decl.tee,
    )
    return RegisterVerdict(believed=believed, ignored=ignored)


def _finite(x: float, hi: float = math.inf) -> float:
    if not math.isfinite(x) or x < 0:
        return 0.0 if not (x > 0) else hi  # NaN and negatives -> 0, +inf -> the ceiling
    return min(x, hi)


def clamp_replicas(models: Iterable[wire.ReplicaStatus], total_cards: int, clamped: dict[str, int]) -> list[wire.ReplicaStatus]:
    """Replica figures within their physical range (Rule 4); counts what it changed in ``clamped``."""
    out = []
    for r in models:
        slots = min(max(r.slots, 0), MAX_SLOTS)
        busy = min(max(r.busy, 0), slots)
        cards = _finite(r.cards, float(total_cards))
        if (slots, busy, cards) != (r.slots, r.busy, r.cards):
            clamped["replica"] = clamped.get("replica", 0) + 1
            r = msgspec.structs.replace(r, slots=slots, busy=busy, cards=cards)
        out.append(r)
    return out


def clamp_attempts(attempts: list[wire.AttemptRef], total_cards: int, clamped: dict[str, int]) -> list[wire.AttemptRef]:
    """At most one listed attempt per card, progress within 0..1 (Rule 4)."""
    if len(attempts) > total_cards:
        clamped["attempts"] = clamped.get("attempts", 0) + 1
        attempts = attempts[:total_cards]
    out = []
    for a in attempts:
        if not 0.0 <= a.progress <= 1.0:
            clamped["progress"] = clamped.get("progress", 0) + 1
            a = msgspec.structs.replace(a, progress=min(max(_finite(a.progress, 1.0), 0.0), 1.0))
        out.append(a)
    return out


def clamp_heartbeat(msg: wire.Heartbeat, accelerators: dict[str, int], clamped: dict[str, int]) -> wire.Heartbeat:
    """A heartbeat with every load figure in its physical range (Rule 4). ``accelerators`` are the
    site's believed cards; ``clamped`` counts by figure what was out of range."""
    total = sum(accelerators.values())
    free = {a: min(_finite(msg.free_cards.get(a, 0.0), float(n)), float(n)) for a, n in accelerators.items()}
    if any(a not in free or v != free[a] for a, v in msg.free_cards.items()):
        clamped["free_cards"] = clamped.get("free_cards", 0) + 1
    queue = max(msg.queue_depth, 0)
    inflight = max(msg.inflight, 0)
    if (queue, inflight) != (msg.queue_depth, msg.inflight):
        clamped["queue"] = clamped.get("queue", 0) + 1
    p50, p99 = _finite(msg.service_ms_p50, 3.6e6), _finite(msg.service_ms_p99, 3.6e6)
    if (p50, p99) != (msg.service_ms_p50, msg.service_ms_p99):
        clamped["service_ms"] = clamped.get("service_ms", 0) + 1
    return msgspec.structs.replace(
        msg, free_cards=free, queue_depth=queue, inflight=inflight, service_ms_p50=p50, service_ms_p99=p99,
        models=clamp_replicas(msg.models, total, clamped),
        attempts=clamp_attempts(msg.attempts, total, clamped),
    )


def may_use_local(allowed: frozenset[str], tenant: str) -> bool:
    """Rule 5: ``tenant`` may be served by this site's own replicas ("" is an operator: always)."""
    return not tenant or tenant in allowed or "*" in allowed
