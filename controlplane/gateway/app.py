"""The aiohttp application: the request guard (request id, auth, metrics, error mapping) and routes.

Every error leaves in one shape, the OpenAI one, so OpenAI clients and humans both read it::

    {"error": {"message": "...", "type": "invalid_request_error", "code": "...", "param": "field.path"}}

Statuses: 400 malformed JSON or a bad value (naming the field), 401 no/invalid key, 403 admin only,
404 unknown object (including another tenant's), 413 body too large, 422 unknown or forbidden field,
429 rate limited (with Retry-After), 502 the serving sites failed, 503 nothing fits, 500 our bug
(with the request id to quote).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextvars import Token
from typing import Any, NamedTuple, Protocol, TypeVar

import msgspec
from aiohttp import web
from multidict import MultiMapping

from controlplane import logs
from controlplane.core import auth, bodies
from controlplane.core.errors import BusUnavailable
from controlplane.gateway.clientaddr import TrustedProxies
from controlplane.services.record import Services
from controlplane.core.errors import NoCapacity, PeerError, RateLimited, Refused, RequestError, Unauthorized, Forbidden
from controlplane.core.errors import RecordNoQuorum

log = logging.getLogger("cpn.gateway")

SERVICES: web.AppKey[Services] = web.AppKey("services", Services)
"""The typed record of the services (``services/record.py``), handed in by the composition root."""
TRUSTED: web.AppKey[TrustedProxies] = web.AppKey("trusted_proxies", TrustedProxies)
PRINCIPAL: web.RequestKey[auth.Principal] = web.RequestKey("principal", auth.Principal)
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)
"""The hub's id of the request (``RequestIds.next``): the wire id of an inference request, quoted in logs."""
ECHO_ID: web.RequestKey[str] = web.RequestKey("echo_id", str)
"""What ``X-Request-Id`` answers carry: the client's own ``X-Request-Id`` if it sent a usable one, else
the hub's id. Never sent to a site."""
ARRIVED: web.RequestKey[float] = web.RequestKey("arrived", float)
"""When the request's bytes were read off its connection, on the services' clock: put there by the
hot path (``hotpath.py``); for aiohttp's requests :func:`arrived` asks the connection."""

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RequestView(Protocol):
    """What the steps a request shares between aiohttp's handlers and the hot path below aiohttp
    (``hotpath.py``) read of it: aiohttp's ``web.Request`` is one, ``hotpath.HotRequest`` the other."""

    @property
    def app(self) -> web.Application: ...

    @property
    def headers(self) -> MultiMapping[str]: ...

    @property
    def remote(self) -> str | None: ...

    @property
    def method(self) -> str: ...

    @property
    def path(self) -> str: ...

    def get(self, key: Any, /) -> Any: ...

    def __getitem__(self, key: web.RequestKey[T]) -> T: ...

    def __setitem__(self, key: web.RequestKey[T], value: T) -> None: ...


class Reply(NamedTuple):
    """An answer known whole, before any HTTP library holds it: status, body, headers."""

    status: int
    body: bytes
    headers: dict[str, str]



def error_reply(status: int, message: str, *, code: str, param: str | None = None, request_id: str = "",
                headers: dict[str, str] | None = None) -> Reply:
    """The one error shape (module docstring) as a :class:`Reply`."""
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
    hdrs = {"Content-Type": "application/json"}
    if request_id:
        hdrs["X-Request-Id"] = request_id
    if headers:
        hdrs.update(headers)
    return Reply(status, msgspec.json.encode(body), hdrs)


def response_of(reply: Reply) -> web.Response:
    return web.Response(status=reply.status, body=reply.body, headers=reply.headers)


def error_response(status: int, message: str, *, code: str, param: str | None = None, request_id: str = "",
                   headers: dict[str, str] | None = None) -> web.Response:
    return response_of(error_reply(status, message, code=code, param=param, request_id=request_id, headers=headers))


def decode_body(data: bytes, type_: type[T]) -> T:
    """Decode a JSON body into ``type_`` (400 bad JSON or value, 422 unknown field; see bodies.py)."""
    return bodies.decode(data, type_)


async def raw_body(request: web.Request) -> bytes:
    """The request body, or a 413 naming the limit, or a 408 when it has not all arrived within
    ``body_timeout_s`` (a body sent slowly would otherwise hold its connection and handler forever).
    A body that came whole with the headers, the usual case, is taken from the buffer at once, with
    no timer and no await. The body is read once: ``request.read()`` after this returns nothing."""
    config = request.app[SERVICES].config
    content = request.content
    if content.is_eof():
        # Arrived whole: take what is buffered in one call, without ``read``'s loop of awaits.
        data = content.read_nowait()
        if len(data) > config.max_body_bytes:
            raise RequestError(f"request body larger than {config.max_body_bytes} bytes", status=413,
                               code="body_too_large")
        return data
    try:
        async with asyncio.timeout(config.body_timeout_s):
            return await request.read()
    except TimeoutError:
        raise RequestError(f"request body not received within {config.body_timeout_s:g} s", status=408,
                           code="body_timeout") from None
    except web.HTTPRequestEntityTooLarge as exc:
        raise RequestError(
            f"request body larger than {config.max_body_bytes} bytes", status=413, code="body_too_large"
        ) from exc


async def read_body(request: web.Request, type_: type[T]) -> T:
    return decode_body(await raw_body(request), type_)


IDEMPOTENCY_KEY_MAX = 200


def idempotency_key(request: web.Request) -> str | None:
    """The request's ``Idempotency-Key`` header, or None; a 400 naming it unless it is 1..200
    printable ASCII characters (anything else could not be stored or compared reliably)."""
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (1 <= len(key) <= IDEMPOTENCY_KEY_MAX and key.isascii() and key.isprintable()):
        raise RequestError(f"Idempotency-Key must be 1..{IDEMPOTENCY_KEY_MAX} printable ASCII characters",
                           field="Idempotency-Key")
    return key


def arrived(request: RequestView, now: float) -> float:
    """When the gateway's time on ``request`` began: when its connection last read bytes before the
    handler ran (the gateway's protocol stamps each read, ``server._Guarded``), so that aiohttp's
    parsing and the event loop's wait before the handler count as the gateway's own time in the
    overhead it measures (docs/topology.md, "The latency a tenant gets"); ``now`` (the handler's
    start) when the connection does not say, or says a time after it."""
    stamp = request.get(ARRIVED)
    if stamp is None:
        transport = getattr(request, "transport", None)
        stamp = getattr(transport.get_protocol(), "arrived", None) if transport is not None else None
    return now if stamp is None or stamp > now else float(stamp)


def principal(request: RequestView) -> auth.Principal:
    p = request.get(PRINCIPAL)
    if p is None:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    return p  # type: ignore[no-any-return]


def require_admin(request: RequestView) -> auth.Principal:
    p = principal(request)
    if not p.is_admin:
        raise Forbidden("this endpoint needs an admin key")
    return p


def require_tenant(request: RequestView) -> str:
    """The calling tenant's id (admins act as no tenant: they must name one where it matters)."""
    p = principal(request)
    if p.tenant_id is None:
        raise Forbidden("this endpoint needs a tenant key")
    return p.tenant_id


CLIENT_REQUEST_ID_MAX = 128


def client_request_id(request: RequestView) -> str | None:
    """The client's ``X-Request-Id`` if it is 1..128 printable ASCII characters (else None): echoed
    in the answer and logged next to the hub's id, never put on the wire."""
    value = request.headers.get("X-Request-Id")
    if value and len(value) <= CLIENT_REQUEST_ID_MAX and value.isascii() and value.isprintable():
        return value
    return None


def client_address(request: RequestView) -> str:
    """The client's address: the peer's, or from ``X-Forwarded-For`` when the peer is one of the
    configured trusted proxies (see clientaddr.py); what origin-by-CIDR reads."""
    peer = request.remote or ""
    trusted = request.app[TRUSTED]
    if not trusted.nets:
        return peer
    return trusted.client(peer, ",".join(request.headers.getall("X-Forwarded-For", ())))


def _log_level(status: int) -> int:
    """503 ("nothing fits the budget") is an answer, not a fault: INFO; other 5xx WARNING; else DEBUG."""
    if status == 503:
        return logging.INFO
    return logging.WARNING if status >= 500 else logging.DEBUG


class UnknownKey(Unauthorized):
    """A key this process does not know (yet): :meth:`Guard.check_again` looks once more after
    catching up with the record before the 401."""


class Guard:
    """The gateway's request guard, its steps apart so that aiohttp's handlers (:func:`guarded`) and
    the hot path below aiohttp (``hotpath.py``) take the same ones, in the same order:
    :meth:`enter` (id, log context), :meth:`check` (API key, rate limit), the handler,
    :meth:`refusal` (an error in the one shape), :meth:`leave` (budget hold, metrics, log line).
    Built once per route at start-up."""

    __slots__ = ("route", "public", "providers", "authenticate", "authenticate_caught_up", "ids", "observe", "limit", "release", "no_quorum",
                 "max_body_bytes")

    def __init__(self, services: Services, route: str, *, public: bool, providers: bool = False) -> None:
        self.route = route
        self.public = public
        self.providers = providers
        self.authenticate = services.tenancy.authenticate
        self.authenticate_caught_up = services.tenancy.authenticate_caught_up
        self.ids = services.request_ids
        self.observe = services.metrics.observe_http
        self.limit = services.tenancy.rate_limit
        self.max_body_bytes = services.config.max_body_bytes
        self.release = services.market.release  # a request's budget hold ends with its answer (docs/market.md)
        config = services.config
        # Where this process stands, for a write refused without quorum: the tenant learns which side of
        # a partition it reached (docs/topology.md, "Regions on one machine").
        stands = f"{config.role} {config.hub_id}" + (f" at {config.gateway_city}" if config.gateway_city else "")
        self.no_quorum = (f"; {stands} cannot reach a quorum of the record: it is cut off from the record's region, "
                          "or NATS nodes are down. Inference goes on here; retry with the same Idempotency-Key")

    def enter(self, request: RequestView) -> tuple[str, str, float, Token[Any]]:
        """The request's id and echoed id (both put on the request), its start, its log context."""
        rid = self.ids.next()
        request[REQUEST_ID] = rid
        echo = client_request_id(request) or rid
        request[ECHO_ID] = echo
        return rid, echo, time.perf_counter(), logs.bind_request(rid, echo)  # perf_counter: metrics only

    def check(self, request: RequestView) -> None:
        """The API key (unless the route is public) and the tenant's rate limit; the principal is put
        on the request.

        Raises:
            Unauthorized, Forbidden, RateLimited.
        """
        if self.public:
            return
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer ") or len(header) > 512:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        found = self.authenticate(header[7:].strip())
        if found is None:
            raise UnknownKey("invalid API key")
        self._admit(request, found)

    async def check_again(self, request: RequestView) -> None:
        """After :meth:`check` raised :class:`UnknownKey`: the same, once this process's record has
        caught up (a key issued at another gateway a moment ago).

        Raises:
            Unauthorized, Forbidden, RateLimited.
        """
        found = await self.authenticate_caught_up(request.headers.get("Authorization", "")[7:].strip())
        if found is None:
            raise Unauthorized("invalid API key")
        self._admit(request, found)

    def _admit(self, request: RequestView, found: auth.Principal) -> None:
        if found.provider_id is not None and not self.providers:
            raise Forbidden("a provider key may only manage its own pools' offers and read its statement")
        request[PRINCIPAL] = found
        self.limit(found)

    def refusal(self, exc: Exception, request: RequestView, rid: str, echo: str) -> Reply:
        """The answer to ``exc`` raised while serving ``request`` (called inside the ``except``)."""
        if isinstance(exc, RateLimited):
            return error_reply(exc.status, exc.message, code=exc.code, request_id=echo,
                               headers={"Retry-After": str(max(1, int(exc.retry_after_s + 0.999)))})
        if isinstance(exc, Refused):
            return Reply(exc.status, msgspec.json.encode(exc.body),
                         {"Content-Type": "application/json", "X-Request-Id": echo})
        if isinstance(exc, RequestError):
            message = exc.message + self.no_quorum if isinstance(exc, RecordNoQuorum) else exc.message
            return error_reply(exc.status, message, code=exc.code, param=exc.field, request_id=echo)
        if isinstance(exc, BusUnavailable):
            # This process's own NATS connection is down or stuck: not the upstream's fault, and
            # another gateway may well serve the request now (the client's documented move).
            log.warning("event=bus_unavailable request_id=%s client_request_id=%s path=%s error=%s", rid, echo,
                        request.path, exc)
            return error_reply(503, f"this gateway cannot reach NATS right now: {exc}",
                               code="nats_unavailable", request_id=echo, headers={"Retry-After": "1"})
        if isinstance(exc, PeerError):
            log.warning("event=peer_error request_id=%s client_request_id=%s path=%s error=%s", rid, echo,
                        request.path, exc)
            return error_reply(502, str(exc), code="upstream_failed", request_id=echo)
        log.exception("event=internal_error request_id=%s client_request_id=%s path=%s", rid, echo, request.path)
        return error_reply(500, f"internal error; quote request id {rid}", code="internal_error", request_id=echo)

    def leave(self, request: RequestView, rid: str, echo: str, status: int, started: float,
              bound: Token[Any]) -> None:
        """The request is answered (``status``): its budget hold ends, it is counted and timed."""
        self.release(rid)
        elapsed = time.perf_counter() - started
        self.observe(self.route, status, elapsed)
        if status >= 500 or log.isEnabledFor(logging.DEBUG):
            log.log(_log_level(status), "event=http request_id=%s client_request_id=%s method=%s path=%s status=%s "
                    "ms=%.2f", rid, echo, request.method, request.path, status, elapsed * 1000)
        logs.unbind(bound)


def guarded(services: Services, handler: Handler, route: str, *, public: bool, providers: bool = False) -> Handler:
    """``handler`` inside the gateway's request guard (:class:`Guard`).

    The guard gives every request an id, checks the API key and the tenant's rate limit (unless
    ``public``), turns every error into the one error shape, and counts the request and its
    latency under ``route``. Each handler is wrapped once at start-up: per request this costs less
    than an aiohttp middleware, which adds two coroutine layers to every call. A provider's key
    is refused (403) everywhere but on routes added with ``providers=True``.
    """
    g = Guard(services, route, public=public, providers=providers)
    max_body_bytes = g.max_body_bytes

    async def guard(request: web.Request) -> web.StreamResponse:
        rid, echo, started, bound = g.enter(request)
        status = 500
        try:
            try:
                g.check(request)
            except UnknownKey:
                await g.check_again(request)
            response = await handler(request)
            status = response.status
            if not response.prepared and "X-Request-Id" not in response.headers:
                response.headers["X-Request-Id"] = echo
            return response
        except web.HTTPException as exc:
            status = exc.status
            if exc.status == 413:
                return error_response(413, f"request body larger than {max_body_bytes} bytes",
                                      code="body_too_large", request_id=echo)
            raise
        except Exception as exc:
            reply = g.refusal(exc, request, rid, echo)
            status = reply.status
            return response_of(reply)
        finally:
            g.leave(request, rid, echo, status, started, bound)

    return guard


class Routes:
    """Where the API modules register their endpoints: each handler goes in :func:`guarded`.

    ``public`` endpoints (health, metrics, the OpenAPI document) take no API key.
    """

    def __init__(self, app: web.Application, services: Services) -> None:
        self.app = app
        self.services = services

    def add_get(self, path: str, handler: Handler, *, public: bool = False, providers: bool = False) -> None:
        self.app.router.add_get(path, guarded(self.services, handler, path, public=public, providers=providers))

    def add_post(self, path: str, handler: Handler, *, providers: bool = False) -> None:
        self.app.router.add_post(path, guarded(self.services, handler, path, public=False, providers=providers))

    def add_delete(self, path: str, handler: Handler, *, providers: bool = False) -> None:
        self.app.router.add_delete(path, guarded(self.services, handler, path, public=False, providers=providers))

    def add_put(self, path: str, handler: Handler) -> None:
        self.app.router.add_put(path, guarded(self.services, handler, path, public=False))


async def unmatched(request: web.Request) -> web.StreamResponse:
    """Every path no endpoint matched: 405 with ``Allow`` when another method would have, else 404."""
    this = request.match_info.route.resource
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not this:
            allowed |= (await resource.resolve(request))[1]
    if allowed:
        return error_response(405, f"method {request.method} not allowed on {request.path}", code="method_not_allowed",
                              request_id=request[ECHO_ID], headers={"Allow": ", ".join(sorted(allowed))})
    raise RequestError(f"no such endpoint: {request.method} {request.path}", status=404, code="not_found")


UNMATCHED = "/{unmatched:.*}"


def json_response(body: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=msgspec.json.encode(body), content_type="application/json", headers=headers)
