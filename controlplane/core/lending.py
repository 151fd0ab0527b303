"""Tidal lending: inference cards idle through the night offered to training, reclaimed before the
morning ramp. Pure (``now`` is an argument; no clock, no I/O).

What it holds: a site's inference capacity and its forecast need (:class:`Site`), the offers of
idle cards with a reclaim time (:class:`Offer`, from :func:`offers`) and the stops of lent attempts
(:class:`Stop`, from :func:`reclaims`).

Rule 1: a site lends only cards inference does not hold now *and* will not need before the offer
ends: the offer lasts until the first hour whose forecast need exceeds what stays with inference,
minus ``margin_s`` (the reclaim time).
Rule 2: an offer shorter than ``min_lend_s`` is not made (a gang would spend it starting up).
Rule 3: a lent attempt is told to checkpoint and stop at ``reclaim_at − checkpoint_s − margin``,
so its checkpoint is written and its cards are free before inference needs them; the stop says
where the job should restart (``restart_hint``: the caller's choice, planned in advance).
Rule 4: a site whose forecast never falls below its held capacity lends nothing, and says why.
Rule 5: a site (accelerator) whose lent attempts are being stopped offers nothing meanwhile.
Rule 6: a site's cards of the types inference keeps first (``Rules.inference_first``, e.g. the
inference-only H20 beside lendable L20) meet its forecast before its other cards do; those are
never offered, and the others keep only the rest (at night often none but what replicas hold).

Wired: :func:`decide` is the rule the hub's training service runs before each scheduler plan
(``[lending]`` in the hub config; lent pools show only the offered cards) and ``cpn sim``'s
tidal-lending scenario runs for every training policy (``tools/sim/core_lending.py``).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

import msgspec

from controlplane.core import placement

LOCAL_OFFSET_S = 8 * 3600
"""Forecast hours are China local time (UTC+8), as tariffs."""


class Site(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    cards: Mapping[str, int]
    """All cards by accelerator type."""
    held: Mapping[str, float] = {}
    """Cards inference replicas hold now, by type."""
    lent: Mapping[str, int] = {}
    """Cards already lent to training, by type."""
    need_by_hour: Sequence[float] = ()
    """Forecast cards inference needs in each local hour 0..23 (24 values; empty: lend nothing)."""


class Offer(msgspec.Struct, frozen=True):
    site: str
    accelerator: str
    cards: int
    until: float
    """Reclaim time (epoch s): lent attempts must be stopped with their checkpoint written by then."""
    reason: str


class Lent(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str
    attempt: int
    site: str
    cards: int
    checkpoint_s: float
    reclaim_at: float


class Stop(msgspec.Struct, frozen=True):
    job_id: str
    attempt: int
    """The fencing token: a stop for an older attempt is ignored."""
    at: float
    reason: str
    restart_hint: str = ""


def _local_hour(t: float) -> int:
    return int(((t + LOCAL_OFFSET_S) // 3600) % 24)


def ramp_at(now: float, site: Site, keep: float, horizon_h: int = 24) -> float | None:
    """First hour boundary (epoch s) from ``now`` whose forecast need exceeds ``keep`` cards; the
    current hour counts from ``now``. None: no such hour within ``horizon_h``."""
    if len(site.need_by_hour) != 24:
        return now
    t = now
    for _ in range(horizon_h + 1):
        if site.need_by_hour[_local_hour(t)] > keep + 1e-9:
            return t
        t = (math.floor(t / 3600.0) + 1) * 3600.0
    return None


def _lasts(now: float, site: Site, keep: float, margin_s: float, horizon_h: int) -> tuple[float, float | None]:
    """(until, ramp) of an offer that leaves ``keep`` cards with inference."""
    ramp = ramp_at(now, site, keep, horizon_h)
    return (now + horizon_h * 3600.0 if ramp is None else ramp - margin_s), ramp


def offers(now: float, sites: Sequence[Site], *, margin_s: float = 900.0, min_lend_s: float = 3600.0,
           horizon_h: int = 24) -> tuple[list[Offer], list[str]]:
    """Idle inference cards to offer to queued training gangs now (Rules 1, 2, 4).

    A site offers the most idle cards it can keep lent for at least ``min_lend_s`` (lending fewer
    leaves more with inference, so the ramp comes later): all of them at night, at most those the
    forecast never needs by day.

    Returns:
        (offers, notes): notes say why a site lends nothing.
    """
    out: list[Offer] = []
    notes: list[str] = []
    for site in sites:
        total = sum(site.cards.values())
        held = sum(site.held.values())
        lent = sum(site.lent.values())
        idle = {a: int(math.floor(n - site.held.get(a, 0.0) - site.lent.get(a, 0) + 1e-9)) for a, n in site.cards.items()}
        spare = sum(idle.values())
        if spare <= 0:
            notes.append(f"{site.id}: no idle cards (held {held:g}, lent {lent} of {total})")
            continue
        # Keep back what inference will need: lend only so much that held + lent + offered stays
        # within the cards until the ramp; the fewer lent, the later the ramp.
        n = spare
        until, ramp = _lasts(now, site, total - lent - n, margin_s, horizon_h)
        first = (until, ramp)
        while until - now < min_lend_s and n > 1:
            n -= 1
            until, ramp = _lasts(now, site, total - lent - n, margin_s, horizon_h)
        if until - now < min_lend_s:
            until, ramp = first
            when = "now" if ramp is not None and ramp <= now else f"in {(ramp - now) / 60:.0f} min" if ramp else ""
            notes.append(f"{site.id}: inference needs its cards {when}; an offer would last "
                         f"{max(0.0, until - now) / 60:.0f} min (< {min_lend_s / 60:.0f})")
            continue
        for acc in sorted(idle):
            take = min(idle[acc], n)
            if take > 0:
                n -= take
                why = (f"{take} idle {acc} at {site.id} until the forecast ramp"
                       + (f" at local hour {_local_hour(ramp)}" if ramp is not None else " (none within the horizon)")
                       + f", reclaimed {margin_s / 60:.0f} min before")
                out.append(Offer(site.id, acc, take, until, why))
    return out, notes


def reclaim_at(now: float, site: Site, *, margin_s: float = 900.0, horizon_h: int = 24) -> float | None:
    """When the cards ``site`` has lent (``site.lent``) must be back with inference: ``margin_s``
    before the first hour whose forecast need exceeds what inference keeps while they are lent.
    None: not within ``horizon_h``, or nothing lent."""
    total = sum(site.cards.values())
    lent = sum(site.lent.values())
    if lent <= 0:
        return None
    ramp = ramp_at(now, site, total - lent, horizon_h)
    return None if ramp is None else ramp - margin_s


def profile_need(profile: Sequence[float], cards: float, peak_share: float = 1.0) -> list[float]:
    """A forecast from a declared hour-of-day demand profile (24 relative rates, local hours): the
    peak hour needs ``peak_share`` of ``cards``, other hours in proportion."""
    top = max(profile, default=0.0)
    if len(profile) != 24 or top <= 0:
        return []
    return [cards * peak_share * p / top for p in profile]


def forecast(now: float, profile: Sequence[float], cards: float, held: float, *, peak_share: float = 1.0,
             headroom: float = 1.5) -> list[float]:
    """Cards inference needs at a site (or of one accelerator there) by local hour: the larger of
    :func:`profile_need` and what its replicas hold now grown along the profile (hour ``h`` needs
    ``held × max(p[h], p[h+1]) / p[now] × headroom``: demand rises through the hour towards the
    next), never more than ``cards`` and never less than ``held`` in the current hour."""
    top = max(profile, default=0.0)
    if len(profile) != 24 or top <= 0:
        return []
    k = cards * peak_share / top
    h_now = _local_hour(now)
    p_now = profile[h_now]
    if p_now <= 0:  # nothing to grow along: what is held stays needed
        return [min(cards, max(k * p, held)) for p in profile]
    g = held * headroom / p_now
    nxt = list(profile[1:]) + [profile[0]]
    out = [min(cards, max(k * p, g * (p if p > q else q))) for p, q in zip(profile, nxt)]
    if out[h_now] < held:
        out[h_now] = min(cards, held)
    return out


def reclaims(now: float, lent: Sequence[Lent], *, margin_s: float = 60.0,
             restart_hint: Mapping[str, str] | None = None) -> tuple[list[Stop], float | None]:
    """Stops due now for lent attempts (Rule 3), and the next time one falls due (to wake up)."""
    stops: list[Stop] = []
    nxt: float | None = None
    for a in lent:
        at = a.reclaim_at - a.checkpoint_s - margin_s
        if at <= now:
            why = (f"lent cards at {a.site} are needed by inference now (the forecast rose): checkpoint and stop "
                   f"at once" if a.reclaim_at < now else
                   f"lent cards at {a.site} are reclaimed at {a.reclaim_at:.0f}: checkpoint ({a.checkpoint_s:.0f} s) "
                   f"and stop now")
            stops.append(Stop(a.job_id, a.attempt, now, why, (restart_hint or {}).get(a.job_id, "")))
        elif nxt is None or at < nxt:
            nxt = at
    return stops, nxt


# --------------------------------------------------------------------------- the scheduler rule


class Rules(msgspec.Struct, frozen=True, kw_only=True):
    """How lending decides (the hub's ``[lending]`` config and ``cpn sim``'s ``[lending]``)."""

    tiers: Sequence[str] = ("edge",)
    profile: Sequence[float] = ()
    """The declared demand profile by local hour (24 relative rates)."""
    site_profiles: Mapping[str, Sequence[float]] = {}
    """Per site, a profile to use instead of ``profile``: learnt from observed demand
    (``demand_hours.profile``, with ``profile`` as its cold-start prior)."""
    peak_need_share: float = 1.0
    headroom: float = 1.5
    margin_s: float = 900.0
    min_lend_s: float = 3600.0
    stop_margin_s: float = 60.0
    reclaim_headroom: float = 1.0
    """Hysteresis: cards already lent are reclaimed when the forecast with this headroom (not
    ``headroom``) needs them, so a replica added at the site does not stop a gang at once."""
    inference_first: Sequence[str] = ()
    """Accelerator types inference keeps first (Rule 6): a site's forecast need is met with its
    cards of these types before any other, and they are never offered. Empty: each type of a site
    keeps the whole forecast in proportion to its cards."""


class Holding(msgspec.Struct, frozen=True, kw_only=True):
    """A site of a lending tier: its cards and what inference replicas hold there now."""

    site: str
    cards: Mapping[str, int]
    held: Mapping[str, float] = {}


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    """A training attempt running on a site of a lending tier (on lent cards)."""

    job_id: str
    attempt: int
    site: str
    accelerator: str
    cards: int
    checkpoint_s: float


class LendPlan(msgspec.Struct, frozen=True, kw_only=True):
    offers: list[Offer]
    """What new gangs may take at each lending site, by accelerator (none listed: nothing)."""
    stops: list[Stop]
    """Lent attempts to checkpoint and stop now."""
    wake: float | None
    """When the next stop falls due (decide again by then)."""
    notes: list[str]


def _views(now: float, holdings: Sequence[Holding], lent: Mapping[tuple[str, str], int], rules: Rules,
           headroom: float | None = None) -> list[Site]:
    """One :class:`Site` per (site, accelerator): replicas are pinned to an accelerator.

    Rule 6: at a site holding types of ``rules.inference_first`` and others, the site's forecast
    (all its cards, all its replicas) is met first by the cards of those types; the others need only
    the rest, in proportion to their cards (never less than their replicas hold), and those types
    need all their cards (never offered)."""
    out = []
    first = set(rules.inference_first)
    for h in holdings:
        profile = rules.site_profiles.get(h.site, rules.profile)
        hr = rules.headroom if headroom is None else headroom
        room = sum(n for acc, n in h.cards.items() if acc in first)
        others = sum(n for acc, n in h.cards.items() if acc not in first)
        rest: list[float] | None = None
        if room > 0 and others > 0:
            need = forecast(now, profile, float(room + others), sum(h.held.values()),
                            peak_share=rules.peak_need_share, headroom=hr)
            rest = [max(0.0, x - room) for x in need] if need else []
        for acc, n in sorted(h.cards.items()):
            held = h.held.get(acc, 0.0)
            if acc in first:
                by_hour = [float(n)] * 24
            elif rest is None:
                by_hour = forecast(now, profile, float(n), held, peak_share=rules.peak_need_share, headroom=hr)
            else:
                by_hour = [min(float(n), max(held, x * n / others)) for x in rest]
            out.append(Site(id=h.site, cards={acc: n}, held={acc: held}, lent={acc: lent.get((h.site, acc), 0)},
                            need_by_hour=by_hour))
    return out


def _lent(running: Sequence[Attempt], gone: set[tuple[str, int]] = set()) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for a in running:
        if (a.job_id, a.attempt) not in gone:
            out[(a.site, a.accelerator)] = out.get((a.site, a.accelerator), 0) + a.cards
    return out


def decide(now: float, holdings: Sequence[Holding], running: Sequence[Attempt], rules: Rules) -> LendPlan:
    """Tidal lending at ``now``: which lent attempts checkpoint and stop (Rule 3; the reclaim time
    of a site's lent cards is :func:`reclaim_at` under the forecast), then what idle cards are
    offered (Rules 1, 2, 4); a site stopping lent attempts offers nothing (Rule 5). ``running``
    lists every attempt on lent cards, those already told to stop included (their cards are not
    back until they exit); the caller sends each stop once.

    The forecast per (site, accelerator) is :func:`forecast` from the site's learnt profile
    (``rules.site_profiles``) or else the declared ``rules.profile``.
    """
    views = _views(now, holdings, _lent(running), rules, max(1.0, min(rules.reclaim_headroom, rules.headroom)))
    due = {(v.id, next(iter(v.cards))): reclaim_at(now, v, margin_s=rules.margin_s) for v in views}
    lent = [Lent(job_id=a.job_id, attempt=a.attempt, site=a.site, cards=a.cards, checkpoint_s=a.checkpoint_s,
                 reclaim_at=at if (at := due.get((a.site, a.accelerator))) is not None else now + 86400.0)
            for a in running]
    stops, wake = reclaims(now, lent, margin_s=rules.stop_margin_s)
    # Rule 5: a site (accelerator) reclaiming lends nothing this round: its ramp is near, and the
    # stopping gangs' cards are not free until they exit.
    reclaiming = {(a.site, a.accelerator) for a in running for st in stops
                  if (st.job_id, st.attempt) == (a.job_id, a.attempt)}
    views = [v for v in _views(now, holdings, _lent(running), rules) if (v.id, next(iter(v.cards))) not in reclaiming]
    offered, notes = offers(now, views, margin_s=rules.margin_s, min_lend_s=rules.min_lend_s)
    notes += [f"{site}: reclaiming its lent {acc} cards, lends none" for site, acc in sorted(reclaiming)]
    return LendPlan(offers=offered, stops=stops, wake=wake, notes=notes)


def offered_by_site(plan: LendPlan) -> dict[str, dict[str, int]]:
    """``plan.offers`` as ``{site: {accelerator: cards}}``."""
    out: dict[str, dict[str, int]] = {}
    for o in plan.offers:
        out.setdefault(o.site, {})[o.accelerator] = o.cards
    return out


def until_by_site(plan: LendPlan) -> dict[str, float]:
    """The earliest reclaim time of each site's offers."""
    out: dict[str, float] = {}
    for o in plan.offers:
        out[o.site] = min(out.get(o.site, o.until), o.until)
    return out


def lend_pools(pools: Sequence[placement.Pool], plan: LendPlan, lending_sites: Collection[str]) -> list[placement.Pool]:
    """The scheduler's pools with lending applied: a site of a lending tier shows free only the
    cards offered now (none without an offer), so a gang is placed on lent cards only while an
    offer lasts at least ``min_lend_s``; other pools are unchanged."""
    offered = offered_by_site(plan)
    out = []
    for p in pools:
        if p.id not in lending_sites:
            out.append(p)
            continue
        cap = offered.get(p.id, {})
        out.append(msgspec.structs.replace(p, cards_free={a: min(n, cap.get(a, 0)) for a, n in p.cards_free.items()}))
    return out
