"""``POST /v1/infer``: cpn's native inference call (the OpenAI-compatible endpoints live in openai.py)."""

from __future__ import annotations


from aiohttp import web

from controlplane.core.errors import RequestError
from controlplane.gateway.app import (ECHO_ID, REQUEST_ID, SERVICES, RequestView, Routes, arrived, client_address,
                                      json_response, principal, read_body)
from controlplane.gateway.schemas import InferBody
from controlplane.services.inference import Served
from edge_agent import wire
from controlplane.gateway.openapi import Op
from controlplane.market.catalogue import FILING_HEADER

ORIGIN_HEADER = "X-CPN-Origin"
BUDGET_HEADER = "X-CPN-Budget-Ms"
POLICY_HEADER = "X-CPN-Budget-Policy"
SLO_HEADER = "X-CPN-SLO-TTFT-Ms"
SLO_ALIAS = "x-slo-ttft-ms"
"""llm-d's name for the same SLO (header names are case-insensitive)."""


def resolve_origin(request: RequestView, explicit: str | None) -> str:
    """Origin: the body, else X-CPN-Origin, else the tenant's default, else the layout's CIDR map (of
    the client's address: X-Forwarded-For only from a trusted proxy, see clientaddr.py)."""
    services = request.app[SERVICES]
    origin = explicit or request.headers.get(ORIGIN_HEADER)
    if origin:
        if origin not in services.sites.origin_ids:
            raise RequestError(f"unknown origin {origin!r}: not a city of the layout", field="origin", code="unknown_origin")
        return origin
    tenant = principal(request).tenant_id
    if tenant is not None:
        default = services.tenancy.tenant_default_origin(tenant)
        if default:
            return default
    by_ip = services.sites.origin_for_ip(client_address(request))
    if by_ip:
        return by_ip
    raise RequestError(
        f"no origin: send 'origin' or the {ORIGIN_HEADER} header, or set the tenant's default origin",
        field="origin", code="origin_required",
    )


def resolve_budget(request: RequestView, explicit: float | None) -> float:
    if explicit is not None:
        return explicit
    raw = request.headers.get(BUDGET_HEADER)
    if raw is None:
        return float(request.app[SERVICES].config.default_budget_ms)
    return _header_ms(BUDGET_HEADER, raw, 10_000)


def resolve_policy(request: RequestView, explicit: str | None) -> str:
    policy = explicit or request.headers.get(POLICY_HEADER, "strict")
    if policy not in ("strict", "nearest"):
        raise RequestError(f"{POLICY_HEADER} must be 'strict' or 'nearest', got {policy!r}", field=POLICY_HEADER)
    return policy


def resolve_slo(request: RequestView) -> float | None:
    """The request's time-to-first-token SLO in ms (``X-CPN-SLO-TTFT-Ms``, alias ``x-slo-ttft-ms``),
    or None when it sends none (then the request never pays for the predictor)."""
    headers = request.headers
    raw = headers.get(SLO_HEADER)
    name = SLO_HEADER
    if raw is None:
        raw = headers.get(SLO_ALIAS)
        if raw is None:
            return None
        name = SLO_ALIAS
    return _header_ms(name, raw, 600_000)


def _header_ms(name: str, raw: str, most_ms: int) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise RequestError(f"{name} must be a number of milliseconds, got {raw!r}", field=name) from None
    if not 0 < value <= most_ms:
        raise RequestError(f"{name} must be > 0 and <= {most_ms} ms, got {raw!r}", field=name)
    return value


def route_headers(served: Served, echo_id: str, filing: str | None = None) -> dict[str, str]:
    """The X-CPN-* headers of an answer and ``X-Request-Id`` (``echo_id``: the client's own id if it
    sent one, else the hub's); ``filing``: the served model's filing number, displayed in
    ``X-CPN-Model-Filing`` as the rules require (docs/market.md)."""
    headers = {
        "X-CPN-Site": served.site,
        "X-CPN-RTT-Ms": f"{served.rtt_ms:.3f}",
        "X-CPN-Overhead-Ms": f"{served.overhead_ms:.3f}",
        "X-CPN-Promise-Ms": f"{served.promise_ms:.3f}",
        "X-CPN-Route": served.route,
        "X-Request-Id": echo_id,
    }
    if served.ingress:
        headers["X-CPN-Ingress"] = served.ingress
    if served.nearer_gateway:
        headers["X-CPN-Nearer-Gateway"] = served.nearer_gateway
    if filing is not None:
        headers[FILING_HEADER] = filing
    if served.predicted is not None:
        headers["X-CPN-Predicted-TTFT-Ms"] = f"{served.predicted.ttft_ms:.1f}"
    return headers


async def infer(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    started = arrived(request, services.clock.monotonic())
    body = await read_body(request, InferBody)
    tenant = principal(request).tenant_id or ""
    origin = resolve_origin(request, body.origin)
    budget_ms = resolve_budget(request, body.budget_ms)
    policy = resolve_policy(request, body.policy)
    slo = resolve_slo(request)
    scope = services.deployments.check_model_access(tenant, body.model)
    req = wire.InferRequest(request_id=request[REQUEST_ID], model=body.model,
                            prompt=body.input, max_tokens=body.max_tokens, tenant=tenant)
    filing = services.market.admit(req, services.clock.time())  # 403 unfiled for the public, 402 over budget
    served = await services.inference.complete(req, origin=origin, budget_ms=budget_ms, policy=policy, deployments=scope,
                                               slo_ttft_ms=slo)
    result = served.result
    assert result is not None
    out = {
        "id": req.request_id,
        "object": "inference",
        "model": result.model,
        "output": result.output,
        "site": served.site,
        "rtt_ms": round(served.rtt_ms, 3),
        "overhead_ms": round(served.overhead_ms, 3),
        "promise_ms": round(served.promise_ms, 3),
        "route": served.route,
        "origin": origin,
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        },
        "service_ms": result.service_ms,
    }
    response = json_response(out, headers=route_headers(served, request[ECHO_ID], filing))
    services.inference.relayed(served, origin, (services.clock.monotonic() - started) * 1000.0)
    return response


OPERATIONS = [
    Op("POST", "/v1/infer", "Native inference: routed to a site within the latency budget (X-CPN-SLO-TTFT-Ms: "
       "admitted by predicted time to first token, else 429 with Retry-After)", body=InferBody, tags=("inference",)),
]


def add_routes(routes: Routes) -> None:
    routes.add_post("/v1/infer", infer)
