"""Operator declarations of sites (admin key): ``PUT`` and ``GET /v1/sites/{site}/declaration``.

A site is believed only within what the operator declared (``controlplane/core/declarations.py``): its
tier, city, provider, region and cards come from here or from the layout, and the tenants that may
call the models the site loads itself are listed here. Given fields override the layout's entry;
omitted ones keep it. The declaration is kept in the record and applies at once.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from aiohttp import web

from controlplane.core.errors import NotFound, RequestError
from controlplane.gateway.app import SERVICES, Routes, json_response, read_body, require_admin
from controlplane.gateway.openapi import Op
from edge_agent import wire

Name = Annotated[str, msgspec.Meta(max_length=100, pattern=r"^[A-Za-z0-9 ._-]*$")]
AccName = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
Cards = Annotated[int, msgspec.Meta(ge=0, le=100_000)]
TenantOrAll = Annotated[str, msgspec.Meta(pattern=r"^(\*|[a-z0-9][a-z0-9_-]{0,62})$")]


class SiteDeclarationBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``PUT /v1/sites/{site}/declaration`` (admin): what the operator vouches for."""

    tier: Literal["hub", "regional", "edge"] | None = None
    city: Name | None = None
    provider: Name | None = None
    region: Name | None = None
    accelerators: Annotated[dict[AccName, Cards], msgspec.Meta(max_length=64)] | None = None
    """Cards by accelerator type: the most the site may claim (it may claim fewer)."""
    lat: Annotated[float, msgspec.Meta(ge=-90, le=90)] | None = None
    lon: Annotated[float, msgspec.Meta(ge=-180, le=180)] | None = None
    tee: bool | None = None
    """The site has a trusted execution environment."""
    local_model_tenants: Annotated[list[TenantOrAll], msgspec.Meta(max_length=10_000)] | None = None
    """Tenants that may call the models the site loads itself (``*``: every tenant; default none)."""


def _site(request: web.Request) -> str:
    site = request.match_info["site"]
    if not wire.is_valid_id(site):
        raise RequestError(f"site {site!r} is not a valid id (want {wire.ID_PATTERN})", field="site")
    return site


async def put_declaration(request: web.Request) -> web.Response:
    require_admin(request)
    site = _site(request)
    body = await read_body(request, SiteDeclarationBody)
    fields = {k: v for k, v in msgspec.structs.asdict(body).items() if v is not None}
    decl = request.app[SERVICES].sites.declare(site, fields)
    return json_response(msgspec.to_builtins(decl))


async def get_declaration(request: web.Request) -> web.Response:
    require_admin(request)
    site = _site(request)
    decl = request.app[SERVICES].sites.declaration(site)
    if decl is None:
        raise NotFound(f"site {site!r} is not declared (neither in the layout nor by PUT)", field="site")
    return json_response(msgspec.to_builtins(decl))


OPERATIONS = [
    Op("PUT", "/v1/sites/{site}/declaration", "Declare a site: its tier, city, cards and who may use its own models",
       body=SiteDeclarationBody, auth="admin", tags=("operator",)),
    Op("GET", "/v1/sites/{site}/declaration", "What the operator declared of a site", auth="admin", tags=("operator",)),
]


def add_routes(routes: Routes) -> None:
    routes.add_put("/v1/sites/{site}/declaration", put_declaration)
    routes.add_get("/v1/sites/{site}/declaration", get_declaration)
