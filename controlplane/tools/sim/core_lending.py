"""Tidal lending on the simulated clock: ``core/lending.py``'s rule run for each training policy. Pure.

Every ``lending.tick_s`` (and whenever a reclaim falls due) the :class:`Lender` builds a
``lending.Site`` per lent site (its cards by accelerator, what inference replicas hold there now,
what training holds there, the forecast need by local hour), and

- offers the idle cards that will not be needed (``lending.offers``): the training simulation's
  lent pool shows only the offered cards free, and takes no new gangs without an offer;
- stops lent attempts before their site's reclaim time (``lending.reclaim_at`` +
  ``lending.reclaims``: checkpoint first, then the cards are back); the job requeues and its
  restart is planned by the scheduler like any stopped attempt.

The forecast (``lending.forecast``, per site and accelerator, as replicas are pinned to one) is
the scenario's declared hour-of-day profile (``inference.profile``): the peak hour needs
``peak_need_share`` of the cards, and what replicas hold now grows along the profile with
``headroom``. The same rule, with the same inputs, runs live in the
training service (docs/training.md, "Tidal lending").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from controlplane.core import lending
from controlplane.tools.sim.core_scenario import Scenario
from controlplane.tools.sim.core_training import TrainingSim
from topology import layout as tlayout

STOP_MARGIN_S = 60.0
"""A lent attempt is told to stop this long before its checkpoint must be written (lending.reclaims)."""


class Lender:
    """Offers and reclaims for every training policy's simulation over one run."""

    def __init__(self, s: Scenario, sites: Sequence[tlayout.Site], sims: Sequence[TrainingSim],
                 held: Callable[[], Mapping[tuple[str, str], float]]) -> None:
        self.cfg = s.lending
        self.sites = list(sites)
        self.sims = list(sims)
        self.held = held
        self.profile = list(s.inference.profile)
        self.offers = {sim.name: 0 for sim in sims}
        self.reclaimed = {sim.name: 0 for sim in sims}
        self.at_once = {sim.name: 0 for sim in sims}
        """Lent attempts whose reclaim time the forecast moved into the past (a replica added there
        raised it): stopped at once, without the margin."""
        self.notes: list[str] = []

    def __repr__(self) -> str:
        return f"<Lender sites={len(self.sites)} offers={sum(self.offers.values())} reclaimed={sum(self.reclaimed.values())}>"

    def _views(self, held: Mapping[tuple[str, str], float], lent: Mapping[tuple[str, str], int],
               now: float) -> list[lending.Site]:
        """One ``lending.Site`` per (site, accelerator): replicas are pinned to an accelerator."""
        c = self.cfg
        out = []
        for site in self.sites:
            for acc, n in sorted(site.accelerators.items()):
                h = held.get((site.id, acc), 0.0)
                out.append(lending.Site(
                    id=site.id, cards={acc: n}, held={acc: h}, lent={acc: lent.get((site.id, acc), 0)},
                    need_by_hour=lending.forecast(now, self.profile, float(n), h, peak_share=c.peak_need_share,
                                                  headroom=c.headroom)))
        return out

    def tick(self, now: float) -> float | None:
        """Decide offers and reclaims at ``now``; return when a reclaim next falls due (None: none)."""
        held = self.held()
        wake: float | None = None
        c = self.cfg
        for sim in self.sims:
            running = sim.lent_attempts()
            lent_by: dict[tuple[str, str], int] = {}
            for _, _, sid, acc, cards, _ in running:
                lent_by[(sid, acc)] = lent_by.get((sid, acc), 0) + cards
            views = self._views(held, lent_by, now)
            due = {(v.id, next(iter(v.cards))): lending.reclaim_at(now, v, margin_s=c.margin_s) for v in views}
            lent = []
            for jid, att, sid, acc, cards, ck in running:
                at = due.get((sid, acc))
                lent.append(lending.Lent(job_id=jid, attempt=att, site=sid, cards=cards, checkpoint_s=ck,
                                         reclaim_at=at if at is not None else now + 86400.0))
                if at is not None and at < now - 1e-6:
                    self.at_once[sim.name] += 1
            stops, nxt = lending.reclaims(now, lent, margin_s=STOP_MARGIN_S)
            for st in stops:
                if sim.stop(st.job_id, st.attempt, now):
                    self.reclaimed[sim.name] += 1
            if stops:  # the cards are back: decide offers on what is left
                lent_by = {}
                for _, _, sid, acc, cards, _ in sim.lent_attempts():
                    lent_by[(sid, acc)] = lent_by.get((sid, acc), 0) + cards
                views = self._views(held, lent_by, now)
            offers, _ = lending.offers(now, views, margin_s=c.margin_s, min_lend_s=c.min_lend_s)
            by_site: dict[str, dict[str, int]] = {}
            for o in offers:
                by_site.setdefault(o.site, {})[o.accelerator] = o.cards
            for site in self.sites:
                sim.offer(site.id, by_site.get(site.id, {}))
            self.offers[sim.name] += len(offers)
            if nxt is not None and (wake is None or nxt < wake):
                wake = nxt
        return wake

    def report(self, lent_card_hours: Mapping[str, float]) -> dict[str, object]:
        return {
            "what": "idle inference cards offered to training until a reclaim time before the forecast ramp "
                    "(core/lending.py, every tick_s); the forecast is inference.profile scaled so the peak hour "
                    "needs peak_need_share of a site's cards",
            "sites": len(self.sites),
            "policies": {name: {"offers": self.offers[name], "attempts_reclaimed": self.reclaimed[name],
                                "attempts_reclaimed_at_once": self.at_once[name],
                                "lent_card_hours": lent_card_hours.get(name, 0.0)} for name in self.offers},
        }

