"""The shipped province outlines: the whole country, and every site and demand origin of the national
layout inside one of them (so the map's dots sit in the right provinces)."""

from __future__ import annotations

import math

from topology import loader


def inside(lon: float, lat: float, ring: tuple[tuple[float, float], ...]) -> bool:
    hit = False
    for (x1, y1), (x2, y2) in zip(ring, ring[1:] + ring[:1]):
        if (y1 > lat) != (y2 > lat) and lon < x1 + (lat - y1) * (x2 - x1) / (y2 - y1):
            hit = not hit
    return hit


def near_km(lon: float, lat: float, ring: tuple[tuple[float, float], ...]) -> float:
    return min(math.hypot((x - lon) * math.cos(math.radians(lat)), y - lat) * 111 for x, y in ring)


def test_outlines_cover_the_country_and_say_where_they_come_from() -> None:
    ps, source = loader.load_provinces()
    names = {p.name for p in ps}
    assert {"Beijing", "Shanghai", "Guangdong", "Xinjiang", "Xizang", "Inner Mongolia", "Hainan", "Taiwan"} <= names
    assert len(names) >= 32 and all(len(r) >= 4 for p in ps for r in p.rings)
    assert "Natural Earth" in source and "public domain" in source


def test_every_site_and_origin_of_the_national_layout_is_in_a_province() -> None:
    lay = loader.load_default()
    rings = [r for p in loader.load_provinces()[0] for r in p.rings]
    points = [(s.id, s.lon, s.lat) for s in lay.sites] + [(o.id, o.lon, o.lat) for o in lay.origins]
    # Simplification moves coasts by up to a few km: a coastal city may sit just off its outline.
    outside = [pid for pid, lon, lat in points
               if not any(inside(lon, lat, r) for r in rings) and min(near_km(lon, lat, r) for r in rings) > 15]
    assert outside == []
