"""The layout file format (a TOML document as a dict) -> a valid :class:`layout.Layout`.

Promises:

- :func:`from_dict` either returns a Layout that passes every rule below or raises
  :class:`layout.LayoutError` listing every problem, each as ``"FILE[:LINE]: ENTRY: REASON"``
  (LINE is the line of the entry's ``[[sites]]``/``[[origins]]``/``[[links]]``/``[table.key]``
  header when the loader could find it).
- Rules: no unknown keys anywhere; ids are one NATS token and unique; coordinates in range; every
  reference (city, accelerator, tariff, attach, link end, CIDR origin) resolves; tariffs are sane
  (hours 0..23, peak and valley disjoint, valley <= flat <= peak); no link is faster than light in
  fibre for its length (nor shorter than the great circle); regions (if any) name known cities and
  split the provinces so that each province, and so each site, is in exactly one region; every
  origin has an attachment; the backbone (stated + shape-rule links) is connected.
- Pure: takes a dict, returns data. The file format is documented in docs/topology.md.
"""

from __future__ import annotations

import ipaddress
import math
from typing import Any

import msgspec

from .layout import (
    FIBRE_MS_PER_KM,
    TIERS,
    AcceleratorSpec,
    Layout,
    LayoutError,
    Link,
    Origin,
    Region,
    Site,
    Tariff,
    _ID_RE,
    ID_PATTERN,
    attachments,
    auto_links,
    site_distance_km,
)

# Where entries start in the file: (section, index or key) -> line number (1-based).
Lines = dict[tuple[str, Any], int]


class _Head(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The top level of a layout file; sections are checked entry by entry afterwards."""

    name: str
    description: str = ""
    route_factor: float = 1.5
    hop_ms: float = 0.1
    metro_km: float = 30.0
    max_access_km: float = 600.0
    auto_links: bool = True
    sources: dict[str, str] = {}
    illustrative: list[str] = []
    accelerators: dict[str, dict[str, Any]] = {}
    tariffs: dict[str, dict[str, Any]] = {}
    defaults: dict[str, dict[str, Any]] = {}
    sites: list[dict[str, Any]] = []
    origins: list[dict[str, Any]] = []
    links: list[dict[str, Any]] = []
    cidrs: dict[str, str] = {}
    regions: dict[str, dict[str, Any]] = {}


class _SiteEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A ``[[sites]]`` entry after its tier's ``[defaults.<tier>]`` are merged in."""

    id: str
    name: str
    city: str
    lat: float
    lon: float
    tier: str
    provider: str
    accelerators: dict[str, int]
    tariff: str | Tariff
    pue: float
    failure_rate_per_card_hour: float
    region: str = ""  # defaults to the region of the site's city (an origin)
    tee: bool = False
    restart_s: float = 300.0
    egress_gbps: float = 10.0
    sources: dict[str, str] = {}


_SITE_FIELDS = set(_SiteEntry.__struct_fields__)
_PER_SITE_ONLY = {"id", "name", "city", "lat", "lon"}


def _where(filename: str, lines: Lines, key: tuple[str, Any]) -> str:
    line = lines.get(key)
    return f"{filename}:{line}" if line else filename


def _msgspec_reason(exc: msgspec.ValidationError) -> str:
    # msgspec says "... - at `$.accelerators.A800`"; the entry is named already, keep the field path.
    return str(exc).replace("`$.", "`").replace("`$[", "`[")


def from_dict(doc: dict[str, Any], filename: str = "<layout>", lines: Lines | None = None) -> Layout:
    """Turn a parsed layout document into a valid :class:`Layout`.

    Args:
        doc: the parsed TOML document.
        filename: used in every error message.
        lines: optional entry -> line numbers (see :data:`Lines`) for messages.

    Raises:
        LayoutError: listing every problem found.
    """
    lines = lines or {}
    errors: list[str] = []

    def err(key: tuple[str, Any], entry: str, reason: str) -> None:
        errors.append(f"{_where(filename, lines, key)}: {entry}: {reason}")

    try:
        head = msgspec.convert(doc, _Head)
    except msgspec.ValidationError as exc:
        raise LayoutError([f"{filename}: layout: {_msgspec_reason(exc)}"]) from None

    # ---- layout-wide numbers
    for field, value, ok, rule in (
        ("route_factor", head.route_factor, head.route_factor >= 1.0, ">= 1.0 (fibre is never shorter than the great circle)"),
        ("hop_ms", head.hop_ms, head.hop_ms >= 0.0, ">= 0"),
        ("metro_km", head.metro_km, head.metro_km > 0.0, "> 0"),
        ("max_access_km", head.max_access_km, head.max_access_km > 0.0, "> 0"),
    ):
        if not (math.isfinite(value) and ok):
            err(("", None), "layout", f"{field} = {value} must be {rule}")

    # ---- accelerators
    accelerators: dict[str, AcceleratorSpec] = {}
    for name, table in head.accelerators.items():
        entry = f"accelerators.{name}"
        try:
            spec = msgspec.convert({"name": name, **table}, AcceleratorSpec)
        except msgspec.ValidationError as exc:
            err(("accelerators", name), entry, _msgspec_reason(exc))
            continue
        if spec.name != name:
            err(("accelerators", name), entry, f"name {spec.name!r} differs from its table key")
        for field in ("units", "kw_per_card", "memory_gb"):
            value = getattr(spec, field)
            if not (math.isfinite(value) and value > 0):
                err(("accelerators", name), entry, f"{field} = {value} must be > 0")
        accelerators[name] = spec

    # ---- named tariffs
    tariffs: dict[str, Tariff] = {}
    for name, table in head.tariffs.items():
        entry = f"tariffs.{name}"
        try:
            named = msgspec.convert(table, Tariff)
        except msgspec.ValidationError as exc:
            err(("tariffs", name), entry, _msgspec_reason(exc))
            continue
        for reason in tariff_problems(named):
            err(("tariffs", name), entry, reason)
        tariffs[name] = named

    # ---- per-tier defaults
    defaults: dict[str, dict[str, Any]] = {}
    for tier, table in head.defaults.items():
        entry = f"defaults.{tier}"
        if tier not in TIERS:
            err(("defaults", tier), entry, f"unknown tier {tier!r} (want one of {', '.join(TIERS)})")
            continue
        bad = sorted(set(table) - (_SITE_FIELDS - _PER_SITE_ONLY - {"tier"}))
        if bad:
            err(("defaults", tier), entry, f"unknown or per-site key(s): {', '.join(bad)}")
            continue
        defaults[tier] = table

    # ---- origins (before sites: a site's city is an origin)
    origins: list[Origin] = []
    origin_ids: dict[str, int] = {}
    for i, table in enumerate(head.origins):
        key = ("origins", i)
        entry = f"origins[{i}] {table.get('id', '?')!r}"
        try:
            o = msgspec.convert(table, Origin)
        except msgspec.ValidationError as exc:
            err(key, entry, _msgspec_reason(exc))
            continue
        ok = _check_place("origin", o.id, o.lat, o.lon, origin_ids, key, entry, err)
        if not (math.isfinite(o.weight) and o.weight > 0):
            err(key, entry, f"weight = {o.weight} must be > 0")
            ok = False
        if ok:
            origin_ids[o.id] = i
            origins.append(o)
    origin_by_id = {o.id: o for o in origins}

    # ---- sites
    sites: list[Site] = []
    site_ids: dict[str, int] = {}
    for i, table in enumerate(head.sites):
        key = ("sites", i)
        entry = f"sites[{i}] {table.get('id', '?')!r}"
        merged = _merge_defaults(table, defaults)
        try:
            e = msgspec.convert(merged, _SiteEntry)
        except msgspec.ValidationError as exc:
            err(key, entry, _msgspec_reason(exc))
            continue
        ok = _check_place("site", e.id, e.lat, e.lon, site_ids, key, entry, err)
        if e.tier not in TIERS:
            err(key, entry, f"tier {e.tier!r} must be one of {', '.join(TIERS)}")
            ok = False
        city = origin_by_id.get(e.city)
        if city is None:
            err(key, entry, f"city {e.city!r} is not an origin id (add it under [[origins]])")
            ok = False
        if not e.accelerators:
            err(key, entry, "accelerators is empty (a site has at least one card)")
            ok = False
        for name, n in e.accelerators.items():
            if name not in head.accelerators:
                err(key, entry, f"accelerator {name!r} is not defined under [accelerators]")
                ok = False
            if n <= 0:
                err(key, entry, f"accelerators.{name} = {n} must be > 0")
                ok = False
        if isinstance(e.tariff, str):
            tariff = tariffs.get(e.tariff)
            if tariff is None:
                if e.tariff not in head.tariffs:
                    err(key, entry, f"tariff {e.tariff!r} is not defined under [tariffs]")
                ok = False
        else:
            tariff = e.tariff
            for reason in tariff_problems(tariff):
                err(key, entry, f"tariff: {reason}")
                ok = False
        for field, value, cond, rule in (
            ("pue", e.pue, 1.0 <= e.pue <= 3.0, "within 1.0..3.0"),
            ("failure_rate_per_card_hour", e.failure_rate_per_card_hour, 0.0 <= e.failure_rate_per_card_hour < 1.0, "within 0..1"),
            ("restart_s", e.restart_s, e.restart_s >= 0.0, ">= 0"),
            ("egress_gbps", e.egress_gbps, e.egress_gbps > 0.0, "> 0"),
        ):
            if not (math.isfinite(value) and cond):
                err(key, entry, f"{field} = {value} must be {rule}")
                ok = False
        if not ok:
            continue
        assert tariff is not None and city is not None
        site_ids[e.id] = i
        sites.append(
            Site(
                id=e.id, name=e.name, city=e.city, region=e.region or city.region, lat=e.lat, lon=e.lon,
                tier=e.tier,  # type: ignore[arg-type]
                provider=e.provider, accelerators=dict(e.accelerators), tariff=tariff, pue=e.pue,
                failure_rate_per_card_hour=e.failure_rate_per_card_hour, tee=e.tee,
                restart_s=e.restart_s, egress_gbps=e.egress_gbps, sources=dict(e.sources),
            )
        )
    site_by_id = {s.id: s for s in sites}

    # ---- origin attachments named explicitly
    ids_in_file = {t.get("id") for t in head.sites}
    for o in origins:
        idx = origin_ids[o.id]
        for sid in o.attach:
            if sid not in ids_in_file:
                err(("origins", idx), f"origins[{idx}] {o.id!r}", f"attach names unknown site {sid!r}")

    # ---- stated links
    links: list[Link] = []
    seen: dict[frozenset[str], int] = {}
    for i, table in enumerate(head.links):
        key = ("links", i)
        entry = f"links[{i}] {table.get('a', '?')}--{table.get('b', '?')}"
        try:
            link = msgspec.convert(table, Link)
        except msgspec.ValidationError as exc:
            err(key, entry, _msgspec_reason(exc))
            continue
        reasons = link_problems(link, site_by_id, head.route_factor)
        pair = frozenset((link.a, link.b))
        if pair in seen:
            reasons.append(f"duplicate link (first at links[{seen[pair]}])")
        for r in reasons:
            err(key, entry, r)
        if not reasons:
            seen[pair] = i
            links.append(Link(a=link.a, b=link.b, fibre_km=link.fibre_km, one_way_ms=link.one_way_ms, kind="stated", source=link.source))

    # ---- CIDR map
    for cidr, origin_id in head.cidrs.items():
        entry = f"cidrs[{cidr!r}]"
        try:
            ipaddress.ip_network(cidr, strict=True)
        except ValueError as exc:
            err(("cidrs", cidr), entry, f"not a network: {exc}")
        if origin_id not in origin_by_id:
            err(("cidrs", cidr), entry, f"origin {origin_id!r} is not an origin id")

    # ---- regions: a partition of the provinces, each with a cluster city and gateway cities
    regions = _regions(head, origin_by_id, sites, err)
    if regions:
        listed = {p for r in regions for p in r.provinces}
        for i, table in enumerate(head.sites):
            placed = site_by_id.get(str(table.get("id")))
            if placed is not None and placed.region not in listed:
                err(("sites", i), f"sites[{i}] {placed.id!r}",
                    f"province {placed.region!r} is in no region (add it to one [regions.*] provinces list)")

    if head.auto_links:
        links = links + auto_links(sites, links)

    layout = Layout(
        name=head.name, sites=sites, origins=origins, accelerators=accelerators, links=links,
        cidrs=dict(head.cidrs), regions=regions, route_factor=head.route_factor, hop_ms=head.hop_ms,
        metro_km=head.metro_km, max_access_km=head.max_access_km, description=head.description,
        sources=dict(head.sources), illustrative=list(head.illustrative),
    )

    if errors:
        # Graph-wide checks on a partial layout would only add noise.
        raise LayoutError(errors)

    # ---- every origin reaches the backbone
    for o, attached in zip(layout.origins, attachments(layout).values()):
        if not attached:
            idx = origin_ids[o.id]
            err(("origins", idx), f"origins[{idx}] {o.id!r}",
                f"no attachment: no site in city {o.id!r}, none within max_access_km = "
                f"{layout.max_access_km:g} km, and no attach list")

    # ---- one connected backbone
    for reason in connectivity_problems(layout):
        err(("", None), "backbone", reason)

    if errors:
        raise LayoutError(errors)
    return layout


def _regions(head: _Head, origin_by_id: dict[str, Origin], sites: list[Site], err: Any) -> list[Region]:
    """The ``[regions.<id>]`` tables, checked: known cities, provinces in exactly one region."""
    out: list[Region] = []
    provinces = {o.region for o in origin_by_id.values()} | {s.region for s in sites}
    owner: dict[str, str] = {}
    for rid, table in head.regions.items():
        key, entry = ("regions", rid), f"regions.{rid}"
        try:
            r = msgspec.convert({"id": rid, **table}, Region)
        except msgspec.ValidationError as exc:
            err(key, entry, _msgspec_reason(exc))
            continue
        ok = _check_id(rid, "id", key, entry, err)
        if r.id != rid:
            err(key, entry, f"id {r.id!r} differs from its table key")
            ok = False
        if not r.provinces:
            err(key, entry, "provinces is empty (a region serves at least one province)")
            ok = False
        for p in r.provinces:
            if p not in provinces:
                err(key, entry, f"province {p!r} is the region of no origin or site")
                ok = False
            elif p in owner:
                err(key, entry, f"province {p!r} is already in region {owner[p]!r} (a province has one region)")
                ok = False
            else:
                owner[p] = rid
        if not r.gateways:
            err(key, entry, "gateways is empty (a region has at least one gateway city)")
            ok = False
        for city in [r.cluster, *r.gateways]:
            what = "cluster" if city == r.cluster else "gateway"
            o = origin_by_id.get(city)
            if o is None:
                err(key, entry, f"{what} city {city!r} is not an origin id")
                ok = False
            elif o.region not in r.provinces:
                err(key, entry, f"{what} city {city!r} is in province {o.region!r}, not one of this region's")
                ok = False
        if not any(s.city == r.cluster and s.tier in ("hub", "regional") for s in sites):
            err(key, entry, f"cluster city {r.cluster!r} hosts no hub or regional pool (the cluster stands at one)")
            ok = False
        if ok:
            out.append(r)
    return out


def tariff_problems(t: Tariff) -> list[str]:
    """Reasons a tariff is unusable (empty when fine)."""
    out = []
    for field in ("flat_cny_per_kwh", "peak_cny_per_kwh", "valley_cny_per_kwh"):
        value = getattr(t, field)
        if not (math.isfinite(value) and value > 0):
            out.append(f"{field} = {value} must be > 0")
    if not (t.valley_cny_per_kwh <= t.flat_cny_per_kwh <= t.peak_cny_per_kwh):
        out.append("prices must satisfy valley <= flat <= peak")
    for field in ("peak_hours", "valley_hours"):
        hours = getattr(t, field)
        bad = [h for h in hours if not 0 <= h <= 23]
        if bad:
            out.append(f"{field} has hours outside 0..23: {bad}")
        if len(set(hours)) != len(hours):
            out.append(f"{field} repeats an hour")
    both = sorted(set(t.peak_hours) & set(t.valley_hours))
    if both:
        out.append(f"hours {both} are both peak and valley")
    return out


def link_problems(link: Link, sites: dict[str, Site], route_factor: float) -> list[str]:
    """Reasons a stated link is impossible or dangling (empty when fine)."""
    out = []
    for end in ("a", "b"):
        sid = getattr(link, end)
        if sid not in sites:
            out.append(f"{end} = {sid!r} is not a site id")
    if link.a == link.b:
        out.append("a link joins two different sites")
    if out:
        return out
    a, b = sites[link.a], sites[link.b]
    gc_km = site_distance_km(a, b)
    if link.fibre_km is not None and not (math.isfinite(link.fibre_km) and link.fibre_km >= gc_km * 0.999):
        out.append(f"fibre_km = {link.fibre_km:g} is shorter than the great-circle distance {gc_km:.1f} km")
    if link.one_way_ms is not None:
        if link.fibre_km is not None and link.fibre_km > gc_km:
            km, what = link.fibre_km, "km of stated fibre"
        else:
            km, what = gc_km, "km great-circle"
        floor_ms = km * FIBRE_MS_PER_KM
        if not (math.isfinite(link.one_way_ms) and link.one_way_ms >= floor_ms * 0.999):
            out.append(
                f"one_way_ms = {link.one_way_ms:g} is below the speed-of-light floor {floor_ms:.3f} ms "
                f"for {km:.1f} {what} (4.9 us/km in fibre)"
            )
    return out


def connectivity_problems(layout: Layout) -> list[str]:
    """One reason per stray component of the site graph (empty when connected)."""
    parent = {s.id: s.id for s in layout.sites}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for link in layout.links:
        ra, rb = find(link.a), find(link.b)
        if ra != rb:
            parent[ra] = rb
    groups: dict[str, list[str]] = {}
    for s in layout.sites:
        groups.setdefault(find(s.id), []).append(s.id)
    if len(groups) <= 1:
        return []
    ordered = sorted(groups.values(), key=lambda g: (-len(g), g[0]))
    main = ordered[0]
    out = []
    for g in ordered[1:]:
        shown = ", ".join(sorted(g)[:10]) + (" ..." if len(g) > 10 else "")
        out.append(
            f"disconnected: site(s) {shown} have no path to {main[0]!r} "
            f"({len(ordered)} components; add a link or set auto_links = true)"
        )
    return out


def _check_id(value: str, field: str, key: tuple[str, Any], entry: str, err: Any) -> bool:
    if _ID_RE.match(value) is None:
        err(key, entry, f"{field} {value!r} is not one NATS token (want {ID_PATTERN})")
        return False
    return True


def _check_coords(lat: float, lon: float, key: tuple[str, Any], entry: str, err: Any) -> bool:
    ok = True
    if not (math.isfinite(lat) and -90.0 <= lat <= 90.0):
        err(key, entry, f"lat = {lat} is out of range -90..90")
        ok = False
    if not (math.isfinite(lon) and -180.0 <= lon <= 180.0):
        err(key, entry, f"lon = {lon} is out of range -180..180")
        ok = False
    return ok


def _check_place(what: str, pid: str, lat: float, lon: float, seen: dict[str, int], key: tuple[str, Any],
                 entry: str, err: Any) -> bool:
    """An origin's or a site's id (one token, not in ``seen``: id -> index of its first entry) and coordinates."""
    ok = _check_id(pid, "id", key, entry, err)
    if pid in seen:
        err(key, entry, f"duplicate {what} id {pid!r} (first at {what}s[{seen[pid]}])")
        ok = False
    return _check_coords(lat, lon, key, entry, err) and ok


def _merge_defaults(table: dict[str, Any], defaults: dict[str, dict[str, Any]]) -> dict[str, Any]:
    base = defaults.get(str(table.get("tier", "")), {})
    if not base:
        return table
    merged = {**base, **table}
    if "sources" in base and isinstance(table.get("sources"), dict):
        merged["sources"] = {**base["sources"], **table["sources"]}
    return merged


__all__ = ["from_dict", "tariff_problems", "link_problems", "connectivity_problems"]
