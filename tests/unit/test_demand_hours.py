"""demand_hours: the lending forecast learnt from observed demand by local hour (known answers)."""

from __future__ import annotations

import pytest

from controlplane.core import demand_hours as dh
from controlplane.core import lending

MIDNIGHT = 1795363200.0  # 2026-11-23 00:00 local (UTC+8)
H = 3600.0
DAY = 24 * H
# The declared profile: quiet nights, the morning ramp at 07:00 local.
DECLARED = [0.2] * 7 + [1.0] * 17
# What happens now: the ramp comes an hour earlier, at 06:00.
ACTUAL = [0.2] * 6 + [1.0] * 18


def live_days(d: dh.DemandHours, first_day: int, days: int, shape: list[float], per_hour: float = 1000.0) -> dh.DemandHours:
    """Observe ``days`` days of ``shape`` as the deployments service would: a count every 5 min."""
    for day in range(first_day, first_day + days):
        for h in range(24):
            for k in range(12):
                t = MIDNIGHT + day * DAY + h * H + k * 300.0
                d = dh.observe(d, t, shape[h] * per_hour / 12)
    return d


def reclaim_time(profile: list[float]) -> float:
    """When lending.decide, at 01:00 local, reclaims a site's lent cards (the forecast's ramp less the margin)."""
    now = MIDNIGHT + 10 * DAY + 1 * H
    holdings = [lending.Holding(site="sh-edge", cards={"H20": 32}, held={"H20": 0.5})]
    running = [lending.Attempt(job_id="j1", attempt=1, site="sh-edge", accelerator="H20", cards=24, checkpoint_s=300.0)]
    rules = lending.Rules(profile=DECLARED, site_profiles={"sh-edge": profile}, margin_s=900.0, stop_margin_s=60.0)
    plan = lending.decide(now, holdings, running, rules)
    assert plan.wake is not None  # the stop is planned: checkpoint_s + stop margin before the reclaim
    return plan.wake + 300.0 + 60.0 - (MIDNIGHT + 10 * DAY)


def test_nothing_observed_is_the_declared_profile() -> None:
    assert dh.profile(dh.DemandHours(), DECLARED) == DECLARED
    assert reclaim_time(DECLARED) == pytest.approx(7 * H - 900.0)


def test_a_ramp_an_hour_earlier_is_learnt_after_days_of_it() -> None:
    d = live_days(dh.DemandHours(), 0, 7, DECLARED)  # a week as declared: the learnt ramp is 07:00
    assert reclaim_time(dh.profile(d, DECLARED)) == pytest.approx(7 * H - 900.0)
    # The ramp moves to 06:00. The forecast needs the whole site at the peak, so the ramp is the
    # first hour whose learnt demand exceeds what inference keeps (8 of 32 cards: a quarter of the peak).
    d = live_days(d, 7, 1, ACTUAL)
    # After one day 06:00's mean is half-way (0.6 of the peak): above a quarter, so already learnt.
    p = dh.profile(d, DECLARED)
    assert p[6] == pytest.approx(600.0) and p[5] == pytest.approx(200.0)
    assert reclaim_time(p) == pytest.approx(6 * H - 900.0)


def test_a_small_rise_needs_several_days_and_is_learnt_exactly_in_the_limit() -> None:
    # 06:00 rises from 0.2 to 0.4 of the peak: with weight 1/2 the mean is 0.3, 0.35, 0.375, ...
    shape = [0.2] * 6 + [0.4] + [1.0] * 17
    d = live_days(dh.DemandHours(), 0, 3, DECLARED)
    means = []
    for day in range(3, 8):
        d = live_days(d, day, 1, shape)
        means.append(round(dh.profile(d, DECLARED)[6] / 1000.0, 4))
    assert means == pytest.approx([0.3, 0.35, 0.375, 0.3875, 0.39375], abs=1e-4)


def test_hours_not_observed_take_the_prior_scaled_to_what_was() -> None:
    # Observed from 00:00 to 03:00 only, at 5 x the prior's rate: the other hours are the prior x 5.
    d = dh.DemandHours()
    for k in range(3 * 12 + 1):
        d = dh.observe(d, MIDNIGHT + k * 300.0, 0.0 if k == 36 else 1.0 * 1000.0 / 12)
    assert d.days[:3] == (1, 1, 1) and sum(d.days) == 3
    p = dh.profile(d, DECLARED)
    assert p[:3] == pytest.approx([1000.0] * 3)
    assert p[12] == pytest.approx(5 * 1000.0)


def test_an_hour_without_any_count_in_it_is_not_observed() -> None:
    d = dh.observe(dh.DemandHours(), MIDNIGHT + 0.5 * H, 10.0)
    d = dh.observe(d, MIDNIGHT + 5.5 * H, 10.0)  # a process down from 00:30 to 05:30
    assert d.days == (1,) + (0,) * 23 and d.mean[0] == 10.0
