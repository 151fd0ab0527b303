"""The jobs API (tenant key): submit, list, inspect, follow and cancel training jobs.

::

    POST   /v1/jobs               JobBody, header Idempotency-Key (optional) -> 201 job view
    GET    /v1/jobs               ?state=...&limit=... -> {"object": "list", "data": [summary...]}
    GET    /v1/jobs/{job}         full view: state, attempts, pool, progress, checkpoint, cost, placement
    GET    /v1/jobs/{job}/events  its events after a cursor; long-poll (wait_s) or follow (SSE): job_events.py
    DELETE /v1/jobs/{job}         cancel -> 200 job view (409 if it already finished)

Promises:

- 201 only after the job is committed to SQLite (``store.jobs.create_job`` returns after COMMIT).
- Idempotency is per tenant: the same ``Idempotency-Key`` with the same body (compared after
  decoding, so key order and whitespace do not matter) answers exactly the first answer (status and
  body, plus ``Idempotent-Replayed: true``); with another body it is a 422 naming ``Idempotency-Key``.
- Unknown or forbidden fields (``tenant_id``, ``site``, ``attempt`` ...) are a 422 naming the field;
  a wrong type or a value out of range is a 400 naming it; an accelerator or region the layout does
  not know, or a deadline in the past, is a 422 naming it; so is a job no declared site could ever
  run (too many cards for any pool, no pool in its regions with its accelerators, ...), with the reason.
- ``accelerators`` may be omitted: any accelerator a declared site could run the job on.
- The list, the job and ``/v1/usage`` show the same progress and cost (``services.job_views``):
  a running attempt's card time counts as it runs.
- Another tenant's job is a 404, on every endpoint (no hint that it exists).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from typing import Annotated, Any

import msgspec
from aiohttp import web

from controlplane.core import lifecycle
from controlplane.core.errors import NotFound, RequestError
from controlplane.core.jobspec import JobSpec
from controlplane.core.placement import Prefer
from controlplane.gateway import job_events
from controlplane.gateway.app import SERVICES, Routes, idempotency_key, json_response, read_body, require_tenant
from controlplane.gateway.openapi import Op
from controlplane.services.job_views import JobFigures, JobViews
from controlplane.services.market import QUOTE_FIELDS
from controlplane.services.training import AttemptRow, JobRow, TrainingService


Name = Annotated[str, msgspec.Meta(max_length=200)]
Token = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Arg = Annotated[str, msgspec.Meta(max_length=4096)]
IMAGE_PATTERN = (r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]{1,5})?(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
                 r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$")
"""A container image reference: ``[registry[:port]/]path[:tag][@sha256:digest]``, lower-case path."""
Image = Annotated[str, msgspec.Meta(min_length=1, max_length=255, pattern=IMAGE_PATTERN)]

MAX_PRIORITY = 9

class JobBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/jobs``: a training job needing ``cards`` cards of one of ``accelerators`` in one pool."""

    name: Name = ""
    cards: Annotated[int, msgspec.Meta(ge=1, le=100_000)]
    accelerators: Annotated[list[Token], msgspec.Meta(min_length=1, max_length=16)] = []
    """Accepted accelerator types, in order of preference (e.g. ``["A800", "910B"]``); omitted: any
    that a declared site could run the job on (the job then shows which)."""
    est_hours: Annotated[float, msgspec.Meta(gt=0, le=100_000)]
    """Run time on ``cards`` A800-equivalents without failures."""
    checkpoint_cost_s: Annotated[float, msgspec.Meta(ge=0, le=86_400)] = 300.0
    checkpoint_interval_min: Annotated[float, msgspec.Meta(gt=0, le=10_080)] | None = None
    """None: Daly's optimum for the chosen pool (failure rate × cards, checkpoint cost)."""
    priority: Annotated[int, msgspec.Meta(ge=0, le=MAX_PRIORITY)] = 0
    deadline: Annotated[float, msgspec.Meta(ge=0, le=253_402_300_799)] | str | None = None
    """Epoch seconds or ISO 8601 (UTC when no offset is given)."""
    max_price_cny: Annotated[float, msgspec.Meta(gt=0, le=1e12)] | None = None
    regions: Annotated[list[Token], msgspec.Meta(max_length=64)] = []
    providers: Annotated[list[Token], msgspec.Meta(max_length=64)] = []
    tee: bool = False
    command: Annotated[list[Arg], msgspec.Meta(max_length=256)] = []
    """A real command (argv, no shell) for the ``process`` executor (or, with ``image``, the
    container's command); with neither, the job runs on the ``sim`` executor."""
    image: Image | None = None
    """A container image (e.g. ``registry.example.com/team/train:1.2``) for the ``container``
    executor; only sites that enabled containers (and allow the image) run it."""
    max_retries: Annotated[int, msgspec.Meta(ge=0, le=10)] | None = None
    """Retries after user errors (non-zero exit); default 2. Infrastructure failures never count."""
    quote_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None
    """Submit against this quote (``POST /v1/quotes`` with the same body): the job runs on the quoted
    pool and costs at most the quoted maximum (``max_fen``)."""
    quote_pool: Token | None = None
    """Which of the quote's options, by pool; default the first (the cheapest)."""
    prefer: Prefer | None = None
    """``time`` (also when omitted): start as soon as some pool has the cards, never wait for a
    cheaper tariff window; ``cost`` (cost-first): wait for one when it saves at least the hub's
    threshold and the deadline, if any, allows it (docs/training.md)."""


def _service(request: web.Request) -> TrainingService:
    return request.app[SERVICES].training


def _views(request: web.Request) -> JobViews:
    return request.app[SERVICES].job_views


def _parse_deadline(value: float | str, now: float) -> float:
    if isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise RequestError(f"deadline {value!r} is neither epoch seconds nor ISO 8601", field="deadline") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=dt.timezone.utc)
        epoch = parsed.timestamp()
    else:
        epoch = float(value)
    if not epoch > now:
        raise RequestError(f"deadline {value!r} is not in the future", field="deadline")
    return epoch


def normalise(body: JobBody, request: web.Request, now: float) -> JobSpec:
    """Check the body against the layout and return the spec as stored: the one place a job's
    spec is decoded (``jobspec.JobSpec`` from here to the store and the scheduler).

    Raises:
        RequestError: (400) naming the field.
    """
    layout = request.app[SERVICES].sites.layout
    for i, acc in enumerate(body.accelerators):
        if acc not in layout.accelerators:
            raise RequestError(f"unknown accelerator {acc!r} (known: {', '.join(sorted(layout.accelerators))})",
                                field=f"accelerators[{i}]")
        if acc in body.accelerators[:i]:
            raise RequestError(f"accelerator {acc!r} is listed twice", field=f"accelerators[{i}]")
    regions = {s.region for s in layout.sites} | {o.region for o in layout.origins}
    for i, region in enumerate(body.regions):
        if region not in regions:
            raise RequestError(f"unknown region {region!r}", field=f"regions[{i}]")
    if body.command and not body.command[0]:
        raise RequestError("command[0] must name a program", field="command[0]")
    return JobSpec(
        name=body.name, cards=body.cards, accelerators=tuple(body.accelerators), est_hours=body.est_hours,
        checkpoint_cost_s=body.checkpoint_cost_s, checkpoint_interval_min=body.checkpoint_interval_min,
        priority=body.priority, deadline=None if body.deadline is None else _parse_deadline(body.deadline, now),
        max_price_cny=body.max_price_cny, regions=tuple(body.regions), providers=tuple(body.providers),
        tee=body.tee, command=tuple(body.command), image=body.image, max_retries=body.max_retries,
        quote_id=body.quote_id, quote_pool=body.quote_pool, prefer=body.prefer,
    )


def body_hash(spec: JobSpec) -> str:
    """Hash of the decoded body: equal bodies (whatever their key order or spacing) hash equal
    (the hash of its :meth:`~JobSpec.public` form, as before the spec was typed, so keys stored then
    still match)."""
    canonical = msgspec.json.encode(spec.public(), order="sorted")
    return hashlib.sha256(canonical).hexdigest()


# --------------------------------------------------------------------------- views


def _attempt_state(row: JobRow, a: AttemptRow) -> str:
    if a.ended_at is not None:
        return a.exit_reason or "ended"
    if a.attempt == row.attempt and row.state in lifecycle.LIVE:
        return row.state
    return "unknown"


def _attempt_cost(row: JobRow, a: AttemptRow, figures: JobFigures | None) -> dict[str, float]:
    """An attempt's bill; the running one's so far (so the attempts add up to the job's figures)."""
    hours, energy = a.card_hours, a.energy_cny
    if figures is not None and figures.accruing and a.ended_at is None and a.attempt == row.attempt:
        hours += figures.card_hours - figures.billed_card_hours
        energy += figures.energy_cny - figures.billed_energy_cny
    return {"card_hours": round(hours, 6), "energy_cny": round(energy, 6)}


def job_view(row: JobRow, attempts: list[AttemptRow] | None = None, *,
             figures: JobFigures | None = None) -> dict[str, Any]:
    """The API's picture of a job. Depends only on its arguments, so a replayed submission answers
    byte for byte what the first one did; ``figures`` (``JobViews.figures``) are the live ones."""
    spec = row.spec
    progress = row.progress if figures is None else figures.progress
    card_hours = round(row.card_hours, 6) if figures is None else figures.card_hours
    energy_cny = round(row.energy_cny, 6) if figures is None else figures.energy_cny
    pl = row.placement
    explanation = pl.explanation if pl is not None else None
    waiting = row.state in lifecycle.WAITING
    return {
        "id": row.id,
        "object": "job",
        "name": row.name,
        "state": row.state,
        "reason": row.reason,
        "wait_reason": row.reason if waiting else "",
        "priority": row.priority,
        "cards": row.cards,
        "accelerators": list(spec.accelerators),
        "executor": spec.workload,
        "attempt": row.attempt,
        "pool": row.pool,
        "accelerator": row.accelerator,
        "progress": progress,
        "last_checkpoint": {"uri": row.checkpoint, "pool": row.checkpoint_pool, "progress": row.progress}
        if row.checkpoint else None,
        "retries": {"user_errors": row.user_retries, "max_user_retries": row.max_user_retries,
                    "infra_restarts": row.infra_restarts},
        "card_hours": card_hours,
        "energy_cny": energy_cny,
        "billed": {"card_hours": round(row.card_hours, 6), "energy_cny": round(row.energy_cny, 6)},
        "placement": {
            "attempt": pl.attempt,
            "pool": pl.pool,
            "accelerator": pl.accelerator,
            "decided_at": pl.decided_at,
            "checkpoint_interval_s": pl.checkpoint_interval_s,
            "chosen": explanation.chosen if explanation is not None else "",
            "breakdown": pl.breakdown,
            "others": explanation.others if explanation is not None else [],
        } if pl is not None else None,
        "attempts": [
            {"number": a.attempt, "pool": a.pool, "accelerator": a.accelerator, "cards": a.cards,
             "state": _attempt_state(row, a), "placed_at": a.placed_at, "started_at": a.started_at,
             "ended_at": a.ended_at, "exit_reason": a.exit_reason, "exit_code": a.exit_code, "detail": a.detail,
             **_attempt_cost(row, a, figures)}
            for a in (attempts or [])
        ],
        "spec": spec.public(),
        "submitted_at": row.submitted_at,
        "updated_at": row.updated_at,
        "finished_at": row.finished_at,
    }


def _summary(row: JobRow, figures: JobFigures) -> dict[str, Any]:
    """A line of the job list: the same figures the job itself shows."""
    return {"id": row.id, "name": row.name, "state": row.state, "reason": row.reason, "cards": row.cards,
            "attempt": row.attempt, "pool": row.pool, "progress": figures.progress,
            "card_hours": figures.card_hours, "energy_cny": figures.energy_cny,
            "submitted_at": row.submitted_at, "updated_at": row.updated_at, "finished_at": row.finished_at}


def full_view(request: web.Request, row: JobRow) -> dict[str, Any]:
    views = _views(request)
    return job_view(row, _service(request).attempts(row.id), figures=views.figures(row, views.now()))


def _own_job(request: web.Request) -> JobRow:
    tenant = require_tenant(request)
    job_id = request.match_info["job"]
    row = _service(request).job(job_id, tenant=tenant)
    if row is None:
        raise NotFound(f"job {job_id!r} not found", field="job")
    return row


# --------------------------------------------------------------------------- handlers


async def submit(request: web.Request) -> web.Response:
    tenant = require_tenant(request)
    key = idempotency_key(request)
    body = await read_body(request, JobBody)
    now = _service(request).clock.time()
    spec = normalise(body, request, now)
    digest = body_hash(spec)  # of the body as sent: the same body replays whatever admit fills in
    earlier = _service(request).replayed(tenant, key, digest) if key is not None else None
    if earlier is not None:  # a retry: the first answer, whatever admission, quote or budget say now
        row, replayed = earlier, True
    else:
        # Admission refuses (422) a job no declared pool could ever run; the market pins a job
        # submitted against a quote to the quoted pool, and refuses (402) one its tenant's budget
        # cannot cover. The quote was priced on the body without its quote fields.
        priced = body_hash(msgspec.structs.replace(spec, **dict.fromkeys(QUOTE_FIELDS)))
        admitted = _views(request).admit(tenant, spec)
        stored = request.app[SERVICES].market.bind_quote(tenant, admitted, priced, now)
        row, replayed = await _service(request).submit_async(tenant, stored, key, digest, now)
    headers = {"Location": f"/v1/jobs/{row.id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return json_response(job_view(row), status=201, headers=headers)


async def list_jobs(request: web.Request) -> web.Response:
    tenant = require_tenant(request)
    state_arg = request.query.get("state")
    state = None
    if state_arg is not None:
        try:
            state = lifecycle.JobState(state_arg)
        except ValueError:
            raise RequestError(f"unknown state {state_arg!r}", field="state") from None
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise RequestError("limit must be an integer", field="limit") from None
    if not 1 <= limit <= 1000:
        raise RequestError("limit must be within 1..1000", field="limit")
    views = _views(request)
    rows = views.listing(tenant, state=state, limit=limit, now=views.now())
    return json_response({"object": "list", "data": [_summary(r, f) for r, f in rows]})


async def get_job(request: web.Request) -> web.Response:
    return json_response(full_view(request, _own_job(request)))


async def cancel_job(request: web.Request) -> web.Response:
    tenant = require_tenant(request)
    row = _own_job(request)
    new = await _service(request).cancel_async(row.id, tenant, _service(request).clock.time())
    return json_response(full_view(request, new))


OPERATIONS = [
    Op("POST", "/v1/jobs", "Submit a training job (Idempotency-Key honoured per tenant)", body=JobBody, status=201,
       tags=("training",), params=(("Idempotency-Key", "header", "replays the first answer for the same body"),)),
    Op("GET", "/v1/jobs", "The calling tenant's jobs, newest first", tags=("training",),
       params=(("state", "query", "only jobs in this state"), ("limit", "query", "at most this many (1..1000)"))),
    Op("GET", "/v1/jobs/{job}", "One job: state, attempts, pool, progress, checkpoint, cost, placement explanation",
       tags=("training",)),
    job_events.OPERATION,
    Op("DELETE", "/v1/jobs/{job}", "Cancel a job (its running attempt is stopped and billed)", tags=("training",)),
]


def add_routes(routes: Routes) -> None:
    routes.add_post("/v1/jobs", submit)
    routes.add_get("/v1/jobs", list_jobs)
    routes.add_get("/v1/jobs/{job}", get_job)
    routes.add_get("/v1/jobs/{job}/events", job_events.handler(_own_job))
    routes.add_delete("/v1/jobs/{job}", cancel_job)
