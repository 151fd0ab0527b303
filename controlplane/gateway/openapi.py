"""``GET /openapi.json``: OpenAPI 3.1, generated from the same msgspec types the handlers decode.

Each gateway module lists its operations in ``OPERATIONS`` as :class:`Op` entries naming the
request body type (the Struct the handler decodes) and the success status; the schemas come from
``msgspec.json.schema_components`` so the document cannot drift from what the server accepts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from controlplane.gateway.app import json_response

if TYPE_CHECKING:
    from controlplane.gateway.app import Routes


_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "code": {"type": ["string", "null"]},
                "param": {"type": ["string", "null"]},
            },
        }
    },
}


@dataclass(frozen=True)
class Op:
    method: str
    path: str
    summary: str
    body: Any = None
    """The msgspec type the handler decodes (None: no body)."""
    status: int = 200
    auth: str = "tenant"
    """``tenant`` | ``admin`` | ``none``."""
    tags: tuple[str, ...] = ()
    params: tuple[tuple[str, str, str], ...] = ()
    """Extra parameters: (name, in, description)."""
    response: dict[str, Any] = field(default_factory=lambda: {"type": "object"})
    content_type: str = "application/json"


MODULES: web.AppKey[list[Any]] = web.AppKey("route_modules", list)
"""The gateway modules of this app, each with ``OPERATIONS`` (set by ``server.make_app``)."""


def _modules(app: web.Application) -> list[Any]:
    return app[MODULES]


def build(app: web.Application) -> dict[str, Any]:
    """The OpenAPI document for every operation the app's modules declare."""
    ops: list[Op] = [op for module in _modules(app) for op in getattr(module, "OPERATIONS", [])]
    body_types = [op.body for op in ops if op.body is not None]
    schemas, components = msgspec.json.schema_components(body_types, ref_template="#/components/schemas/{name}")
    by_type = dict(zip(body_types, schemas))
    components["Error"] = _ERROR
    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
        item: dict[str, Any] = {
            "summary": op.summary,
            "operationId": f"{op.method.lower()}_{op.path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}",
            "tags": list(op.tags),
            "responses": {
                str(op.status): {"description": "success", "content": {op.content_type: {"schema": op.response}}},
                "default": {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
            },
        }
        if op.auth == "none":
            item["security"] = []
        params = [
            {"name": seg[1:-1], "in": "path", "required": True, "schema": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9_-]{0,62}$"}}
            for seg in op.path.split("/") if seg.startswith("{")
        ]
        params += [{"name": n, "in": where, "required": False, "description": d, "schema": {"type": "string"}} for n, where, d in op.params]
        if params:
            item["parameters"] = params
        if op.body is not None:
            item["requestBody"] = {"required": True, "content": {"application/json": {"schema": by_type[op.body]}}}
        paths.setdefault(op.path, {})[op.method.lower()] = item
    return {
        "openapi": "3.1.0",
        "info": {"title": "cpn gateway", "version": "1", "description": "Tenant and operator API of cpn, a computing power network control plane."},
        "servers": [{"url": "/"}],
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "cpn API key (tenant or admin)"}},
        },
        "security": [{"bearer": []}],
        "paths": dict(sorted(paths.items())),
    }


async def openapi(request: web.Request) -> web.Response:
    doc = request.app.get(_DOC)
    if doc is None:
        doc = build(request.app)
    return json_response(doc)


_DOC: web.AppKey[dict[str, Any]] = web.AppKey("openapi_doc")

OPERATIONS = [Op("GET", "/openapi.json", "This document (OpenAPI 3.1)", auth="none", tags=("meta",))]


def add_routes(routes: Routes) -> None:
    routes.add_get("/openapi.json", openapi, public=True)
