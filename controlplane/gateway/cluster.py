"""``GET /v1/cluster`` (admin key): the hub processes sharing this control plane, which one leads and
with what epoch, and the NATS nodes holding the replicated record (``services/leadership.py``).

Every gateway answers it from the record, so an operator can ask any of them.
"""

from __future__ import annotations

from aiohttp import web

from controlplane.gateway.app import SERVICES, Routes, json_response, require_admin
from controlplane.gateway.openapi import Op


async def get_cluster(request: web.Request) -> web.Response:
    require_admin(request)
    view = await request.app[SERVICES].leadership.view()
    return json_response({"object": "cluster", **view})


OPERATIONS = [
    Op("GET", "/v1/cluster", "The hub processes, the controller leader and its epoch, the record's NATS nodes",
       auth="admin", tags=("operator",)),
]


def add_routes(routes: Routes) -> None:
    routes.add_get("/v1/cluster", get_cluster)
