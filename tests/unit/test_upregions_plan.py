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


class _Rtt:
    def __init__(self, ranked: list[tuple[str, float]]) -> None:
        self._ranked = ranked

    def ranked(self, origin: str) -> list[tuple[str, float]]:
        return self._ranked


class _Inference:
    """A gateway's inference as readiness sees it: the router's ranking from its city, and decide()."""

    def __init__(self, ranked: list[tuple[str, float]], serves: bool) -> None:
        from types import SimpleNamespace

        self.router = SimpleNamespace(rtt=_Rtt(ranked))
        self.serves = serves
        self.asked = 0

    def decide(self, origin: str, model: str, budget_ms: float, policy: str) -> object:
        from types import SimpleNamespace

        from controlplane.core.errors import NoCapacity

        self.asked += 1
        if not self.serves:
            raise NoCapacity("no ready replica yet")
        return SimpleNamespace(site="home-site")


Ranked = list[tuple[str, float]]


def _network(tmp_path: Path,
             regions: dict[str, tuple[Ranked, bool, tuple[str, ...]]]) -> tuple[object, dict[str, _Inference]]:
    from types import SimpleNamespace

    from controlplane.tools.up import UpOptions
    from controlplane.tools.upregions import RegionalNetwork, RegionPlan, RegionRun

    net = RegionalNetwork(UpOptions(data_dir=tmp_path, ready_timeout_s=0.3))
    inference = {}
    for rid, (ranked, serves, sites) in regions.items():
        run = RegionRun(RegionPlan(id=rid, gateway_city=f"{rid}-city", sites=sites, nodes=()))
        inference[rid] = _Inference(ranked, serves)
        hub = SimpleNamespace(config=SimpleNamespace(default_budget_ms=10.0), inference=inference[rid])
        run.gateway = SimpleNamespace(hub=hub)  # type: ignore[assignment]
        net.regions.append(run)
    return net, inference


@pytest.mark.timeout(30)
async def test_readiness_gives_up_per_region_and_names_why(tmp_path: Path) -> None:
    """`cpn up --regions` waits for each region's gateway to serve its own city within the strict
    budget: never forever (it hung on the national layout's north-west), each region on its own."""
    import time

    net, inference = _network(tmp_path, {
        # no site of the run within 10 ms at all: not waited for
        "far": ([("far-site", 16.3), ("home-site", 25.0)], False, ("far-site",)),
        # a site within budget that never gets a replica: given up after ready_timeout_s
        "stuck": ([("stuck-site", 2.0)], False, ("stuck-site",)),
        # its own site is out of budget, another region's within it serves: not named
        "lent": ([("home-site", 4.0), ("lent-site", 12.0)], True, ("lent-site",)),
        "home": ([("home-site", 0.5)], True, ("home-site",)),
    })
    started = time.monotonic()
    await net._wait_demo_served()  # type: ignore[attr-defined]
    assert time.monotonic() - started < 5  # the regions are waited for together, each up to 0.3 s
    named = net.not_served  # type: ignore[attr-defined]
    assert set(named) == {"far", "stuck"}, named
    assert named["far"] == "no in-region site within 10 ms of its gateway city far-city (nearest: far-site at 16.3 ms)"
    assert inference["far"].asked == 0
    assert named["stuck"].startswith("the demo model not served within 10 ms of stuck-city after 0.3 s: ")
    assert inference["stuck"].asked > 1
    assert inference["lent"].asked == 1 and inference["home"].asked == 1
