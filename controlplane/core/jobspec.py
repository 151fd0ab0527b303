"""A training job as its tenant asked for it: :class:`JobSpec`, decoded once and typed end to end.

The path of a spec: the gateway decodes the request body (``gateway.jobs.JobBody``, with the
bounds and the 4xx answers), checks it against the layout and builds a :class:`JobSpec`; the
training service hands that to the store, which keeps it as msgspec JSON in ``jobs.spec`` and
reads it back as a :class:`JobSpec` (never a dict); the tick turns it into the scheduler's view of
a waiting job with :meth:`JobSpec.waiting` (no parsing left, so no tick can fail on a stored spec).

Promises:

- :func:`encode` / :func:`decode` round-trip: ``decode(encode(s)) == s``.
- :func:`decode` reads every spec the hub ever stored (the JSON object of the body's fields, None
  values left out) and ignores fields it does not know (a newer hub's rows stay readable); what
  it cannot read is an ``Unprocessable`` naming the field.
- :meth:`JobSpec.public` is the spec as the API shows it (``GET /v1/jobs/{job}`` ``spec``): the
  fields with a value (``pools`` and ``budget_hold_fen`` only when set).
"""

from __future__ import annotations

from typing import Any

import msgspec

from controlplane.core import placement
from controlplane.core.errors import Unprocessable

DEFAULT_CHECKPOINT_COST_S = 300.0


class JobSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What a tenant asked for (``POST /v1/jobs``), as checked by the gateway and stored."""

    name: str = ""
    cards: int
    accelerators: tuple[str, ...]
    """Accepted accelerator types, in the tenant's order of preference."""
    est_hours: float
    """Run time on ``cards`` A800-equivalents without failures."""
    checkpoint_cost_s: float = DEFAULT_CHECKPOINT_COST_S
    checkpoint_interval_min: float | None = None
    """None: Daly's optimum for the chosen pool."""
    priority: int = 0
    deadline: float | None = None
    """Epoch seconds (the gateway turns ISO 8601 into these)."""
    max_price_cny: float | None = None
    regions: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()
    tee: bool = False
    command: tuple[str, ...] = ()
    image: str | None = None
    max_retries: int | None = None
    """Retries after user errors; None: the lifecycle's default."""
    quote_id: str | None = None
    """Submitted against this quote (``POST /v1/quotes``): billed at most its maximum."""
    quote_pool: str | None = None
    """The quote's option asked for (by pool); once the market bound the quote, the one chosen."""
    quote_accelerator: str | None = None
    """The chosen option's accelerator (the market fills it in when it binds the quote)."""
    pools: tuple[str, ...] = ()
    """Allowed pools; empty allows all (the market pins a job submitted against a quote to its pool)."""
    prefer: placement.Prefer | None = None
    """``time`` / ``cost`` / None: whether the job may wait for a cheaper tariff window
    (``placement.JobSpec.prefer``)."""
    budget_hold_fen: int = 0
    """What the market holds against the tenant's budget while the job lives (its most-it-can-cost,
    set when the job is accepted; never from the body): ``market/budgets.py`` Rule 4."""

    @property
    def workload(self) -> str:
        """``container`` (an image), ``process`` (a command) or ``sim``: which executors can run it
        (``placement.WORKLOAD_EXECUTORS``)."""
        if self.image:
            return "container"
        return "process" if self.command else "sim"

    @property
    def checkpoint_interval_s(self) -> float | None:
        """The asked-for checkpoint interval in seconds, or None (Daly's optimum)."""
        return self.checkpoint_interval_min * 60.0 if self.checkpoint_interval_min else None

    def waiting(self, *, id: str, tenant: str, priority: int, submitted_at: float, progress: float,
                checkpoint_pool: str, restarting: bool) -> placement.JobSpec:
        """The scheduler's view of this job while it waits (queued, or restarting after a failure)."""
        return placement.JobSpec(
            id=id, tenant=tenant, cards=self.cards, accelerators=self.accelerators, est_hours=self.est_hours,
            checkpoint_cost_s=self.checkpoint_cost_s, checkpoint_interval_s=self.checkpoint_interval_s,
            priority=priority, deadline=self.deadline, max_price_cny=self.max_price_cny, regions=self.regions,
            providers=self.providers, tee=self.tee, submitted_at=submitted_at, progress=progress,
            checkpoint_pool=checkpoint_pool, restarting=restarting, workload=self.workload, pools=self.pools,
            prefer=self.prefer,
        )

    def public(self) -> dict[str, Any]:
        """The spec as the API shows it: every field with a value (None left out; tuples are JSON lists);
        ``pools`` only when the market pinned the job and ``budget_hold_fen`` only when it holds
        budget (the body as posted has no such fields, so a spec straight from the body gives the
        body's own fields: ``gateway.jobs.body_hash``)."""
        return {k: v for k, v in msgspec.to_builtins(self).items()
                if v is not None and not (k in _MARKET_FILLED and not v)}


_MARKET_FILLED = frozenset({"pools", "budget_hold_fen"})
"""Fields the market fills in (never from the body): shown only when set."""
_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(JobSpec)


def encode(spec: JobSpec) -> bytes:
    """The stored form (msgspec JSON)."""
    return _ENCODER.encode(spec)


def decode(data: str | bytes) -> JobSpec:
    """A stored (or any JSON) spec.

    Raises:
        Unprocessable: not a JSON object of a spec's fields (``field`` is the path msgspec names,
            ``body`` when the text is not JSON at all).
    """
    try:
        return _DECODER.decode(data)
    except msgspec.ValidationError as exc:
        raise Unprocessable(f"job spec: {exc}", field=_field_of(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise Unprocessable(f"job spec is not JSON: {exc}", field="body") from None


def _field_of(message: str) -> str:
    # msgspec says "... - at `$.cards`" or "Object missing required field `cards`".
    if "at `$." in message:
        return message.rsplit("at `$.", 1)[1].rstrip("`").split("[", 1)[0].split(".", 1)[0]
    if "required field `" in message:
        return message.split("required field `", 1)[1].split("`", 1)[0]
    return "body"
