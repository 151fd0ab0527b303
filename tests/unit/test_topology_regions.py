"""Regions in the layout file: the partition of provinces, gateway and cluster cities, and the errors."""

from __future__ import annotations

import pytest

from tests.unit.test_topology_validation import errors_of, line_of, text
from topology import loader

REGION = """
[regions.east]
name = "East"
cluster = "shanghai"
gateways = ["shanghai"]
provinces = ["shanghai", "zhejiang"]
"""


def test_every_site_gets_the_region_of_its_province() -> None:
    lay = loader.loads(text(REGION), "net.toml")
    assert [r.id for r in lay.regions] == ["east"]
    assert {s.id: lay.region_of_site(s.id) for s in lay.sites} == {"sh-hub": "east", "hz-edge": "east"}
    assert lay.gateways() == ["shanghai"]


def test_no_regions_is_still_a_valid_layout() -> None:
    lay = loader.loads(text(), "net.toml")
    assert lay.regions == [] and lay.gateways() == [] and lay.region_of_site("sh-hub") is None


def test_a_site_in_no_region_names_the_site_line_and_its_province() -> None:
    t = text(REGION.replace('"shanghai", "zhejiang"]', '"shanghai"]'))
    (msg,) = errors_of(t)
    assert msg.startswith(f"net.toml:{line_of(t, '[[sites]]', 2)}: sites[1] 'hz-edge': ")
    assert "province 'zhejiang' is in no region" in msg


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        ('gateways = ["shanghai"]', 'gateways = ["atlantis"]', "gateway city 'atlantis' is not an origin id"),
        ('cluster = "shanghai"', 'cluster = "atlantis"', "cluster city 'atlantis' is not an origin id"),
        ('cluster = "shanghai"', 'cluster = "hangzhou"', "cluster city 'hangzhou' hosts no hub or regional pool"),
        ('"shanghai", "zhejiang"]', '"shanghai", "zhejiang", "mars"]', "province 'mars' is the region of no origin"),
        ('gateways = ["shanghai"]', "gateways = []", "gateways is empty"),
        ('name = "East"', 'name = "East"\ncolour = "red"', "colour"),
    ],
)
def test_a_bad_region_names_its_table_line(old: str, new: str, reason: str) -> None:
    t = text(REGION.replace(old, new))
    msgs = errors_of(t)
    assert any(m.startswith(f"net.toml:{line_of(t, '[regions.east]')}: regions.east: ") and reason in m for m in msgs), msgs


def test_a_province_in_two_regions_is_refused() -> None:
    t = text(REGION + REGION.replace("[regions.east]", "[regions.west]"))
    msgs = errors_of(t)
    assert any(m.startswith(f"net.toml:{line_of(t, '[regions.west]')}: regions.west: ")
               and "province 'shanghai' is already in region 'east'" in m for m in msgs), msgs


def test_a_gateway_outside_the_regions_provinces_is_refused() -> None:
    t = text(REGION.replace('"shanghai", "zhejiang"]', '"shanghai"]') + REGION.replace("[regions.east]", "[regions.zj]")
             .replace('"shanghai", "zhejiang"]', '"zhejiang"]').replace('cluster = "shanghai"', 'cluster = "hangzhou"'))
    msgs = errors_of(t)
    assert any("regions.zj" in m and "gateway city 'shanghai' is in province 'shanghai'" in m for m in msgs), msgs


def test_shipped_layouts_partition_every_site() -> None:
    for name in ("demo-3", "national"):
        lay = loader.load(loader.data_path(name))
        assert lay.regions, name
        assert all(lay.region_of_site(s.id) is not None for s in lay.sites), name
        provinces = [p for r in lay.regions for p in r.provinces]
        assert len(provinces) == len(set(provinces))
    national = loader.load_default()
    assert [r.id for r in national.regions] == ["north", "east", "central", "south", "southwest", "northwest"]
    assert national.region_of_site("bj-hub") == "north" and national.region_of_site("gz-hub") == "south"
