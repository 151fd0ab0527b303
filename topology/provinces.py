"""Province outlines of China for maps (``cpn topology map``, the operator dashboard).

The data file ``topology/data/provinces.json`` holds simplified Natural Earth admin-1 outlines
(public domain; where they come from and how they were simplified is in the file's ``source`` and
in ``topology/data/make_provinces.py``). Nothing here reaches the network: maps work offline.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

DATA = pathlib.Path(__file__).resolve().parent / "data" / "provinces.json"


@dataclass(frozen=True, slots=True)
class Province:
    name: str
    name_local: str
    rings: tuple[tuple[tuple[float, float], ...], ...]
    """Outer rings as (lon, lat) points."""


def load(path: pathlib.Path = DATA) -> list[Province]:
    """Every province, in the file's order (by English name)."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    return [
        Province(p["name"], p.get("name_local", ""), tuple(tuple((float(x), float(y)) for x, y in ring) for ring in p["rings"]))
        for p in doc["provinces"]
    ]


def source(path: pathlib.Path = DATA) -> str:
    """Where the outlines come from (to print beside a map)."""
    return str(json.loads(path.read_text(encoding="utf-8"))["source"])
