"""The shipped layouts and the schema helpers: structure, sources, tariffs, CIDRs, coverage facts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from topology import coverage, latency, layout, loader


@pytest.fixture(scope="module")
def national() -> layout.Layout:
    return loader.load_default()


@pytest.fixture(scope="module")
def index(national: layout.Layout) -> latency.RttIndex:
    return latency.RttIndex.build(national)


def test_national_follows_the_published_structure(national: layout.Layout) -> None:
    hubs = {s.city for s in national.sites if s.tier == "hub"}
    assert {"beijing", "shanghai", "guangzhou", "zhongwei"} <= hubs  # ten-thousand-card pools
    assert {"hohhot", "guiyang", "qingyang", "chengdu", "chongqing"} <= hubs  # western hubs, Chengdu-Chongqing
    assert all(s.cards >= 10_000 for s in national.sites if s.tier == "hub")
    operator_regional = [s for s in national.sites if s.tier == "regional" and s.provider == "cpn-operator"]
    assert len({s.region for s in operator_regional}) == 7
    assert {"zhejiang", "jiangsu"} <= {s.region for s in operator_regional}
    assert all(500 <= s.cards <= 2000 for s in national.sites if s.tier == "regional")
    edges = [s for s in national.sites if s.tier == "edge"]
    assert len({s.city for s in edges}) >= 30
    assert all(16 <= s.cards <= 64 for s in edges)
    assert len(national.origins) >= 60
    third = {s.provider for s in national.sites} - {"cpn-operator"}
    assert len(third) >= 2
    for p in third:
        vendors = {national.accelerators[a].vendor for s in national.sites if s.provider == p for a in s.accelerators}
        assert {"nvidia", "huawei"} <= vendors, p


def test_national_figures_carry_sources(national: layout.Layout) -> None:
    assert national.accelerators["A800"].units == 1.0
    for spec in national.accelerators.values():
        assert spec.source, spec.name
    for s in national.sites:
        assert s.tariff.source, s.id
        assert s.tariff.peak_cny_per_kwh / s.tariff.valley_cny_per_kwh >= 3 - 1e-9  # NDRC ToU rule
        assert "failure_rate_per_card_hour" in s.sources, s.id
    zw = national.site("nx-hub")
    assert zw.tariff.flat_cny_per_kwh == 0.36 and zw.pue == 1.1
    assert national.illustrative and {"fibre", "tariffs", "failure_rate"} <= set(national.sources)
    # Llama 3: 419 / (16,384 x 54 x 24) per card-hour
    assert national.site("bj-hub").failure_rate_per_card_hour == pytest.approx(419 / (16_384 * 54 * 24), rel=0.02)


def test_every_edge_city_is_within_5ms_of_its_own_pool(national: layout.Layout, index: latency.RttIndex) -> None:
    metro_rtt = 2 * (national.metro_km * layout.FIBRE_MS_PER_KM + national.hop_ms)
    for s in national.sites:
        if s.tier == "edge":
            assert index.rtt_ms(s.city, s.id) == pytest.approx(metro_rtt), s.id
            assert 0 < metro_rtt < 1.0


def test_rtt_respects_known_floors(index: latency.RttIndex) -> None:
    # REFERENCE: Beijing-Shanghai cannot fit 10 ms even on straight fibre (floor 10.5 ms)
    assert index.rtt_ms("beijing", "sh-hub") >= 10.5
    assert index.rtt_ms("shanghai", "bj-edge") >= 10.5
    assert index.rtt_ms("beijing", "gz-hub") >= 18.5


def test_coverage_figures_are_what_the_data_implies(national: layout.Layout, index: latency.RttIndex) -> None:
    report = coverage.analyse(national, index, 5.0)
    total = sum(o.weight for o in national.origins)
    cities = {
        o.id: {national.site(s).city for s, r in index.ranked(o.id) if r <= 5.0} for o in national.origins
    }
    five = report.at(5.0)
    assert five.share_1_city == round(sum(o.weight for o in national.origins if cities[o.id]) / total, 4)
    assert five.share_2_cities == round(sum(o.weight for o in national.origins if len(cities[o.id]) >= 2) / total, 4)
    assert {u.id for u in report.uncovered} == {o for o, c in cities.items() if not c}
    # the big Yangtze-delta and Pearl-river centres have two or more cities within 5 ms
    by_id = {c.id: c for c in report.origins}
    assert {"shanghai", "suzhou", "hangzhou"} <= set(by_id["shanghai"].cities)
    assert len(by_id["guangzhou"].cities) >= 2 and len(by_id["shenzhen"].cities) >= 2
    # honest holes: the far west and far north have nothing within 5 ms, Lhasa not even within 10
    assert {"kashgar", "lhasa", "hulunbuir"} <= {u.id for u in report.uncovered}
    assert "lhasa" in {c.id for c in report.origins if c.nearest and c.nearest.rtt_ms > 10}
    ten = report.at(10.0)
    assert ten.share_1_city >= five.share_1_city and ten.share_2_cities >= five.share_2_cities
    assert 0.5 < five.share_2_cities < ten.share_2_cities < 1.0


def test_coverage_rejects_bad_arguments(national: layout.Layout, index: latency.RttIndex) -> None:
    with pytest.raises(ValueError, match="budget_ms"):
        coverage.analyse(national, index, 0)
    with pytest.raises(ValueError, match="tiers"):
        coverage.analyse(national, index, 5, tiers=["moon"])
    edge_only = coverage.analyse(national, index, 5, tiers=["edge"])
    assert all(s.tier == "edge" for c in edge_only.origins for s in c.sites)


def test_tariff_time_of_use() -> None:
    t = layout.Tariff(flat_cny_per_kwh=0.6, peak_cny_per_kwh=0.9, valley_cny_per_kwh=0.3, peak_hours=[9], valley_hours=[2])
    assert [t.price_at_hour(h) for h in (9, 2, 12)] == [0.9, 0.3, 0.6]
    assert layout.local_hour(0) == 8  # 1970-01-01 00:00 UTC is 08:00 in China
    assert t.price_at(3600.0) == 0.9  # 09:00 local
    assert t.price_at(17 * 3600.0) == 0.6  # 17:00 UTC is 01:00 local: flat
    assert t.price_at(18 * 3600.0) == 0.3  # 02:00 local: valley
    assert t.mean_cny_per_kwh() == pytest.approx((0.9 + 0.3 + 22 * 0.6) / 24)


def test_cidr_lookup_longest_prefix(national: layout.Layout) -> None:
    assert national.origin_for_ip("203.0.113.9") == "shanghai"
    assert national.origin_for_ip("192.0.2.200") == "shenzhen"
    assert national.origin_for_ip("192.0.2.5") == "guangzhou"
    assert national.origin_for_ip("2001:db8:1::7") == "hangzhou"
    assert national.origin_for_ip("8.8.8.8") is None
    assert national.origin_for_ip("not-an-ip") is None


def test_lookups(national: layout.Layout) -> None:
    assert national.site("sh-hub").city == "shanghai"
    assert national.origin("shanghai").weight > 20
    with pytest.raises(KeyError):
        national.site("nope")
    assert national.cards_by_accelerator()["910B"] > 50_000


def test_great_circle_reference_points() -> None:
    # REFERENCE floors: Beijing-Shanghai 10.5 ms, Guangzhou-Gui'an 7.6 ms
    assert layout.rtt_floor_ms(layout.great_circle_km(39.90, 116.41, 31.23, 121.47)) == pytest.approx(10.5, abs=0.15)
    assert layout.great_circle_km(0, 0, 0, 1) == pytest.approx(111.2, abs=0.1)


def test_topology_stays_pure() -> None:
    forbidden = re.compile(r"^\s*(import|from)\s+(asyncio|aiohttp|nats|sqlite_utils|sqlite3|time|random|controlplane|edge_agent)\b", re.M)
    pkg = Path(layout.__file__).parent
    hits = [f"{p.name}: {m.group(0).strip()}" for p in pkg.glob("*.py") for m in forbidden.finditer(p.read_text())]
    assert hits == []
    io = re.compile(r"\b(open\(|read_text|write_text|tomllib)")
    assert [p.name for p in pkg.glob("*.py") if io.search(p.read_text())] == ["loader.py"]
