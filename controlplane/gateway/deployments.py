"""``/v1/deployments``: a tenant's inference deployments (create, list, get, delete).

Bodies decode with ``replicas.decode_spec`` (the rule of controlplane/core/bodies.py: unknown fields
are a 422 naming the field, out-of-range values a 400); the service then checks the spec against the
layout (unknown origin, region or accelerator, more cards than any site has: 400 naming the field). ``POST`` answers 201 only after
the deployment and its first plan are committed (on the replicated record: on a quorum, awaited, so
the gateway goes on serving meanwhile; 503 ``record_unavailable`` without one, 409
``record_conflict`` on a lost compare-and-set). Another tenant's deployment is a 404, exactly like
a missing one. Admin keys have no tenant and get a 403 here.

``POST`` honours an optional ``Idempotency-Key`` header exactly as ``POST /v1/jobs`` does: per
tenant, the same key with the same body (compared after decoding, so key order, spacing and defaults
left out do not matter) answers the first answer (201, the deployment as it was first returned, plus
``Idempotent-Replayed: true``) and creates nothing; with another body it is a 422 naming
``Idempotency-Key``; a key that is not 1..200 printable ASCII characters is a 400 naming it.
"""

from __future__ import annotations

from aiohttp import web

from controlplane.core import replicas
from controlplane.gateway.app import SERVICES, Routes, idempotency_key, json_response, raw_body, require_tenant
from controlplane.gateway.openapi import Op



async def create(request: web.Request) -> web.Response:
    tenant = require_tenant(request)
    key = idempotency_key(request)
    spec = replicas.decode_spec(await raw_body(request))
    view, replayed = await request.app[SERVICES].deployments.create_async(tenant, spec, idempotency_key=key)
    headers = {"Location": f"/v1/deployments/{view['id']}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return json_response(view, status=201, headers=headers)


async def list_all(request: web.Request) -> web.Response:
    tenant = require_tenant(request)
    return json_response({"object": "list", "data": request.app[SERVICES].deployments.list_views(tenant)})


async def get_one(request: web.Request) -> web.Response:
    tenant = require_tenant(request)
    return json_response(request.app[SERVICES].deployments.view(tenant, request.match_info["id"]))


async def delete_one(request: web.Request) -> web.Response:
    tenant = require_tenant(request)
    dep_id = request.match_info["id"]
    await request.app[SERVICES].deployments.delete_async(tenant, dep_id)
    return json_response({"id": dep_id, "object": "deployment", "deleted": True})


OPERATIONS = [
    Op("POST", "/v1/deployments", "Deploy a model: replicas in at least min_cities cities within budget of each origin "
       "(Idempotency-Key honoured per tenant)", body=replicas.DeploymentSpec, status=201, tags=("deployments",),
       params=(("Idempotency-Key", "header", "replays the first answer for the same body"),)),
    Op("GET", "/v1/deployments", "The tenant's deployments", tags=("deployments",)),
    Op("GET", "/v1/deployments/{id}", "One deployment: state, replicas, coverage, uncovered origins and why",
       tags=("deployments",)),
    Op("DELETE", "/v1/deployments/{id}", "Delete a deployment (its replicas are unloaded)", tags=("deployments",)),
]


def add_routes(routes: Routes) -> None:
    """Add the four endpoints (served by ``Services.deployments``)."""
    routes.add_post("/v1/deployments", create)
    routes.add_get("/v1/deployments", list_all)
    routes.add_get("/v1/deployments/{id}", get_one)
    routes.add_delete("/v1/deployments/{id}", delete_one)
