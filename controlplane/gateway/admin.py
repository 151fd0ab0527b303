"""Operator endpoints (admin key): sites, draining, tenants."""

from __future__ import annotations

import time

from aiohttp import web

from controlplane import auth
from controlplane.errors import NotFound, SiteUnreachable
from controlplane.gateway.app import HUB, Routes, json_response, read_body, require_admin
from controlplane.gateway.schemas import DrainBody, TenantBody
from controlplane.store import sites as store_sites
from controlplane.store import tenants as store_tenants
from edge_agent import wire
from controlplane.gateway.openapi import Op


async def list_sites(request: web.Request) -> web.Response:
    require_admin(request)
    hub = request.app[HUB]
    return json_response({"object": "list", "data": hub.sites_snapshot()})


async def get_site(request: web.Request) -> web.Response:
    require_admin(request)
    hub = request.app[HUB]
    view = hub.registry.get(request.match_info["site"])
    if view is None:
        raise NotFound(f"site {request.match_info['site']!r} not found")
    return json_response(view.as_dict(time.time()))


async def drain_site(request: web.Request) -> web.Response:
    """Stop sending new work to a site (``{"on": false}`` undoes it). Persisted across hub restarts."""
    require_admin(request)
    hub = request.app[HUB]
    site = request.match_info["site"]
    if hub.registry.get(site) is None:
        raise NotFound(f"site {site!r} not found")
    body = await read_body(request, DrainBody) if request.can_read_body else DrainBody()
    store_sites.set_draining(hub.db, site, body.on)
    hub.registry.set_draining(site, body.on)
    delivered = True
    try:
        await hub.bus.command(site, wire.Drain(on=body.on), timeout_s=2.0)
    except (SiteUnreachable, Exception):
        delivered = False
    return json_response({"site": site, "draining": body.on, "delivered": delivered})


async def create_tenant(request: web.Request) -> web.Response:
    require_admin(request)
    hub = request.app[HUB]
    body = await read_body(request, TenantBody)
    if body.default_origin is not None and body.default_origin not in hub.origin_ids:
        from controlplane.errors import RequestError

        raise RequestError(f"unknown origin {body.default_origin!r}", field="default_origin")
    key = hub.create_tenant(
        body.id, name=body.name, default_origin=body.default_origin, quota_cards=body.quota_cards,
        rate_per_s=body.rate_per_s, burst=body.burst,
    )
    return json_response({"id": body.id, "api_key": key}, status=201)


async def list_tenants(request: web.Request) -> web.Response:
    require_admin(request)
    hub = request.app[HUB]
    return json_response({"object": "list", "data": store_tenants.list_tenants(hub.db)})


OPERATIONS = [
    Op("GET", "/v1/sites", "Sites and their live state", auth="admin", tags=("operator",)),
    Op("GET", "/v1/sites/{site}", "One site's live state", auth="admin", tags=("operator",)),
    Op("POST", "/v1/sites/{site}/drain", "Drain a site (no new work) or undo it", body=DrainBody, auth="admin", tags=("operator",)),
    Op("POST", "/v1/tenants", "Create a tenant and its first API key", body=TenantBody, status=201, auth="admin", tags=("operator",)),
    Op("GET", "/v1/tenants", "List tenants", auth="admin", tags=("operator",)),
]


def add_routes(routes: Routes) -> None:
    routes.add_get("/v1/sites", list_sites)
    routes.add_get("/v1/sites/{site}", get_site)
    routes.add_post("/v1/sites/{site}/drain", drain_site)
    routes.add_post("/v1/tenants", create_tenant)
    routes.add_get("/v1/tenants", list_tenants)


__all__ = ["add_routes", "auth"]
