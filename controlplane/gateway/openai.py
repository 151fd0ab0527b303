"""OpenAI-compatible endpoints: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

An unmodified OpenAI client pointed at ``http://HOST:PORT/v1`` with a cpn key works: origin comes
from ``X-CPN-Origin``, else the tenant's default origin, else the layout's CIDR map; the budget from
``X-CPN-Budget-Ms`` (default 10); the policy from ``X-CPN-Budget-Policy``; an optional
time-to-first-token SLO from ``X-CPN-SLO-TTFT-Ms`` (alias ``x-slo-ttft-ms``). Streaming answers are
relayed as Server-Sent Events as the site produces them; if the client goes away mid-stream the
site is told to stop (``CancelInfer``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import NamedTuple, Protocol

from aiohttp import web

from controlplane.gateway import openai_shapes as oa
from controlplane.gateway.app import (ECHO_ID, REQUEST_ID, SERVICES, RequestView, Routes, arrived, json_response, principal,
                                      raw_body)
from controlplane.gateway.infer import resolve_budget, resolve_origin, resolve_policy, resolve_slo, route_headers
from controlplane.services.inference import AllSitesFailed, Served, aclose
from edge_agent import wire
from controlplane.gateway.openapi import Op

log = logging.getLogger("cpn.gateway")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    started = arrived(request, request.app[SERVICES].clock.monotonic())
    req = oa.decode_chat_request(await raw_body(request))
    return await _respond(request, await answer(request, req, "chat", started))


async def completions(request: web.Request) -> web.StreamResponse:
    started = arrived(request, request.app[SERVICES].clock.monotonic())
    req = oa.decode_completion_request(await raw_body(request))
    return await _respond(request, await answer(request, req, "completion", started))


async def _respond(request: web.Request, out: Whole | Streamed) -> web.StreamResponse:
    if isinstance(out, Whole):
        return web.Response(body=out.body, headers=out.headers)
    response = _SseResponse(headers=out.headers)
    await response.prepare(request)
    await relay(out, response)
    return response


class Whole(NamedTuple):
    """An answer known whole: a 200 with these headers and body (a ``Content-Length``)."""

    headers: dict[str, str]
    body: bytes


class Streamed(NamedTuple):
    """A stream to relay (:func:`relay`): a 200 with these headers, then the SSE frames as they come."""

    headers: dict[str, str]
    served: Served
    messages: AsyncIterator[wire.InferChunk | wire.InferResult]
    sse: oa.SseStream
    request_id: str
    ready: Callable[[str], bool]
    """Whether the stream's next message is here already (``InferenceService.stream_ready``)."""


class Sink(Protocol):
    """Where :func:`relay` writes a stream's body: aiohttp's ``StreamResponse`` or the hot path's."""

    async def write(self, data: bytes) -> None: ...

    async def write_eof(self, data: bytes = b"") -> None: ...


async def answer(
    request: RequestView, req: oa.ChatCompletionRequest | oa.CompletionRequest, kind: oa.Kind, started: float,
) -> Whole | Streamed:
    """Serve ``req`` for the request's tenant: the whole answer, or the stream to relay. Shared by
    the aiohttp handlers above and the hot path below aiohttp (``hotpath.py``)."""
    services = request.app[SERVICES]
    tenant = principal(request).tenant_id or ""
    origin = resolve_origin(request, None)
    budget_ms = resolve_budget(request, None)
    policy = resolve_policy(request, None)
    slo = resolve_slo(request)
    scope = services.deployments.check_model_access(tenant, req.model)
    request_id = request[REQUEST_ID]  # the hub's, never the client's X-Request-Id: sites cancel by it
    echo = request[ECHO_ID]
    infer = oa.to_infer_request(req, request_id=request_id, tenant=tenant)
    created = services.clock.time()
    filing = services.market.admit(infer, created)  # 403 unfiled for the public, 402 over budget
    if not infer.stream:
        served = await services.inference.complete(infer, origin=origin, budget_ms=budget_ms, policy=policy,
                                                   deployments=scope, slo_ttft_ms=slo)
        assert served.result is not None
        headers = route_headers(served, echo, filing)
        headers["Content-Type"] = "application/json"  # in the prepared dict: no content_type parsing
        body = oa.encode(oa.response(kind, served.result, created=created, model=req.model))
        services.inference.relayed(served, origin, (services.clock.monotonic() - started) * 1000.0)
        return Whole(headers, body)

    infer.tail_ok = True  # the last text may come in the result: relayed below
    served, messages = await services.inference.stream(infer, origin=origin, budget_ms=budget_ms, policy=policy,
                                                       deployments=scope, slo_ttft_ms=slo)
    # cpn's own time to the first message feeds the overhead estimate, as a whole answer's does.
    services.inference.relayed(served, origin, (services.clock.monotonic() - started) * 1000.0)
    sse = oa.SseStream(kind, request_id=request_id, model=req.model, created=created,
                       include_usage=oa.include_usage(req))
    headers = {
        **route_headers(served, echo, filing),
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
    }
    whole = served.result
    if whole is not None:
        # The site's first message was its result (a short answer, or one the backend gave at
        # once): every frame is known, so it goes as one plain answer with a length, without a
        # chunked stream's machinery; a client reads the same events either way.
        body = sse.start()
        if whole.tail:
            body += sse.delta(whole.tail)
        return Whole(headers, body + sse.finish(whole))
    return Streamed(headers, served, messages, sse, request_id, services.inference.stream_ready)


async def relay(out: Streamed, sink: Sink) -> None:
    """Write the stream ``out`` to ``sink`` as its messages come; a client gone away
    (``ConnectionResetError``) or a cancelled task tells the site to stop."""
    messages, sse, request_id, served, ready = out.messages, out.sse, out.request_id, out.served, out.ready
    pending = b""
    try:
        # Few writes (each is a system call): the headers and the opening frame go out with the
        # first chunk, and a frame whose next message is already here waits to go out with it (the
        # last ones with the end of the body). Nothing waits for a message still to come.
        pending = sse.start()
        ended = False
        async for msg in messages:
            if isinstance(msg, wire.InferChunk):
                pending += sse.delta(msg.text)
                if not ready(request_id):
                    await sink.write(pending)
                    pending = b""
            else:
                if msg.tail:
                    pending += sse.delta(msg.tail)
                await sink.write_eof(pending + sse.finish(msg))
                pending = b""
                ended = True
        if not ended:
            await sink.write_eof(pending)
    except asyncio.CancelledError:
        await aclose(messages)  # its finally tells the site to stop
        raise
    except ConnectionResetError:
        # The client went away: closing the iterator (in its finally) tells the site to stop.
        await aclose(messages)
        log.info("event=stream_abandoned request_id=%s site=%s", request_id, served.site)
    except (AllSitesFailed, Exception) as exc:
        await aclose(messages)
        log.warning("event=stream_failed request_id=%s site=%s error=%s", request_id, served.site, exc)
        try:
            if pending:  # what the site sent before it failed
                await sink.write(pending)
            await sink.write(sse.error(f"the serving site failed mid-stream: {exc}", "server_error", "upstream_failed"))
            await sink.write_eof()
        except ConnectionResetError:
            pass


class _SseResponse(web.StreamResponse):
    """A stream whose headers wait for its first bytes (one write, not two, on aiohttp versions
    that buffer headers; others send them at ``prepare`` as before)."""

    _send_headers_immediately = False


async def models(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    tenant = principal(request).tenant_id
    ids = services.deployments.models_for_tenant(tenant)
    return json_response(oa.models_list(ids, created=services.status.started_at))


OPERATIONS = [
    Op("POST", "/v1/chat/completions", "OpenAI-compatible chat completion (stream: SSE)", body=oa.ChatCompletionRequest, tags=("inference",)),
    Op("POST", "/v1/completions", "OpenAI-compatible completion (stream: SSE)", body=oa.CompletionRequest, tags=("inference",)),
    Op("GET", "/v1/models", "Models the tenant can call", tags=("inference",)),
]


def add_routes(routes: Routes) -> None:
    routes.add_post("/v1/chat/completions", chat_completions)
    routes.add_post("/v1/completions", completions)
    routes.add_get("/v1/models", models)
