"""What a new leader must send that its predecessor decided: rebuilt from the replicated record.

The outbox (``services/outbox.py``) is local to each process: a leader that commits a decision and
dies before sending it leaves no entry the next leader can see. Rather than replicate the outbox
(one more record write per command, and a second copy of what the jobs and replicas already say),
the next leader rebuilds what must be sent from the record when it takes over
(``Leadership.on_lead``). Agents take commands idempotently (a ``StartAttempt`` for an attempt that
already runs is acknowledged as "already running"), and the new leader's epoch makes them its own.

- Rule 1 (starts): every job the record holds ``placed`` (an attempt decided, its start not yet
  acknowledged) whose attempt has no entry in this process's outbox gets its ``StartAttempt`` again,
  built from the job row and its stored placement (pool, accelerator, executor, time scale,
  checkpoint interval). The outbox's own obsolete check still runs before the send.
- Rule 2 (stops): nothing to rebuild. A stop the old leader decided is about an attempt that is no
  longer its job's current one (cancelled, superseded) or a preemption that the record never held;
  the training service's heartbeat reconcile stops any attempt a site reports that is not current,
  and the scheduler decides preemptions again.
- Rule 3 (models): nothing to rebuild. The deployments reconcile issues ``LoadModel`` for every
  replica the record holds ``placed`` that has no pending entry in this process's outbox, and
  ``UnloadModel`` for replicas sites report that the record no longer holds (``core/deployments``).
"""

from __future__ import annotations

import logging
import math
import secrets
import zlib

from controlplane.core.lifecycle import JobState
from controlplane.services.outbox import START
from controlplane.services.training import TrainingService
from controlplane.store import jobs as store_jobs
from controlplane.store import outbox as store_outbox
from controlplane.store.db import barrier, transaction
from edge_agent import wire

log = logging.getLogger("cpn.handover")




def start_command(training: TrainingService, row: store_jobs.JobRow) -> wire.StartAttempt | None:
    """The ``StartAttempt`` of ``row``'s current attempt, from the job row and its placement
    (None when the stored placement does not describe that attempt)."""
    pl = row.placement
    if pl is None or pl.attempt != row.attempt or not row.pool:
        return None
    spec = row.spec
    layout = training.layout
    try:
        site = layout.site(row.pool)
    except KeyError:
        return None
    accelerator = pl.accelerator or row.accelerator or ""
    acc = layout.accelerators.get(accelerator)
    units = acc.units if acc is not None and acc.units > 0 else 1.0
    interval_s = float(pl.checkpoint_interval_s or 0.0)
    if not math.isfinite(interval_s) or interval_s <= 0:
        interval_s = 0.0
    return wire.StartAttempt(
        job=row.id, attempt=row.attempt, cards=row.cards, accelerator=accelerator,
        executor=pl.executor or spec.workload, command=list(spec.command),
        work_s=spec.est_hours * 3600.0 / units, progress=row.progress, resume_from=row.checkpoint,
        checkpoint_interval_s=interval_s, checkpoint_cost_s=spec.checkpoint_cost_s,
        restart_s=site.restart_s, failure_rate_per_card_hour=site.failure_rate_per_card_hour,
        time_scale=pl.time_scale or 1.0,
        seed=zlib.crc32(f"{training.config.seed}:{row.id}:{row.attempt}".encode()), tenant=row.tenant,
        event_key=secrets.token_urlsafe(16), image=spec.image or "",
    )


async def rebuild_starts_awaited(training: TrainingService, now: float) -> int:
    """:func:`rebuild_starts` after an awaited read barrier (the loop goes on while the record
    answers; a blocking barrier skipped after a failed one would read a stale view here)."""
    await barrier(training.db)
    return rebuild_starts(training, now)


def rebuild_starts(training: TrainingService, now: float) -> int:
    """Rule 1: queue the ``StartAttempt`` of every ``placed`` job this process's outbox knows nothing
    of; returns how many were queued. Call once the training service has started (it owns the outbox)."""
    outbox = training.outbox
    if outbox is None:
        return 0
    db = training.db
    queued: list[tuple[str, int, str]] = []
    with transaction(db):  # the read barrier: the projection has the record's last revision
        for row in store_jobs.jobs_in_states(db, (JobState.PLACED,)):
            if any(e.kind == START and e.attempt == row.attempt for e in store_outbox.for_job(db, row.id)):
                continue
            try:
                cmd = start_command(training, row)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("event=handover_start_unbuildable job=%s attempt=%d error=%r", row.id, row.attempt, exc)
                continue
            if cmd is None:
                log.warning("event=handover_start_unbuildable job=%s attempt=%d error=no placement", row.id, row.attempt)
                continue
            outbox.add(row.pool, cmd, now)
            queued.append((row.id, row.attempt, row.pool))
    for job, attempt, site in queued:
        log.info("event=handover_start job=%s attempt=%d site=%s", job, attempt, site)
    if queued:
        training.counters["handover_starts"] = training.counters.get("handover_starts", 0) + len(queued)
        outbox.kick()
    return len(queued)
