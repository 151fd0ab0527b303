"""``GET /v1/usage``: the calling tenant's usage (inference tokens by model and site; training
card-hours and energy, running jobs' included as they run, the same figures the jobs API shows).
``totals`` add both up. Admins name a tenant with ``?tenant=ID``."""

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
    views = services.job_views
    training = views.usage(tenant, views.now())
    body["training"] = training
    # The totals are the tenant's whole bill: training's card-hours (billed and accruing) included.
    body["totals"]["card_hours"] = round(body["totals"]["card_hours"] + training["card_hours"], 6)
    body["totals"]["energy_cny"] = round(body["totals"]["energy_cny"] + training["energy_cny"], 6)
    budget = services.market.standing(tenant)
    if budget is not None:  # the tenant's spend limit: figures and the warning thresholds reached
        body["budget"] = budget
    return json_response(body)


OPERATIONS = [
    Op("GET", "/v1/usage", "The tenant's usage (admins: ?tenant=ID)", tags=("usage",), params=(("tenant", "query", "tenant id (admin keys only)"),)),
]


def add_routes(routes: Routes) -> None:
    routes.add_get("/v1/usage", usage)
