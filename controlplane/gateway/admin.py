"""Operator endpoints (admin key): sites, draining, tenants, tenant and admin API keys."""

from __future__ import annotations

from aiohttp import web

from controlplane.core import auth
from controlplane.core.errors import NotFound, RequestError
from controlplane.gateway.app import SERVICES, Routes, json_response, read_body, require_admin
from controlplane.gateway.schemas import DrainBody, KeyBody, RotateKeyBody, TenantBody
from controlplane.gateway.openapi import Op


async def list_sites(request: web.Request) -> web.Response:
    require_admin(request)
    return json_response({"object": "list", "data": request.app[SERVICES].sites.snapshot()})


async def get_site(request: web.Request) -> web.Response:
    require_admin(request)
    view = request.app[SERVICES].sites.view_dict(request.match_info["site"])
    if view is None:
        raise NotFound(f"site {request.match_info['site']!r} not found")
    return json_response(view)


async def drain_site(request: web.Request) -> web.Response:
    """Stop sending new work to a site (``{"on": false}`` undoes it). Persisted across hub restarts."""
    require_admin(request)
    sites = request.app[SERVICES].sites
    site = request.match_info["site"]
    if sites.view(site) is None:
        raise NotFound(f"site {site!r} not found")
    body = await read_body(request, DrainBody) if request.can_read_body else DrainBody()
    delivered = await sites.drain(site, body.on)
    return json_response({"site": site, "draining": body.on, "delivered": delivered})


async def create_tenant(request: web.Request) -> web.Response:
    require_admin(request)
    services = request.app[SERVICES]
    body = await read_body(request, TenantBody)
    if body.default_origin is not None and body.default_origin not in services.sites.origin_ids:
        raise RequestError(f"unknown origin {body.default_origin!r}", field="default_origin")
    key = await services.tenancy.create_tenant_async(
        body.id, name=body.name, default_origin=body.default_origin, quota_cards=body.quota_cards,
        rate_per_s=body.rate_per_s, burst=body.burst,
    )
    return json_response({"id": body.id, "api_key": key}, status=201)


async def list_tenants(request: web.Request) -> web.Response:
    require_admin(request)
    return json_response({"object": "list", "data": request.app[SERVICES].tenancy.list_tenants()})


def _key_scope(request: web.Request) -> tuple[str, str | None]:
    """(role, owner) of the keys a path names: ``/v1/tenants/{tenant}/keys...``,
    ``/v1/providers/{provider}/keys...`` (a third-party provider's, docs/market.md) or ``/v1/admin/keys...``."""
    tenant = request.match_info.get("tenant")
    if tenant is not None:
        return "tenant", tenant
    provider = request.match_info.get("provider")
    return ("provider", provider) if provider is not None else ("admin", None)


async def list_keys(request: web.Request) -> web.Response:
    """A tenant's keys, or the admin keys: ids, shown prefixes, times and state; never a key."""
    require_admin(request)
    role, tenant = _key_scope(request)
    data = request.app[SERVICES].tenancy.list_keys(role=role, tenant_id=tenant)
    return json_response({"object": "list", "data": data})


async def create_key(request: web.Request) -> web.Response:
    require_admin(request)
    role, tenant = _key_scope(request)
    body = await read_body(request, KeyBody) if request.can_read_body else KeyBody()
    view = await request.app[SERVICES].tenancy.issue_key(role=role, tenant_id=tenant, label=body.label,
                                                   expires_at=body.expires_at, ttl_s=body.ttl_s)
    return json_response(view, status=201)


async def revoke_key(request: web.Request) -> web.Response:
    """Revoke a key now: refused on its next use at this hub, and within a second at any hub
    reading the same record. 409 for the last working admin key."""
    require_admin(request)
    role, tenant = _key_scope(request)
    view = await request.app[SERVICES].tenancy.revoke_key(request.match_info["key_id"], role=role, tenant_id=tenant)
    return json_response(view)


async def rotate_key(request: web.Request) -> web.Response:
    require_admin(request)
    role, tenant = _key_scope(request)
    body = await read_body(request, RotateKeyBody) if request.can_read_body else RotateKeyBody()
    answer = await request.app[SERVICES].tenancy.rotate_key(request.match_info["key_id"], role=role, tenant_id=tenant,
                                                      grace_s=body.grace_s, label=body.label,
                                                      expires_at=body.expires_at, ttl_s=body.ttl_s)
    return json_response(answer, status=201)


OPERATIONS = [
    Op("GET", "/v1/sites", "Sites and their live state", auth="admin", tags=("operator",)),
    Op("GET", "/v1/sites/{site}", "One site's live state", auth="admin", tags=("operator",)),
    Op("POST", "/v1/sites/{site}/drain", "Drain a site (no new work) or undo it", body=DrainBody, auth="admin", tags=("operator",)),
    Op("POST", "/v1/tenants", "Create a tenant and its first API key", body=TenantBody, status=201, auth="admin", tags=("operator",)),
    Op("GET", "/v1/tenants", "List tenants", auth="admin", tags=("operator",)),
    Op("GET", "/v1/tenants/{tenant}/keys", "A tenant's API keys (ids, prefixes, times; never the key)", auth="admin",
       tags=("operator",)),
    Op("POST", "/v1/tenants/{tenant}/keys", "Issue another key for a tenant (optional expiry)", body=KeyBody, status=201,
       auth="admin", tags=("operator",)),
    Op("DELETE", "/v1/tenants/{tenant}/keys/{key_id}", "Revoke a tenant's key now", auth="admin", tags=("operator",)),
    Op("POST", "/v1/tenants/{tenant}/keys/{key_id}/rotate", "Replace a tenant's key; the old one works grace_s longer",
       body=RotateKeyBody, status=201, auth="admin", tags=("operator",)),
    Op("GET", "/v1/admin/keys", "The admin keys (ids, prefixes, times; never the key)", auth="admin", tags=("operator",)),
    Op("POST", "/v1/admin/keys", "Issue another admin key (optional expiry)", body=KeyBody, status=201, auth="admin",
       tags=("operator",)),
    Op("DELETE", "/v1/admin/keys/{key_id}", "Revoke an admin key now (not the last working one: 409)", auth="admin",
       tags=("operator",)),
    Op("POST", "/v1/admin/keys/{key_id}/rotate", "Replace an admin key; the old one works grace_s longer",
       body=RotateKeyBody, status=201, auth="admin", tags=("operator",)),
    Op("GET", "/v1/providers/{provider}/keys", "A third-party provider's API keys (ids, prefixes, times)", auth="admin",
       tags=("operator", "market")),
    Op("POST", "/v1/providers/{provider}/keys", "Issue a key for a third-party provider: its pools' offers and "
       "its statement only", body=KeyBody, status=201, auth="admin", tags=("operator", "market")),
    Op("DELETE", "/v1/providers/{provider}/keys/{key_id}", "Revoke a provider's key now", auth="admin",
       tags=("operator", "market")),
    Op("POST", "/v1/providers/{provider}/keys/{key_id}/rotate", "Replace a provider's key; the old one works grace_s "
       "longer", body=RotateKeyBody, status=201, auth="admin", tags=("operator", "market")),
]


def add_routes(routes: Routes) -> None:
    routes.add_get("/v1/sites", list_sites)
    routes.add_get("/v1/sites/{site}", get_site)
    routes.add_post("/v1/sites/{site}/drain", drain_site)
    routes.add_post("/v1/tenants", create_tenant)
    routes.add_get("/v1/tenants", list_tenants)
    for base in ("/v1/tenants/{tenant}/keys", "/v1/admin/keys", "/v1/providers/{provider}/keys"):
        routes.add_get(base, list_keys)
        routes.add_post(base, create_key)
        routes.add_delete(base + "/{key_id}", revoke_key)
        routes.add_post(base + "/{key_id}/rotate", rotate_key)


__all__ = ["add_routes", "auth"]
