"""``/healthz`` (liveness), ``/readyz`` (readiness) and ``/metrics`` (public, no key).

``/healthz`` answers 200 while the process can answer at all: a liveness probe restarts a process
that does not, and restarting a hub because NATS is down would not bring NATS back. Its body still
says what it sees (NATS connected or not, sites by state). ``/readyz`` answers 200 only when the
hub can do its job (controlplane/readiness.py) and 503 with the failing checks otherwise: that is
the probe a load balancer or a script waiting for ``cpn up`` should use.
"""

from __future__ import annotations

from aiohttp import web

from controlplane.gateway.app import SERVICES, Routes, json_response
from controlplane.gateway.openapi import Op


async def healthz(request: web.Request) -> web.Response:
    return json_response(request.app[SERVICES].status.health(), status=200)


async def readyz(request: web.Request) -> web.Response:
    body = request.app[SERVICES].status.readiness_report()
    return json_response(body, status=200 if body["ready"] else 503)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[SERVICES].status.metrics_text()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


OPERATIONS = [
    Op("GET", "/healthz", "Liveness: 200 while the process answers; the body says NATS state and sites by state",
       auth="none", tags=("meta",)),
    Op("GET", "/readyz", "Readiness: 200 only when the record is open, NATS connected, the layout loaded and every "
       "gate released (cpn up: the demo model served); else 503 naming the failing checks", auth="none", tags=("meta",)),
    Op("GET", "/metrics", "Prometheus metrics", auth="none", tags=("meta",), content_type="text/plain", response={"type": "string"}),
]


def add_routes(routes: Routes) -> None:
    routes.add_get("/healthz", healthz, public=True)
    routes.add_get("/readyz", readyz, public=True)
    routes.add_get("/metrics", metrics, public=True)
