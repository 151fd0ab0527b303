"""``/healthz`` and ``/metrics`` (public, no key)."""

from __future__ import annotations

from aiohttp import web

from controlplane.gateway.app import HUB, Routes, json_response
from controlplane.gateway.openapi import Op


async def healthz(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    counts = hub.registry.counts()
    ok = hub.bus.connected
    body = {
        "status": "ok" if ok else "degraded",
        "hub": hub.config.hub_id,
        "nats": "connected" if ok else "disconnected",
        "sites": counts,
    }
    return json_response(body, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    body = hub.metrics.render(hub.refresh_metrics)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


OPERATIONS = [
]


OPERATIONS = [
    Op("GET", "/healthz", "Hub health: NATS connection and sites by state", auth="none", tags=("meta",)),
    Op("GET", "/metrics", "Prometheus metrics", auth="none", tags=("meta",), content_type="text/plain", response={"type": "string"}),
]


def add_routes(routes: Routes) -> None:
    routes.add_get("/healthz", healthz, public=True)
    routes.add_get("/metrics", metrics, public=True)
