"""Tidal lending on the simulated clock: ``core/lending.py``'s rule run for each training policy. Pure.

Every ``lending.tick_s`` (and whenever a reclaim falls due) the :class:`Lender` builds a
``lending.Site`` per lent site (its cards by accelerator, what inference replicas hold there now,
what training holds there, the forecast need by local hour), and

- offers the idle cards that will not be needed (``lending.offers``): the training simulation's
  lent pool shows only the offered cards free, and takes no new gangs without an offer;
- stops lent attempts before their site's reclaim time (``lending.reclaim_at`` +
  ``lending.reclaims``: checkpoint first, then the cards are back); the job requeues and its
  restart is planned by the scheduler like any stopped attempt.

The forecast (``lending.forecast``, per site and accelerator, as replicas are pinned to one) is an
hour-of-day profile: with ``lending.forecast = "learnt"`` (the default) each site's is its region's
requests by local hour as observed so far (``demand_hours.observe`` at every decision,
``demand_hours.profile`` with the declared ``inference.profile`` as the prior for hours not observed
yet); with ``"declared"`` the declared profile alone. The peak hour needs ``peak_need_share`` of the
cards, and what replicas hold now grows along the profile with ``headroom``. The same rule, with the same inputs, runs live in the
training service (docs/training.md, "Tidal lending").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import msgspec

from controlplane.core import demand_hours, lending
from controlplane.tools.sim.core_scenario import Scenario
from controlplane.tools.sim.core_training import TrainingSim
from topology import layout as tlayout

STOP_MARGIN_S = 60.0
"""A lent attempt is told to stop this long before its checkpoint must be written (lending.reclaims)."""


class Lender:
    """Offers and reclaims for every training policy's simulation over one run."""

    def __init__(self, s: Scenario, sites: Sequence[tlayout.Site], sims: Sequence[TrainingSim],
                 held: Callable[[], Mapping[tuple[str, str], float]],
                 demand: Callable[[], Mapping[str, float]] | None = None) -> None:
        """``demand``: requests per region since its last call (None, or ``forecast = "declared"``:
        the declared profile alone)."""
        self.sites = list(sites)
        self.demand = demand if s.lending.forecast == "learnt" else None
        self.hours: dict[str, demand_hours.DemandHours] = {}
        c = s.lending
        declared = c.profile if c.profile is not None else s.inference.profile
        self.prior = list(declared)
        self.sims = list(sims)
        self.held = held
        self.rules = lending.Rules(tiers=tuple(c.tiers), profile=tuple(declared),
                                   peak_need_share=c.peak_need_share, headroom=c.headroom, margin_s=c.margin_s,
                                   min_lend_s=c.min_lend_s, stop_margin_s=STOP_MARGIN_S,
                                   inference_first=tuple(c.inference_first))
        self.offers = {sim.name: 0 for sim in sims}
        self.wake: dict[str, float | None] = {}
        """Each policy's next reclaim due (its own decisions are taken again then)."""
        self.reclaimed = {sim.name: 0 for sim in sims}
        self.at_once = {sim.name: 0 for sim in sims}
        """Lent attempts whose reclaim time the forecast moved into the past (a replica added there
        raised it): stopped at once, without the margin."""

    def __repr__(self) -> str:
        return f"<Lender sites={len(self.sites)} offers={sum(self.offers.values())} reclaimed={sum(self.reclaimed.values())}>"

    def tick(self, now: float, every: bool = True) -> float | None:
        """Decide offers and reclaims at ``now`` (``lending.decide``) for every policy (``every``), or
        only for those whose reclaim fell due; return when a reclaim next falls due (None: none)."""
        if not every and not any(w is not None and w <= now + 1e-6 for w in self.wake.values()):
            return min((w for w in self.wake.values() if w is not None), default=None)
        if self.demand is not None:
            # What each region asked since the last decision goes to the hour it was asked in
            # (a decision at 07:00:00 closes the hour from 06:00).
            for region, n in self.demand().items():
                self.hours[region] = demand_hours.observe(self.hours.get(region, demand_hours.DemandHours()),
                                                          now - 1e-6, n)
            learnt = {region: demand_hours.profile(d, self.prior) for region, d in self.hours.items()}
            self.rules = msgspec.structs.replace(self.rules, site_profiles={
                site.id: learnt[site.region] for site in self.sites if site.region in learnt})
        held = self.held()
        holdings = [lending.Holding(site=site.id, cards=dict(site.accelerators),
                                    held={acc: held.get((site.id, acc), 0.0) for acc in site.accelerators})
                    for site in self.sites]
        wake: float | None = None
        for sim in self.sims:
            due = self.wake.get(sim.name)
            if not every and (due is None or due > now + 1e-6):
                if due is not None and (wake is None or due < wake):
                    wake = due
                continue
            running = [lending.Attempt(job_id=jid, attempt=att, site=sid, accelerator=acc, cards=cards, checkpoint_s=ck)
                       for jid, att, sid, acc, cards, ck in sim.lent_attempts()]
            plan = lending.decide(now, holdings, running, self.rules)
            for st in plan.stops:
                if st.at > now + 1e-6:
                    continue
                if sim.stop(st.job_id, st.attempt, now):
                    self.reclaimed[sim.name] += 1
                    if "at once" in st.reason:
                        self.at_once[sim.name] += 1
            by_site = lending.offered_by_site(plan)
            for site in self.sites:
                sim.offer(site.id, by_site.get(site.id, {}))
            self.offers[sim.name] += len(plan.offers)
            self.wake[sim.name] = plan.wake
            if plan.wake is not None and (wake is None or plan.wake < wake):
                wake = plan.wake
        return wake

    def report(self, lent_card_hours: Mapping[str, float]) -> dict[str, object]:
        return {
            "what": "idle inference cards offered to training until a reclaim time before the forecast ramp "
                    "(core/lending.py, every tick_s); the forecast is a profile by local hour (learnt: the site's "
                    "region's observed requests, inference.profile the prior for hours not observed yet; or "
                    "declared: inference.profile) scaled so the peak hour "
                    "needs peak_need_share of a site's cards, and what replicas hold grown along it; offers: "
                    "(site, accelerator) offers summed over every decision; reclaimed at once: the forecast "
                    "needed the lent cards before the margin",
            "sites": len(self.sites),
            "forecast": "learnt" if self.demand is not None else "declared",
            "learnt_hours_by_region": {region: sum(1 for n in d.days if n) for region, d in sorted(self.hours.items())},
            "policies": {name: {"offers": self.offers[name], "attempts_reclaimed": self.reclaimed[name],
                                "attempts_reclaimed_at_once": self.at_once[name],
                                "lent_card_hours": lent_card_hours.get(name, 0.0)} for name in self.offers},
        }

