"""The leader lease's rules, as pure functions of plain data and an injected ``now`` (seconds on a
monotonic clock of the process that decides). No I/O, no clock reading: :mod:`.lease` carries them out.

The shape is Kubernetes client-go's leader election (``tools/leaderelection``), on a record with
per-key compare-and-set:

- Rule 1 (durations): ``lease_duration_s > renew_deadline_s > retry_period_s > 0``. A leader tries to
  renew every ``retry_period_s``; a candidate retries acquiring every ``retry_period_s``.
- Rule 2 (the leader stops first): a leader leads only while ``now < renewed_at + renew_deadline_s``,
  where ``renewed_at`` is when it *sent* its last renewal that the record acknowledged. Past that
  it stops deciding (``OnStoppedLeading``), whether or not anyone else is there.
- Rule 3 (a candidate waits a full lease on its own clock): a candidate times a lease from the
  moment *it* first saw the lease's current revision, never from a time written in the record (so
  clock skew between hosts does not matter, only clock rates). It may try to acquire once
  ``now >= seen_at + lease_duration_s`` with no new revision seen, or at once if there is no lease
  or its holder released it.
- Why Rule 2 and 3 keep two leaders apart: a candidate sees a renewal only after it was sent, so
  ``seen_at >= renewed_at`` and the candidate's earliest try is at ``renewed_at + lease_duration_s``,
  later than the old leader's stop at ``renewed_at + renew_deadline_s``. A leader that cannot run
  its own timer (SIGSTOP, a long GC pause) may wake up believing it leads: the fencing epoch covers
  that case (its commits carry its epoch and fail once a new leader has written the fence).
- Rule 4 (who wins): acquiring is one compare-and-set on the revision the candidate observed; of
  several candidates at most one wins. The epoch is the revision of the fence key the winner's
  acquisition wrote, so epochs only grow.
"""

from __future__ import annotations

import msgspec


class LeaseConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Lease timings. Defaults aim at a takeover within ~3.5 s of a leader's death, with a leader
    riding out ~2 s without a quorum acknowledgement (a NATS node's loss and the stream's
    re-election) before it steps down. Kubernetes uses 15 / 10 / 2 s."""

    lease_duration_s: float = 3.0
    renew_deadline_s: float = 2.0
    retry_period_s: float = 0.4

    def __post_init__(self) -> None:
        if not self.lease_duration_s > self.renew_deadline_s > self.retry_period_s > 0:
            raise ValueError("lease timings need lease_duration_s > renew_deadline_s > retry_period_s > 0 (got "
                             f"{self.lease_duration_s:g} / {self.renew_deadline_s:g} / {self.retry_period_s:g})")


class LeaseRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The lease key's value in the record."""

    holder: str
    """Identity of the holding process (unique per process life, e.g. ``host:pid:random``)."""
    epoch: int = 0
    """The holder's fencing epoch (0 only in the acquisition write itself, filled by the first renewal)."""
    lease_duration_s: float
    """How long others wait after seeing this revision (the holder's own setting)."""
    renewals: int = 0
    released: bool = False
    """The holder stepped down on purpose: others may acquire at once."""


class Observed(msgspec.Struct, frozen=True, kw_only=True):
    """What a candidate knows of the lease: its revision (0: no lease) and when it first saw it."""

    revision: int
    holder: str = ""
    lease_duration_s: float = 0.0
    released: bool = False
    seen_at: float


class Held(msgspec.Struct, frozen=True, kw_only=True):
    """What a leader knows of its own lease."""

    epoch: int
    revision: int
    """The lease key's revision after our last acknowledged write."""
    renewed_at: float
    """When that write was sent (our clock)."""
    renewals: int = 0


def observe(previous: Observed | None, revision: int, lease: LeaseRecord | None, now: float) -> Observed:
    """The candidate's view after reading the lease at ``now``: the first-seen time is kept while
    the revision stays the same (Rule 3)."""
    if previous is not None and previous.revision == revision:
        return previous
    if lease is None:
        return Observed(revision=revision, seen_at=now)
    return Observed(revision=revision, holder=lease.holder, lease_duration_s=lease.lease_duration_s,
                    released=lease.released, seen_at=now)


def may_acquire(observed: Observed, now: float) -> bool:
    """True when a candidate may try its compare-and-set on ``observed.revision`` (Rule 3)."""
    if observed.revision == 0 or observed.released:
        return True
    return now >= observed.seen_at + observed.lease_duration_s


def acquire_at(observed: Observed) -> float:
    """The earliest time :func:`may_acquire` can be true for this observation."""
    if observed.revision == 0 or observed.released:
        return observed.seen_at
    return observed.seen_at + observed.lease_duration_s


def still_leading(held: Held, now: float, config: LeaseConfig) -> bool:
    """True while the leader may go on deciding (Rule 2)."""
    return now < held.renewed_at + config.renew_deadline_s


def stop_at(held: Held, config: LeaseConfig) -> float:
    """When the leader stops if no renewal is acknowledged before."""
    return held.renewed_at + config.renew_deadline_s


def next_renewal_at(held: Held, config: LeaseConfig) -> float:
    return held.renewed_at + config.retry_period_s


def renewal_budget_s(held: Held, now: float, config: LeaseConfig) -> float:
    """How long a renewal sent at ``now`` may wait for its acknowledgement (0: too late)."""
    return max(0.0, stop_at(held, config) - now)


def renewed(held: Held, revision: int, sent_at: float) -> Held:
    """The leader's view after a renewal sent at ``sent_at`` was acknowledged at ``revision``."""
    return Held(epoch=held.epoch, revision=revision, renewed_at=sent_at, renewals=held.renewals + 1)
