"""``GET /v1/jobs/{job}/events``: a job's events after a cursor, as a page, a long-poll or a stream.

::

    GET /v1/jobs/{job}/events?after=N&limit=L              -> {"object": "list", "data": [...], "cursor": M, "done": ...}
    GET /v1/jobs/{job}/events?after=N&wait_s=S             -> the same, once there is an event (or after S s)
    GET /v1/jobs/{job}/events  Accept: text/event-stream   -> Server-Sent Events, resumable with Last-Event-ID

Promises:

- Events come in the order the hub recorded them, each with ``id``, its cursor: asking again with
  ``after=<the last id seen>`` (or ``Last-Event-ID``, which an ``EventSource`` sends by itself when
  it reconnects) gives exactly the events that came since, none twice, none skipped.
- Kinds: the agent's ``attempt_started``, ``checkpointed`` (with ``progress`` and the checkpoint),
  ``attempt_exited``; the hub's ``progress`` (every 5 % a site reports), ``start_refused``,
  ``vanished``, ``unplaceable``. Each item: ``id``, ``kind``, ``attempt``, ``seq``, ``site``,
  ``received_at`` and the event's ``body``.
- ``done`` is true once the job has finished and every event recorded so far is in the answer. A
  stream sends ``event: end`` (data: the job's state) then, and closes; it also closes after
  :data:`STREAM_MAX_S` (the client reconnects with ``Last-Event-ID``), and sends a comment line
  every :data:`KEEPALIVE_S` so proxies keep it open.
- ``after``, ``limit``, ``wait_s`` or ``Last-Event-ID`` that is not a number in range is a 400
  naming it. Another tenant's job is a 404.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web

from controlplane.core.errors import RequestError
from controlplane.gateway.app import ECHO_ID, SERVICES, Handler, json_response
from controlplane.gateway.openapi import Op
from controlplane.services.job_feed import FeedRow, JobFeed
from controlplane.services.training import JobRow

log = logging.getLogger("cpn.gateway")

MAX_LIMIT = 1000
MAX_WAIT_S = 60.0
"""Longest long-poll."""
KEEPALIVE_S = 15.0
"""A stream with nothing to say sends a comment this often."""
STREAM_MAX_S = 600.0
"""A stream closes after this long; the client resumes from its Last-Event-ID."""
RETRY_MS = 2000
"""What a stream tells an ``EventSource`` to wait before reconnecting."""

_ENCODE = msgspec.json.Encoder()


def item(e: FeedRow) -> dict[str, Any]:
    """One event as the API shows it."""
    return {"id": e.id, "kind": e.kind, "attempt": e.attempt, "seq": e.seq, "site": e.site,
            "received_at": e.at, "body": e.body}


def _number(request: web.Request, name: str, default: float, low: float, high: float, *,
            header: bool = False) -> float:
    raw = request.headers.get(name) if header else request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw) if name == "wait_s" else int(raw)
    except ValueError:
        raise RequestError(f"{name} must be a number", field=name) from None
    if not low <= value <= high:
        raise RequestError(f"{name} must be within {low:g}..{high:g}", field=name)
    return value


def _cursor(request: web.Request) -> int:
    """``Last-Event-ID`` (a reconnecting stream) if sent, else ``after``, else 0."""
    if request.headers.get("Last-Event-ID"):
        return int(_number(request, "Last-Event-ID", 0, 0, 2**62, header=True))
    return int(_number(request, "after", 0, 0, 2**62))


def _done(feed: JobFeed, job_id: str, cursor: int) -> bool:
    # finished first, then nothing left: an event recorded in between is not missed
    return feed.finished(job_id) and not feed.page(job_id, cursor, 1)


def handler(own_job: Callable[[web.Request], JobRow]) -> Handler:
    """The endpoint's handler; ``own_job`` finds the caller's job or raises the 404."""

    async def job_events(request: web.Request) -> web.StreamResponse:
        row = own_job(request)
        feed = request.app[SERVICES].job_feed
        cursor = _cursor(request)
        limit = int(_number(request, "limit", MAX_LIMIT, 1, MAX_LIMIT))
        wait_s = _number(request, "wait_s", 0.0, 0.0, MAX_WAIT_S)
        if "text/event-stream" in request.headers.get("Accept", ""):
            return await _stream(request, feed, row.id, cursor)
        rows = await feed.wait(row.id, cursor, limit, wait_s) if wait_s > 0 else feed.page(row.id, cursor, limit)
        last = rows[-1].id if rows else cursor
        current = feed.training.job(row.id) or row
        return json_response({"object": "list", "job": row.id, "state": current.state, "cursor": last,
                              "done": _done(feed, row.id, last), "data": [item(e) for e in rows]})

    return job_events


async def _stream(request: web.Request, feed: JobFeed, job_id: str, cursor: int) -> web.StreamResponse:
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
        "X-Request-Id": request[ECHO_ID]})
    await response.prepare(request)
    started = time.monotonic()
    sent = 0
    try:
        await response.write(f"retry: {RETRY_MS}\n\n".encode())
        while time.monotonic() - started < STREAM_MAX_S:
            rows = await feed.wait(job_id, cursor, MAX_LIMIT, KEEPALIVE_S)
            for e in rows:
                await response.write(b"id: %d\nevent: %s\ndata: %s\n\n" % (e.id, e.kind.encode(), _ENCODE.encode(item(e))))
                cursor = e.id
                sent += 1
            if _done(feed, job_id, cursor):
                state = feed.training.job(job_id)
                await response.write(b"event: end\ndata: %s\n\n" % _ENCODE.encode(
                    {"job": job_id, "state": state.state if state else "", "cursor": cursor}))
                break
            if not rows:
                await response.write(b": keepalive\n\n")
        await response.write_eof()
    except ConnectionResetError:
        log.info("event=job_stream_closed_by_client job=%s sent=%d", job_id, sent)
    return response


OPERATION = Op(
    "GET", "/v1/jobs/{job}/events",
    "A job's events after a cursor (progress, checkpoints, attempts, the hub's notes): a page, a long-poll "
    "(wait_s) or, with Accept: text/event-stream, a Server-Sent Events stream resumable with Last-Event-ID",
    tags=("training",),
    params=(("after", "query", "cursor: only events with a larger id (default 0: from the first)"),
            ("limit", "query", "at most this many events (1..1000)"),
            ("wait_s", "query", "long-poll: wait up to this many seconds (0..60) for the first new event"),
            ("Last-Event-ID", "header", "cursor of a reconnecting stream (wins over after)")),
    response={
        "type": "object", "required": ["object", "job", "state", "cursor", "done", "data"],
        "properties": {
            "object": {"const": "list"}, "job": {"type": "string"}, "state": {"type": "string"},
            "cursor": {"type": "integer", "description": "the last event's id: ask again with after=cursor"},
            "done": {"type": "boolean", "description": "the job has finished and every event so far is here"},
            "data": {"type": "array", "items": {
                "type": "object", "required": ["id", "kind", "attempt", "seq", "site", "received_at", "body"],
                "properties": {"id": {"type": "integer"}, "kind": {"type": "string"}, "attempt": {"type": "integer"},
                               "seq": {"type": "integer"}, "site": {"type": "string"},
                               "received_at": {"type": "number"}, "body": {"type": "object"}}}},
        },
    },
)
