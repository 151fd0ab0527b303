"""``GET /v1/usage``: the calling tenant's usage (inference tokens by model and site; training
card-hours and energy once recorded). Admins name a tenant with ``?tenant=ID``."""

from __future__ import annotations

from aiohttp import web

from controlplane.core.errors import NotFound, RequestError
from controlplane.gateway.app import SERVICES, Routes, json_response, principal
from controlplane.gateway.openapi import Op


async def usage(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    p = principal(request)
    tenant = p.tenant_id
    if p.is_admin:
        tenant = request.query.get("tenant")
        if not tenant:
            raise RequestError("admins must name a tenant: /v1/usage?tenant=ID", field="tenant")
        if services.tenancy.tenant(tenant) is None:
            raise NotFound(f"tenant {tenant!r} not found")
    assert tenant is not None
    body = services.accounting.for_tenant(tenant)
    body["training"] = services.training.usage(tenant)
    return json_response(body)


OPERATIONS = [
    Op("GET", "/v1/usage", "The tenant's usage (admins: ?tenant=ID)", tags=("usage",), params=(("tenant", "query", "tenant id (admin keys only)"),)),
]


def add_routes(routes: Routes) -> None:
    routes.add_get("/v1/usage", usage)
