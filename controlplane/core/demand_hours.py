"""Demand by local hour, learnt from what was observed: the forecast tidal lending reclaims by. Pure.

What it holds: :class:`DemandHours`, one area's (a site's, a region's, the network's) requests per
local hour as an exponentially weighted mean over past days, and the hour being counted now;
:func:`observe` folds request counts in (``now`` passed in), :func:`profile` gives the 24-value
hour-of-day profile ``lending.Rules`` forecasts with.

Rule 1: counts are added to the hour they were counted in (China local time, as tariffs); when an
hour ends, its total updates that hour's mean: the first day's count as it is, later days with
``weight`` (``mean += weight × (count − mean)``). An hour nobody counted in (a gap longer than an
hour between two observations) is not observed, so a process that was down learns nothing false.
Rule 2: the declared profile is the cold-start prior: an hour not observed yet takes the prior's
value scaled to the observed ones (Σ observed means ÷ Σ the prior's same hours); with nothing
observed the profile is the prior itself.
Rule 3: only the shape matters to the forecast (``lending.forecast`` scales the peak to the
cards), so the units of the counts are free (requests, or requests × service time).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec

LOCAL_OFFSET_S = 8 * 3600
"""Hours are China local time (UTC+8), as tariffs and the lending forecast."""
WEIGHT = 0.5
"""Weight of the newest day in an hour's mean: a changed hour is half learnt after one day, 7/8
after three."""


class DemandHours(msgspec.Struct, frozen=True, kw_only=True):
    mean: tuple[float, ...] = (0.0,) * 24
    """Requests in each local hour 0..23, exponentially weighted over the days observed."""
    days: tuple[int, ...] = (0,) * 24
    """Days each hour was observed."""
    hour_start: float | None = None
    """Start (epoch s) of the hour being counted; None before the first observation."""
    count: float = 0.0
    """Requests counted so far in that hour."""


def local_hour(t: float) -> int:
    return int(((t + LOCAL_OFFSET_S) // 3600) % 24)


def _fold(d: DemandHours, weight: float) -> DemandHours:
    """The hour being counted ends: its count updates that hour's mean (Rule 1)."""
    assert d.hour_start is not None
    h = local_hour(d.hour_start)
    mean, days = list(d.mean), list(d.days)
    mean[h] = d.count if days[h] == 0 else mean[h] + weight * (d.count - mean[h])
    days[h] += 1
    return DemandHours(mean=tuple(mean), days=tuple(days), hour_start=d.hour_start, count=0.0)


def observe(d: DemandHours, now: float, requests: float, *, weight: float = WEIGHT) -> DemandHours:
    """Add ``requests`` counted up to ``now``; the hour(s) that ended before ``now`` are folded in.

    The counts of one call are put in the hour of ``now``: call at least every few minutes (the
    deployments service drains every 5 s, the simulator at each hour's end), so little spills
    across a boundary. An hour with no call in it is not observed."""
    top = math.floor(now / 3600.0) * 3600.0
    if d.hour_start is None:
        return DemandHours(mean=d.mean, days=d.days, hour_start=top, count=requests)
    if top <= d.hour_start:
        return msgspec.structs.replace(d, count=d.count + requests)
    d = _fold(d, weight)  # hours between the two calls had no call in them: not observed (Rule 1)
    return DemandHours(mean=d.mean, days=d.days, hour_start=top, count=requests)


def profile(d: DemandHours, prior: Sequence[float]) -> list[float]:
    """The hour-of-day profile to forecast with (Rule 2): observed means, the prior elsewhere."""
    seen = [h for h in range(24) if d.days[h] > 0]
    if len(prior) != 24:
        return [d.mean[h] if d.days[h] else 0.0 for h in range(24)]
    if not seen:
        return list(prior)
    p_seen = sum(prior[h] for h in seen)
    scale = sum(d.mean[h] for h in seen) / p_seen if p_seen > 0 else 1.0
    return [d.mean[h] if d.days[h] else prior[h] * scale for h in range(24)]
