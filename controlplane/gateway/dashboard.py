"""The operator dashboard: ``/dashboard`` (a static page) and ``/v1/dashboard`` (its data, admin key).

The page and its assets are public and carry no data: they ask for an admin key (kept in the
browser's local storage, or given once as ``/dashboard#key=...``; a fragment never reaches a server)
and poll ``GET /v1/dashboard`` every two seconds. Everything it needs ships with cpn: the script,
the styles and the province outlines (``/dashboard/provinces.json``, topology/provinces.py); no CDN,
no map tiles, so it works on an operator network cut off from the internet.

``/v1/dashboard`` returns, in one answer: every site with its coordinates, tier, state, load, free
cards and replicas; the 5/10 ms reach radius; deployments and their replicas; the job queue with
each placement's explanation; utilisation (busy share of cards) by tier sampled every
``SAMPLE_S`` over the last ``HISTORY_S``; and the last site losses and returns.
"""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any

from aiohttp import web

from controlplane.gateway.app import SERVICES, Routes, json_response, require_admin
from controlplane.gateway.openapi import Op

if TYPE_CHECKING:
    from controlplane.services.record import Services

STATIC = pathlib.Path(__file__).resolve().parent / "static"
_TYPES = {".html": "text/html", ".js": "application/javascript", ".css": "text/css", ".json": "application/json"}




def state(services: Services, now: float) -> dict[str, Any]:
    """The whole ``/v1/dashboard`` answer."""
    from topology import mapplot

    registry = services.sites.registry
    history = services.dashboard
    layout = services.sites.layout
    placed = {s.id: s for s in layout.sites}
    sites = []
    for view in sorted(registry, key=lambda v: v.id):
        d = view.as_dict(now)
        static = placed.get(view.id)
        d["lat"] = static.lat if static is not None else None
        d["lon"] = static.lon if static is not None else None
        d["name"] = static.name if static is not None else view.id
        d["cards"] = sum(view.accelerators.values())
        sites.append(d)
    for sid, static in placed.items():  # declared but never heard from since this hub started
        if registry.get(sid) is None:
            sites.append({"id": sid, "name": static.name, "state": "unknown", "tier": static.tier, "city": static.city,
                          "lat": static.lat, "lon": static.lon, "cards": sum(static.accelerators.values()),
                          "accelerators": dict(static.accelerators), "free_cards": {}, "models": {}, "draining": False})
    body: dict[str, Any] = {
        "object": "dashboard",
        "hub": services.config.hub_id,
        "now": now,
        "ready": services.status.ready(),
        "nats": "connected" if services.status.nats_connected else "disconnected",
        "counts": registry.counts(),
        "sites": sites,
        "origins": [{"id": o.id, "name": o.name, "lat": o.lat, "lon": o.lon, "weight": o.weight}
                    for o in layout.origins],
        "reach_km": {"5": round(mapplot.reach_km(5, layout), 1), "10": round(mapplot.reach_km(10, layout), 1)},
        "utilisation": list(history.samples),
        "faults": list(history.faults),
        "deployments": history.deployments(),
        "jobs": history.jobs(),
    }
    return body


async def dashboard_state(request: web.Request) -> web.Response:
    require_admin(request)
    services = request.app[SERVICES]
    return json_response(state(services, services.clock.time()))


async def page(request: web.Request) -> web.StreamResponse:
    return _static("dashboard.html")


async def asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in {"dashboard.js", "dashboard.css"}:  # a fixed list: no path ever reaches the disk
        raise web.HTTPNotFound()
    return _static(name)


async def provinces(request: web.Request) -> web.StreamResponse:
    from topology import provinces as province_data

    return web.Response(body=province_data.DATA.read_bytes(), content_type="application/json",
                        headers={"Cache-Control": "public, max-age=86400"})


def _static(name: str) -> web.Response:
    path = STATIC / name
    return web.Response(body=path.read_bytes(), content_type=_TYPES[path.suffix],
                        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                                 "Content-Security-Policy": "default-src 'self'; style-src 'self'; img-src 'self' data:"})


OPERATIONS = [
    Op("GET", "/v1/dashboard", "Operator dashboard data: sites with coordinates and state, reach, deployments, job queue "
       "with placement explanations, utilisation by tier, recent faults", auth="admin", tags=("operator",)),
    Op("GET", "/dashboard", "The operator dashboard page (static; asks for an admin key)", auth="none", tags=("operator",),
       content_type="text/html", response={"type": "string"}),
]


def add_routes(routes: Routes) -> None:
    routes.add_get("/v1/dashboard", dashboard_state)
    routes.add_get("/dashboard", page, public=True)
    routes.add_get("/dashboard/static/{name}", asset, public=True)
    routes.add_get("/dashboard/provinces.json", provinces, public=True)

