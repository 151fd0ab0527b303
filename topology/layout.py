"""The layout schema (sites, origins, links, tariffs, accelerators) and its validation.

What this module promises:

- Rule 1: a :class:`Layout` that exists is valid. :func:`from_dict` is the only way a file becomes a
  Layout; it checks everything (unknown keys, ids, coordinates, references, tariffs, the speed-of-light
  floor of every link, origin attachments, a connected backbone) and raises :class:`LayoutError`
  carrying *every* problem it found, each as ``"FILE[:LINE]: ENTRY: REASON"``.
- Rule 2: the backbone is complete here. ``Layout.links`` holds the stated links plus the links the
  shape rules add (hubs meshed, each regional pool to its two nearest hubs, each edge pool to its
  nearest regional pool or hub), so every consumer sees the same graph.
- Rule 3: pure. No file I/O (``loader.py`` reads files), no clock (``now`` is an argument), no
  randomness. The physics constants live here so validation and the latency model agree.

Time is China local time (UTC+8, no daylight saving) for tariff hours.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Any, Literal

import msgspec

# Light in fibre: group index ~1.467, ~204,000 km/s -> 4.9 us per km one way (REFERENCE.md, [P]).
FIBRE_MS_PER_KM = 0.0049
EARTH_RADIUS_KM = 6371.0088  # IUGG mean radius
CHINA_UTC_OFFSET_S = 8 * 3600

# Same rule as edge_agent.wire.ID_PATTERN (a test keeps them equal); copied because topology
# imports neither controlplane nor edge_agent (DESIGN section 2).
ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_ID_RE = re.compile(ID_PATTERN)

TIERS = ("hub", "regional", "edge")
Tier = Literal["hub", "regional", "edge"]

# Shape rules for the generated backbone (Rule 2).
REGIONAL_HUB_LINKS = 2


class LayoutError(ValueError):
    """A layout that cannot be used. ``errors`` lists every problem as ``"FILE: ENTRY: REASON"``."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        head = f"{len(self.errors)} problem(s) in layout" if len(self.errors) != 1 else "invalid layout"
        super().__init__(head + ":\n  " + "\n  ".join(self.errors))


# --------------------------------------------------------------------------- geometry and time


def great_circle_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in km between two points given in degrees (haversine)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp = p2 - p1
    dl = math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def local_hour(now: float) -> int:
    """Hour of day (0..23) in China local time (UTC+8) for ``now`` in epoch seconds."""
    return int(((now + CHINA_UTC_OFFSET_S) // 3600) % 24)


def rtt_floor_ms(km: float) -> float:
    """The speed-of-light RTT floor over ``km`` of straight fibre (no route factor, no hops)."""
    return 2.0 * km * FIBRE_MS_PER_KM


# --------------------------------------------------------------------------- schema


class Tariff(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A time-of-use power tariff; hours are China local time (UTC+8)."""

    flat_cny_per_kwh: float
    peak_cny_per_kwh: float
    valley_cny_per_kwh: float
    peak_hours: list[int] = []
    valley_hours: list[int] = []
    source: str = ""

    def price_at_hour(self, hour: int) -> float:
        """Price in CNY/kWh during local ``hour`` (0..23)."""
        if hour in self.peak_hours:
            return self.peak_cny_per_kwh
        if hour in self.valley_hours:
            return self.valley_cny_per_kwh
        return self.flat_cny_per_kwh

    def price_at(self, now: float) -> float:
        """Price in CNY/kWh at ``now`` (epoch seconds)."""
        return self.price_at_hour(local_hour(now))

    def mean_cny_per_kwh(self) -> float:
        """Average price over the 24 hours of a day (flat load)."""
        return sum(self.price_at_hour(h) for h in range(24)) / 24.0


class AcceleratorSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One accelerator type; ``units`` is compute normalised to A800 = 1.0."""

    name: str = ""  # filled from the table key when loaded from a file
    vendor: str
    units: float
    kw_per_card: float
    memory_gb: float
    source: str = ""


class Site(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A pool of accelerators: a ten-thousand-card hub, a regional pool or an edge inference pool."""

    id: str
    name: str
    city: str
    region: str
    lat: float
    lon: float
    tier: Tier
    provider: str
    accelerators: dict[str, int]
    tariff: Tariff
    pue: float
    failure_rate_per_card_hour: float
    tee: bool = False
    restart_s: float = 300.0
    egress_gbps: float = 10.0
    sources: dict[str, str] = {}

    @property
    def cards(self) -> int:
        """Total cards over all accelerator types."""
        return sum(self.accelerators.values())


class Origin(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A demand origin (a city). ``attach`` names access sites explicitly; empty means automatic."""

    id: str
    name: str
    region: str
    lat: float
    lon: float
    weight: float
    attach: list[str] = []


class Link(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A backbone link between two sites.

    Its fibre length is ``fibre_km`` when measured, else great-circle km x the layout's route factor.
    Its one-way latency is ``one_way_ms`` when measured (all-in), else fibre km x 4.9 us/km plus
    the layout's per-hop forwarding time.
    """

    a: str
    b: str
    fibre_km: float | None = None
    one_way_ms: float | None = None
    kind: str = "stated"  # "stated" (from the file) or the shape rule that made it
    source: str = ""


class Region(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A region of the network: one NATS cluster, its gateway cities, and the provinces it serves.

    ``provinces`` are values of the ``region`` field of origins and sites (which holds the province,
    a name kept from the first file format); each province belongs to exactly one region, so every
    site has exactly one region. ``cluster`` is the city (an origin id) hosting the region's 3-node
    NATS cluster: a city with a hub or regional pool of the region. ``gateways`` are the cities
    (origin ids) where tenants' HTTP gateways of the region stand.
    """

    id: str = ""  # filled from the table key when loaded from a file
    name: str
    cluster: str
    gateways: list[str]
    provinces: list[str]
    source: str = ""


class Layout(msgspec.Struct, dict=True, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A whole network: sites, demand origins, accelerator types, backbone links, CIDR map."""

    name: str
    sites: list[Site]
    origins: list[Origin]
    accelerators: dict[str, AcceleratorSpec]
    links: list[Link]
    cidrs: dict[str, str] = {}
    regions: list[Region] = []
    route_factor: float = 1.5
    hop_ms: float = 0.1
    metro_km: float = 30.0
    max_access_km: float = 600.0
    description: str = ""
    sources: dict[str, str] = {}
    illustrative: list[str] = []

    def __post_init__(self) -> None:
        # Lookup tables; Layout is frozen, so they are set once here and never change.
        msgspec.structs.force_setattr(self, "_sites", {s.id: s for s in self.sites})
        msgspec.structs.force_setattr(self, "_origins", {o.id: o for o in self.origins})
        nets = []
        for cidr, origin in self.cidrs.items():
            try:
                nets.append((ipaddress.ip_network(cidr, strict=False), origin))
            except ValueError:
                continue  # reported by validate()
        nets.sort(key=lambda item: -item[0].prefixlen)  # longest prefix wins
        msgspec.structs.force_setattr(self, "_nets", nets)

    def site(self, site_id: str) -> Site:
        """The site with this id; KeyError if unknown."""
        return self._sites[site_id]  # type: ignore[attr-defined, no-any-return]

    def origin(self, origin_id: str) -> Origin:
        """The origin with this id; KeyError if unknown."""
        return self._origins[origin_id]  # type: ignore[attr-defined, no-any-return]

    def has_site(self, site_id: str) -> bool:
        """True if a site with this id is in the layout."""
        return site_id in self._sites  # type: ignore[attr-defined]

    def has_origin(self, origin_id: str) -> bool:
        """True if an origin with this id is in the layout."""
        return origin_id in self._origins  # type: ignore[attr-defined]

    def origin_for_ip(self, address: str) -> str | None:
        """The origin whose CIDR holds ``address`` (longest prefix wins), or None."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return None
        for net, origin in self._nets:  # type: ignore[attr-defined]
            if ip.version == net.version and ip in net:
                return origin  # type: ignore[no-any-return]
        return None

    def region_of_site(self, site_id: str) -> str | None:
        """The id of the region holding this site's province (None: the layout names no regions)."""
        return self.region_of_province(self.site(site_id).region)

    def region_of_province(self, province: str) -> str | None:
        """The id of the region listing ``province`` (None if none does)."""
        for r in self.regions:
            if province in r.provinces:
                return r.id
        return None

    def gateways(self) -> list[str]:
        """The gateway cities the layout names, region by region (empty: none named)."""
        out: list[str] = []
        for r in self.regions:
            out.extend(g for g in r.gateways if g not in out)
        return out

    def cards_by_accelerator(self) -> dict[str, int]:
        """Total cards per accelerator type over all sites."""
        out: dict[str, int] = {}
        for s in self.sites:
            for name, n in s.accelerators.items():
                out[name] = out.get(name, 0) + n
        return dict(sorted(out.items()))


# --------------------------------------------------------------------------- link physics


def site_distance_km(a: Site, b: Site) -> float:
    """Great-circle km between two sites."""
    return great_circle_km(a.lat, a.lon, b.lat, b.lon)


def link_fibre_km(link: Link, a: Site, b: Site, route_factor: float) -> float:
    """Fibre length of a link: the measured ``fibre_km`` or great-circle x route factor."""
    if link.fibre_km is not None:
        return link.fibre_km
    return site_distance_km(a, b) * route_factor


def link_one_way_ms(link: Link, a: Site, b: Site, route_factor: float, hop_ms: float) -> float:
    """One-way latency of a link: measured ``one_way_ms`` or fibre km x 4.9 us/km + one hop."""
    if link.one_way_ms is not None:
        return link.one_way_ms
    return link_fibre_km(link, a, b, route_factor) * FIBRE_MS_PER_KM + hop_ms


def access_km(origin: Origin, site: Site, route_factor: float, metro_km: float) -> float:
    """Fibre km of an origin's access link to a site: metro fibre at least ``metro_km``."""
    km = great_circle_km(origin.lat, origin.lon, site.lat, site.lon) * route_factor
    return max(km, metro_km)


def access_one_way_ms(origin: Origin, site: Site, layout: Layout) -> float:
    """One-way latency of an origin's access link to a site (fibre + one hop)."""
    return access_km(origin, site, layout.route_factor, layout.metro_km) * FIBRE_MS_PER_KM + layout.hop_ms


def attachments(layout: Layout) -> dict[str, list[str]]:
    """Origin id -> the site ids it attaches to (its points of presence).

    An origin attaches to its ``attach`` list if given; else to every site in its own city; else to
    the nearest site within ``max_access_km`` great-circle. An origin with none is invalid.
    """
    cached = getattr(layout, "_attach", None)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    by_city: dict[str, list[str]] = {}
    for s in layout.sites:
        by_city.setdefault(s.city, []).append(s.id)
    out: dict[str, list[str]] = {}
    for o in layout.origins:
        out[o.id] = attach_sites(o, layout.sites, by_city.get(o.id, []), layout.max_access_km)
    msgspec.structs.force_setattr(layout, "_attach", out)
    return out


def attach_sites(origin: Origin, sites: list[Site], same_city: list[str], max_access_km: float) -> list[str]:
    """The attachment rule of :func:`attachments` for one origin."""
    if origin.attach:
        return list(origin.attach)
    if same_city:
        return list(same_city)
    best: tuple[float, str] | None = None
    for s in sites:
        km = great_circle_km(origin.lat, origin.lon, s.lat, s.lon)
        if km <= max_access_km and (best is None or (km, s.id) < best):
            best = (km, s.id)
    return [best[1]] if best else []


def auto_links(sites: list[Site], stated: list[Link] | None = None) -> list[Link]:
    """Links the shape rules add, skipping pairs already in ``stated``.

    Hubs are meshed; each regional pool links to its REGIONAL_HUB_LINKS nearest hubs; each edge
    pool links to its nearest regional pool or hub (an edge pool is single-homed on purpose: its
    uplink going down cuts it off, as it would).
    """
    have = {frozenset((l.a, l.b)) for l in stated or []}
    out: list[Link] = []

    def add(a: str, b: str, kind: str) -> None:
        key = frozenset((a, b))
        if a != b and key not in have:
            have.add(key)
            out.append(Link(a=a, b=b, kind=kind))

    hubs = sorted((s for s in sites if s.tier == "hub"), key=lambda s: s.id)
    upper = [s for s in sites if s.tier in ("hub", "regional")]
    for i, h in enumerate(hubs):
        for g in hubs[i + 1 :]:
            add(h.id, g.id, "hub-mesh")
    for s in sites:
        if s.tier == "regional":
            near = sorted(hubs, key=lambda h: (site_distance_km(s, h), h.id))[:REGIONAL_HUB_LINKS]
            for h in near:
                add(s.id, h.id, "regional-hub")
    for s in sites:
        if s.tier == "edge":
            up = uplink_for(s, upper)
            if up is not None:
                add(s.id, up, "edge-uplink")
    return out


def uplink_for(site: Site, upper: list[Site]) -> str | None:
    """The nearest hub or regional pool (other than ``site``) an edge pool hangs off."""
    best: tuple[float, str] | None = None
    for u in upper:
        if u.id == site.id:
            continue
        key = (site_distance_km(site, u), u.id)
        if best is None or key < best:
            best = key
    return best[1] if best else None


def links_for_new_site(site: Site, sites: list[Site]) -> list[Link]:
    """Shape-rule links for a site joining an existing network (e.g. one not in the layout)."""
    others = [s for s in sites if s.id != site.id]
    hubs = [s for s in others if s.tier == "hub"]
    if site.tier == "hub":
        return [Link(a=site.id, b=h.id, kind="hub-mesh") for h in sorted(hubs, key=lambda h: h.id)]
    if site.tier == "regional":
        near = sorted(hubs, key=lambda h: (site_distance_km(site, h), h.id))[:REGIONAL_HUB_LINKS]
        return [Link(a=site.id, b=h.id, kind="regional-hub") for h in near]
    up = uplink_for(site, [s for s in others if s.tier in ("hub", "regional")])
    return [Link(a=site.id, b=up, kind="edge-uplink")] if up else []
