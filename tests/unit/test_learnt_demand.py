"""The live lending forecast: the autoscaler's demand drains, learnt per region by local hour."""

from __future__ import annotations

from controlplane.services.demand_share import LearntDemand

MIDNIGHT = 1795363200.0  # 2026-11-23 00:00 local (UTC+8)
H = 3600.0
DECLARED = [0.2] * 7 + [1.0] * 17


class Clock:
    def __init__(self) -> None:
        self.t = MIDNIGHT

    def time(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return self.t


def test_drains_are_learnt_per_region_and_give_each_lending_site_its_regions_profile() -> None:
    clock = Clock()
    origins = {"shanghai": "east", "hangzhou": "east", "chengdu": "west"}
    sites = {"sh-edge": "east", "cd-edge": "west", "nowhere": None}
    learnt = LearntDemand(region_of_origin=origins.get, region_of_site=sites.get, clock=clock)
    counts: dict[tuple[str, str, str, float], int] = {}
    drain = learnt.tap(lambda: dict(counts))
    # Two days: the east's demand ramps at 06:00 (an hour before the declared 07:00); the west is quiet.
    for day in range(2):
        for h in range(24):
            for k in range(12):  # a drain every 5 minutes
                clock.t = MIDNIGHT + day * 24 * H + h * H + k * 300.0
                counts.clear()
                counts[("acme", "m", "shanghai", 10.0)] = 60 if h >= 6 else 12
                counts[("acme", "m", "hangzhou", 10.0)] = 40 if h >= 6 else 8
                counts[("acme", "m", "chengdu", 10.0)] = 0
                counts[("acme", "m", "atlantis", 10.0)] = 5  # an origin of no region: not learnt
                assert drain() == counts  # the autoscaler gets the counts unchanged
    profiles = learnt.site_profiles(["sh-edge", "cd-edge", "nowhere"], DECLARED)
    assert set(profiles) == {"sh-edge"}  # the west counted nothing: declared profile (no entry)
    east = profiles["sh-edge"]
    assert east[5] == 12 * 20 and east[6] == 12 * 100  # requests in the hour, both origins
    assert east[6] / max(east) == 1.0 and DECLARED[6] / max(DECLARED) == 0.2
