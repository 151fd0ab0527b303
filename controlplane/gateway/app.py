"""The aiohttp application: middleware (request id, auth, metrics, error mapping) and routes.

Every error leaves in one shape, the OpenAI one, so OpenAI clients and humans both read it::

    {"error": {"message": "...", "type": "invalid_request_error", "code": "...", "param": "field.path"}}

Statuses: 400 malformed JSON or a bad value (naming the field), 401 no/invalid key, 403 admin only,
404 unknown object (including another tenant's), 413 body too large, 422 unknown or forbidden field,
429 rate limited (with Retry-After), 502 the serving sites failed, 503 nothing fits, 500 our bug
(with the request id to quote).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from aiohttp import web

from controlplane import auth, bodies
from controlplane.errors import NoCapacity, PeerError, RateLimited, RequestError, Unauthorized, Forbidden

if TYPE_CHECKING:
    from controlplane.hub import Hub

log = logging.getLogger("cpn.gateway")

HUB: web.AppKey[Hub] = web.AppKey("hub")
PRINCIPAL: web.RequestKey[auth.Principal] = web.RequestKey("principal", auth.Principal)
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)
PUBLIC_PATHS = frozenset({"/healthz", "/metrics", "/openapi.json", "/"})

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]



def error_response(status: int, message: str, *, code: str, param: str | None = None, request_id: str = "",
                   headers: dict[str, str] | None = None) -> web.Response:
    kind = "invalid_request_error" if status < 500 else ("service_unavailable" if status == 503 else "server_error")
    if status == 401:
        kind = "authentication_error"
    elif status == 403:
        kind = "permission_error"
    elif status == 404:
        kind = "not_found_error"
    elif status == 429:
        kind = "rate_limit_error"
    body = {"error": {"message": message, "type": kind, "code": code, "param": param}}
    hdrs = {"X-Request-Id": request_id} if request_id else {}
    if headers:
        hdrs.update(headers)
    return web.Response(status=status, body=msgspec.json.encode(body), content_type="application/json", headers=hdrs)


def decode_body(data: bytes, type_: type[T]) -> T:
    """Decode a JSON body into ``type_`` (400 bad JSON or value, 422 unknown field; see bodies.py)."""
    return bodies.decode(data, type_)


async def raw_body(request: web.Request) -> bytes:
    """The request body, or a 413 naming the limit."""
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise RequestError(
            f"request body larger than {request.app[HUB].config.max_body_bytes} bytes", status=413, code="body_too_large"
        ) from exc


async def read_body(request: web.Request, type_: type[T]) -> T:
    return decode_body(await raw_body(request), type_)


def principal(request: web.Request) -> auth.Principal:
    p = request.get(PRINCIPAL)
    if p is None:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    return p  # type: ignore[no-any-return]


def require_admin(request: web.Request) -> auth.Principal:
    p = principal(request)
    if not p.is_admin:
        raise Forbidden("this endpoint needs an admin key")
    return p


def require_tenant(request: web.Request) -> str:
    """The calling tenant's id (admins act as no tenant: they must name one where it matters)."""
    p = principal(request)
    if p.tenant_id is None:
        raise Forbidden("this endpoint needs a tenant key")
    return p.tenant_id


def _route_name(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


@web.middleware
async def core_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    hub = request.app[HUB]
    rid = request.headers.get("X-Request-Id") or hub.request_ids.next()
    if len(rid) > 128:
        rid = hub.request_ids.next()
    request[REQUEST_ID] = rid
    started = time.perf_counter()
    status = 500
    try:
        if request.path not in PUBLIC_PATHS:
            header = request.headers.get("Authorization", "")
            if not header.startswith("Bearer ") or len(header) > 512:
                raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
            found = hub.keys.lookup(header[7:].strip()) or hub.lookup_key_in_store(header[7:].strip())
            if found is None:
                raise Unauthorized("invalid API key")
            request[PRINCIPAL] = found
            limiter = getattr(hub, "rate_limit", None)
            if limiter is not None:
                limiter(found, request)
        response = await handler(request)
        status = response.status
        if not response.prepared:
            response.headers["X-Request-Id"] = rid
        return response
    except RateLimited as exc:
        status = exc.status
        return error_response(status, exc.message, code=exc.code, request_id=rid,
                              headers={"Retry-After": str(max(1, int(exc.retry_after_s + 0.999)))})
    except RequestError as exc:
        status = exc.status
        return error_response(status, exc.message, code=exc.code, param=exc.field, request_id=rid)
    except PeerError as exc:
        status = 502
        log.warning("event=peer_error request_id=%s path=%s error=%s", rid, request.path, exc)
        return error_response(502, str(exc), code="upstream_failed", request_id=rid)
    except web.HTTPException as exc:
        status = exc.status
        if exc.status == 413:
            return error_response(413, f"request body larger than {hub.config.max_body_bytes} bytes", code="body_too_large", request_id=rid)
        if exc.status == 404:
            return error_response(404, f"no such endpoint: {request.method} {request.path}", code="not_found", request_id=rid)
        if exc.status == 405:
            return error_response(405, f"method {request.method} not allowed on {request.path}", code="method_not_allowed", request_id=rid)
        raise
    except Exception:
        status = 500
        log.exception("event=internal_error request_id=%s path=%s", rid, request.path)
        return error_response(500, f"internal error; quote request id {rid}", code="internal_error", request_id=rid)
    finally:
        route = _route_name(request)
        elapsed = time.perf_counter() - started
        hub.metrics.observe_http(route, status, elapsed)
        if status >= 500 or log.isEnabledFor(logging.DEBUG):
            # 503 "nothing fits the budget" is an answer, not a fault: INFO; other 5xx are WARNING.
            log.log(logging.WARNING if status >= 500 and status != 503 else logging.INFO if status == 503 else logging.DEBUG,
                    "event=http request_id=%s method=%s path=%s status=%s ms=%.2f",
                    rid, request.method, request.path, status, elapsed * 1000)


def json_response(body: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=msgspec.json.encode(body), content_type="application/json", headers=headers)


def make_app(hub: Hub) -> web.Application:
    """Build the aiohttp application for ``hub``; each API module adds its routes."""
    from controlplane.gateway import admin, health, infer, openai, openapi, usage

    app = web.Application(middlewares=[core_middleware], client_max_size=hub.config.max_body_bytes)
    app[HUB] = hub
    # The hot endpoints first: aiohttp's dispatcher tries resources in registration order.
    infer.add_routes(app)
    openai.add_routes(app)
    health.add_routes(app)
    admin.add_routes(app)
    usage.add_routes(app)
    openapi.add_routes(app)
    for extra in getattr(hub, "route_modules", []):
        extra.add_routes(app)
    return app
