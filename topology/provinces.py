"""Province outlines of China for maps (``cpn topology map``, the operator dashboard).

The data file ``topology/data/provinces.json`` holds simplified Natural Earth admin-1 outlines
(public domain; where they come from and how they were simplified is in the file's ``source`` and
in ``topology/data/make_provinces.py``). Nothing here reaches the network: maps work offline.
Reading the file is :func:`topology.loader.load_provinces`'s job (the only topology module that
does I/O); this module parses.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import Any

DATA = pathlib.Path(__file__).resolve().parent / "data" / "provinces.json"


@dataclass(frozen=True, slots=True)
class Province:
    name: str
    name_local: str
    rings: tuple[tuple[tuple[float, float], ...], ...]
    """Outer rings as (lon, lat) points."""


def parse(doc: dict[str, Any]) -> list[Province]:
    """Every province of a ``cpn.provinces/1`` document, in its order (by English name)."""
    return [
        Province(p["name"], p.get("name_local", ""), tuple(tuple((float(x), float(y)) for x, y in ring) for ring in p["rings"]))
        for p in doc["provinces"]
    ]
