"""Could any declared pool EVER run a job? The check a submission passes before it is queued.

Pure. It reuses placement's own filters (``placement.STATIC_FILTERS``), keeping only those that test
what the operator declared about a site and that no change of state can undo: the accelerator type,
the gang (all cards in one pool), region, provider, TEE. Health, draining and free cards change by
the minute and the executors by registration, so a job failing only those waits in the queue with
its reason instead (the scheduler's ``wait`` / ``infeasible``).

Rule 1: a job is refused only if EVERY declared pool fails one of these filters for EVERY one of its
accelerators; one pool that could hold it once it is idle and up is enough to accept it.
Rule 2: the refusal names one request field, the one the pool that came closest failed on (the
filters run in order; the pool passing most of them came closest), and lists why the pools fail, closest first.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from controlplane.core import placement

EVER_FILTERS = ("accelerator", "gang", "region", "provider", "tee")
"""Names in ``placement.STATIC_FILTERS`` that depend only on what the operator declared."""

FIELD_OF = {"accelerator": "accelerators", "gang": "cards", "region": "regions", "provider": "providers",
            "tee": "tee"}
"""The request field a failing filter is about."""

SHOWN_POOLS = 6
"""How many pools' reasons a refusal lists (the rest are counted)."""


class Never(msgspec.Struct, frozen=True, kw_only=True):
    """No declared pool could ever run the job: the field to blame and why."""

    field: str
    reason: str


def _filters() -> list[tuple[str, placement.Filter]]:
    return [(f.name, f.check) for f in placement.STATIC_FILTERS if f.name in EVER_FILTERS]


def fitting_accelerators(job: placement.JobSpec, pools: Sequence[placement.Pool]) -> list[str]:
    """The accelerators of ``job`` (in its order) some pool could ever run it on."""
    filters = _filters()
    return [acc for acc in job.accelerators
            if any(all(check(job, pool, acc) is None for _, check in filters) for pool in pools)]


def never_fits(job: placement.JobSpec, pools: Sequence[placement.Pool]) -> Never | None:
    """None if some pool could ever run ``job`` (Rule 1), else what to tell the tenant (Rule 2)."""
    filters = _filters()
    if not pools:
        return Never(field="accelerators", reason="no site is declared: no pool can run training jobs")
    best_depth = -1
    best_name = "accelerator"
    reasons: list[tuple[int, str]] = []
    for pool in pools:
        pool_depth, pool_reason = -1, ""
        for acc in job.accelerators:
            depth, reason = len(filters), ""
            for i, (name, check) in enumerate(filters):
                why = check(job, pool, acc)
                if why is not None:
                    depth, reason = i, why
                    break
            if not reason:
                return None
            if depth > pool_depth:
                pool_depth, pool_reason = depth, reason
        reasons.append((-pool_depth, f"{pool.id}: {pool_reason}"))
        if pool_depth > best_depth:
            best_depth, best_name = pool_depth, filters[pool_depth][0]
    reasons.sort()  # the pools that came closest first
    shown = "; ".join(text for _, text in reasons[:SHOWN_POOLS])
    more = f"; and {len(reasons) - SHOWN_POOLS} more" if len(reasons) > SHOWN_POOLS else ""
    want = f"{job.cards} cards of {'/'.join(job.accelerators)} in one pool"
    return Never(field=FIELD_OF[best_name],
                 reason=f"no declared site can ever run this job ({want}): {shown}{more}")
