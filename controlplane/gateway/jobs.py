"""The jobs API (tenant key): submit, list, inspect, follow and cancel training jobs.

::

    POST   /v1/jobs               JobBody, header Idempotency-Key (optional) -> 201 job view
    GET    /v1/jobs               ?state=...&limit=... -> {"object": "list", "data": [summary...]}
    GET    /v1/jobs/{job}         full view: state, attempts, pool, progress, checkpoint, cost, placement
    GET    /v1/jobs/{job}/events  the agent events the hub stored for it, and refused starts, in order
    DELETE /v1/jobs/{job}         cancel -> 200 job view (409 if it already finished)

Promises:

- 201 only after the job is committed to SQLite (``store.jobs.create_job`` returns after COMMIT).
- Idempotency is per tenant: the same ``Idempotency-Key`` with the same body (compared after
  decoding, so key order and whitespace do not matter) answers exactly the first answer (status and
  body, plus ``Idempotent-Replayed: true``); with another body it is a 422 naming ``Idempotency-Key``.
- Unknown or forbidden fields (``tenant_id``, ``site``, ``attempt`` ...) are a 422 naming the field;
  a wrong type or a value out of range is a 400 naming it; an accelerator or region the layout does
  not know, or a deadline in the past, is a 422 naming it.
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
from controlplane.gateway.app import HUB, SERVICES, Routes, idempotency_key, json_response, read_body, require_tenant
from controlplane.gateway.openapi import Op
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
    accelerators: Annotated[list[Token], msgspec.Meta(min_length=1, max_length=16)]
    """Accepted accelerator types, in order of preference (e.g. ``["A800", "910B"]``)."""
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


def _service(request: web.Request) -> TrainingService:
    return request.app[SERVICES].training


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
    layout = request.app[HUB].layout
    assert layout is not None
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


def job_view(row: JobRow, attempts: list[AttemptRow] | None = None, *,
             live_progress: float | None = None, accrued: tuple[float, float] = (0.0, 0.0)) -> dict[str, Any]:
    """The API's picture of a job. Depends only on its arguments, so a replayed submission answers
    byte for byte what the first one did."""
    spec = row.spec
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
        "progress": row.progress if live_progress is None else max(row.progress, live_progress),
        "last_checkpoint": {"uri": row.checkpoint, "pool": row.checkpoint_pool, "progress": row.progress}
        if row.checkpoint else None,
        "retries": {"user_errors": row.user_retries, "max_user_retries": row.max_user_retries,
                    "infra_restarts": row.infra_restarts},
        "card_hours": round(row.card_hours + accrued[0], 6),
        "energy_cny": round(row.energy_cny + accrued[1], 6),
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
             "card_hours": round(a.card_hours, 6), "energy_cny": round(a.energy_cny, 6)}
            for a in (attempts or [])
        ],
        "spec": spec.public(),
        "submitted_at": row.submitted_at,
        "updated_at": row.updated_at,
        "finished_at": row.finished_at,
    }


def _summary(row: JobRow) -> dict[str, Any]:
    return {"id": row.id, "name": row.name, "state": row.state, "reason": row.reason, "cards": row.cards,
            "attempt": row.attempt, "pool": row.pool, "progress": row.progress,
            "card_hours": round(row.card_hours, 6), "energy_cny": round(row.energy_cny, 6),
            "submitted_at": row.submitted_at, "finished_at": row.finished_at}


def full_view(request: web.Request, row: JobRow) -> dict[str, Any]:
    service = _service(request)
    return job_view(row, service.attempts(row.id), live_progress=service.live_progress(row),
                    accrued=service.accrued(row, time.time()))


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
    now = time.time()
    spec = normalise(body, request, now)
    row, replayed = _service(request).submit(tenant, spec, key, body_hash(spec), now)
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
    rows = _service(request).jobs(tenant, state=state, limit=limit)
    return json_response({"object": "list", "data": [_summary(r) for r in rows]})


async def get_job(request: web.Request) -> web.Response:
    return json_response(full_view(request, _own_job(request)))


async def job_events(request: web.Request) -> web.Response:
    row = _own_job(request)
    events = _service(request).events(row.id)
    data = [{"attempt": e.attempt, "seq": e.seq, "kind": e.kind, "received_at": e.at, "body": e.body} for e in events]
    data.sort(key=lambda e: (e["attempt"], e["seq"]))
    return json_response({"object": "list", "job": row.id, "data": data})


async def cancel_job(request: web.Request) -> web.Response:
    tenant = require_tenant(request)
    row = _own_job(request)
    new = _service(request).cancel(row.id, tenant, time.time())
    return json_response(full_view(request, new))


OPERATIONS = [
    Op("POST", "/v1/jobs", "Submit a training job (Idempotency-Key honoured per tenant)", body=JobBody, status=201,
       tags=("training",), params=(("Idempotency-Key", "header", "replays the first answer for the same body"),)),
    Op("GET", "/v1/jobs", "The calling tenant's jobs, newest first", tags=("training",),
       params=(("state", "query", "only jobs in this state"), ("limit", "query", "at most this many (1..1000)"))),
    Op("GET", "/v1/jobs/{job}", "One job: state, attempts, pool, progress, checkpoint, cost, placement explanation",
       tags=("training",)),
    Op("GET", "/v1/jobs/{job}/events", "The agent events stored for a job", tags=("training",)),
    Op("DELETE", "/v1/jobs/{job}", "Cancel a job (its running attempt is stopped and billed)", tags=("training",)),
]


def add_routes(routes: Routes) -> None:
    routes.add_post("/v1/jobs", submit)
    routes.add_get("/v1/jobs", list_jobs)
    routes.add_get("/v1/jobs/{job}", get_job)
    routes.add_get("/v1/jobs/{job}/events", job_events)
    routes.add_delete("/v1/jobs/{job}", cancel_job)
