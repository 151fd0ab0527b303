"""``plan_regions``: which sites each region of ``cpn up --regions`` / ``cpn bench regions`` runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.tools.upregions import plan_regions
from topology import layout as topo_layout
from topology import loader


def test_max_sites_keeps_the_sites_nearest_each_gateway_city(tmp_path: Path) -> None:
    layout = loader.load_default()
    full = plan_regions(layout, 3, tmp_path, fold=False)
    kept = plan_regions(layout, 3, tmp_path, fold=False, max_sites=2)
    for whole, few in zip(full, kept):
        assert len(few.sites) == 2 and set(few.sites) <= set(whole.sites)
        city = layout.origin(few.gateway_city)

        def km(site: str, city: topo_layout.Origin = city) -> float:
            s = layout.site(site)
            return topo_layout.great_circle_km(city.lat, city.lon, s.lat, s.lon)

        farthest_kept = max(km(s) for s in few.sites)
        assert all(km(s) >= farthest_kept for s in set(whole.sites) - set(few.sites)), few.id
    assert sum(len(p.sites) for p in full) > 6  # there was something to leave out


def test_max_sites_below_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_sites: 0: at least 1"):
        plan_regions(loader.load_default(), 2, tmp_path, max_sites=0)
