"""One picture of a training job, the same in the job list, the job itself and the usage figures.

A job's figures (:class:`JobFigures`) are computed in ONE place, :meth:`JobViews.figures`, from
the job's row (what ended attempts billed), the current attempt's card time so far (accruing while
it runs, priced as it will be billed) and the progress its site last reported in a heartbeat. The
job list, the job detail and ``/v1/usage`` all take their figures from there, at the same ``now``,
so they cannot disagree again, and a running job counts in usage while it runs.

It also admits submissions: a job no declared pool could ever run (``core.feasibility``) is
refused with the field to blame, and a job without ``accelerators`` gets every accelerator some
declared pool could run it on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from controlplane.core import feasibility, placement
from controlplane.core.clock import Clock
from controlplane.core.errors import Unprocessable
from controlplane.core.jobspec import JobSpec
from controlplane.core.lifecycle import JobState
from controlplane.services.training import LIVE_STATES, JobRow, TrainingService

if TYPE_CHECKING:
    from controlplane.services.sites import SiteService


class JobFigures(msgspec.Struct, frozen=True, kw_only=True):
    """What a job has done and cost at one moment."""

    progress: float
    """The larger of the last checkpoint's progress and the site's last heartbeat."""
    card_hours: float
    """Billed (ended attempts) plus the running attempt's so far."""
    energy_cny: float
    billed_card_hours: float
    billed_energy_cny: float
    accruing: bool
    """A running attempt adds to the figures as it runs."""


class JobViews:
    """The tenant's views of its training jobs (name ``job_views``)."""

    name = "job_views"

    def __init__(self, *, sites: SiteService, training: TrainingService, clock: Clock) -> None:
        self.sites = sites
        self.training = training
        self.clock = clock
        self._declared: tuple[tuple[object, ...], tuple[placement.Pool, ...]] = ((), ())
        """The layout and declarations :meth:`declared_pools` last saw, and the pools it made of them."""

    def __repr__(self) -> str:
        return f"<JobViews sites={len(self.sites.declarations)}>"

    # ------------------------------------------------------------------ figures

    def now(self) -> float:
        return self.clock.time()

    def figures(self, row: JobRow, now: float) -> JobFigures:
        """The job's progress and cost at ``now`` (the one rule for list, detail and usage)."""
        live = self.training.live_progress(row)
        hours, energy = self.training.accrued(row, now)
        return JobFigures(
            progress=row.progress if live is None else max(row.progress, live),
            card_hours=round(row.card_hours + hours, 6), energy_cny=round(row.energy_cny + energy, 6),
            billed_card_hours=round(row.card_hours, 6), billed_energy_cny=round(row.energy_cny, 6),
            accruing=hours > 0.0,
        )

    def listing(self, tenant: str, *, state: JobState | None, limit: int,
                now: float) -> list[tuple[JobRow, JobFigures]]:
        """A tenant's jobs, newest first, each with its figures at ``now``."""
        return [(r, self.figures(r, now)) for r in self.training.jobs(tenant, state=state, limit=limit)]

    def usage(self, tenant: str, now: float) -> dict[str, Any]:
        """Training usage of a tenant at ``now``: every job's card-hours and energy (billed plus
        accruing), the accruing part on its own, and a line per job (newest 100)."""
        out = self.training.usage(tenant)
        billed_hours, billed_energy = float(out["card_hours"]), float(out["energy_cny"])
        acc_jobs, acc_hours, acc_energy = 0, 0.0, 0.0
        by_job = []
        for row in (r for state in LIVE_STATES for r in self.training.jobs(tenant, state=state, limit=100_000)):
            f = self.figures(row, now)
            if f.accruing:
                acc_jobs += 1
                acc_hours += f.card_hours - f.billed_card_hours
                acc_energy += f.energy_cny - f.billed_energy_cny
        for row, f in self.listing(tenant, state=None, limit=100, now=now):
            by_job.append({"id": row.id, "name": row.name, "state": row.state, "attempts": row.attempt,
                           "progress": f.progress, "card_hours": f.card_hours, "energy_cny": f.energy_cny})
        out.update({
            "card_hours": round(billed_hours + acc_hours, 6),
            "energy_cny": round(billed_energy + acc_energy, 6),
            "billed": {"card_hours": round(billed_hours, 6), "energy_cny": round(billed_energy, 6)},
            "accruing": {"jobs": acc_jobs, "card_hours": round(acc_hours, 6), "energy_cny": round(acc_energy, 6)},
            "by_job": by_job,
            "at": now,
        })
        return out

    # ------------------------------------------------------------------ admission

    def declared_pools(self) -> list[placement.Pool]:
        """Every layout site as the operator declared it (the layout, narrowed or widened by ``PUT
        /v1/sites/{site}/declaration``) as an idle training pool. Sites outside the layout are left
        out: the scheduler cannot price them (no tariff, no PUE), so they never take a job."""
        layout = self.sites.layout
        declared = (layout, *self.sites.declarations.values())
        if len(declared) == len(self._declared[0]) and all(a is b for a, b in zip(declared, self._declared[0])):
            return list(self._declared[1])  # the same (frozen) declarations: the same pools
        known = layout.accelerators
        in_layout = {s.id for s in layout.sites}
        pools = []
        for d in self.sites.declarations.values():
            if d.id not in in_layout:
                continue
            cards = {a: int(n) for a, n in d.accelerators.items() if n > 0}
            pools.append(placement.Pool(
                id=d.id, region=d.region, provider=d.provider, tee=d.tee, cards_total=cards, cards_free=cards,
                units={a: known[a].units for a in cards if a in known}))
        pools.sort(key=lambda p: p.id)
        self._declared = (declared, tuple(pools))
        return pools

    def admit(self, tenant: str, spec: JobSpec) -> JobSpec:
        """The spec to store, or a refusal if no declared pool could ever run the job.

        Without ``accelerators`` the job may use any: every accelerator of the layout some declared
        pool could run it on is filled in (the layout's order); the job shows that list.

        Raises:
            Unprocessable: (422) naming the field no pool can satisfy, with every pool's reason.
        """
        any_acc = not spec.accelerators
        accelerators = tuple(self.sites.layout.accelerators) if any_acc else spec.accelerators
        job = placement.JobSpec(
            id="(new)", tenant=tenant, cards=spec.cards, accelerators=accelerators, est_hours=spec.est_hours,
            regions=spec.regions, providers=spec.providers, tee=spec.tee, workload=spec.workload)
        pools = self.declared_pools()
        never = feasibility.never_fits(job, pools)
        if never is not None:
            raise Unprocessable(never.reason, field=never.field)
        if not any_acc:
            return spec
        return msgspec.structs.replace(spec, accelerators=tuple(feasibility.fitting_accelerators(job, pools)))
