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
- Rule 5 (a silent holder is taken over early): the renew deadline is long enough for the leader to
  ride out the record stream's re-election (a NATS node's loss: 4-9 s when nothing can be written),
  so a dead leader's lease alone would keep the country leaderless as long. A candidate therefore
  also asks the holder *process* whether it is alive, over core NATS (no stream involved:
  ``kv.Record.probe_alive``). It may acquire at ``silent_since + holder_silent_s`` when every probe
  since ``silent_since`` went unanswered *and* no new revision of the lease was seen meanwhile
  (a new revision starts a new observation, without silence), where ``holder_silent_s`` is the
  holder's own setting, written in the lease (0: an old holder that does not answer probes, never
  taken early). A probe round whose lease read failed proves nothing (the candidate's own link may
  be down) and clears the silence.
- Rule 6 (the leader stops *deciding* first, always): a leader decides (sends the leader's
  commands) only while ``now < renewed_at + holder_silent_s``; between that and its renew deadline
  it still holds the lease (answers probes, renews, keeps its epoch and its followers) but waits.
  Why this keeps two deciders apart even when probes are lost while the holder lives: a successful
  acquisition is a compare-and-set on the latest revision, which the candidate first saw at
  ``seen_at >= renewed_at`` (the send time of the holder's last acknowledged renewal, or later),
  and ``silent_since >= seen_at``, so the early acquisition comes at ``>= renewed_at +
  holder_silent_s``, when the holder has stopped deciding. What a holder that still believes it
  holds the lease writes after that fails on the fence (Rule 4's epoch), and what it sends is
  refused by agents that saw the newer epoch.
"""

from __future__ import annotations

import msgspec


class LeaseConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Lease timings. The leader rides out ``renew_deadline_s`` without a quorum acknowledgement
    (the record stream's re-election after a NATS node's loss or pause takes nats-server 4-9 s,
    not configurable); a leader *process* that dies or freezes is taken over about
    ``holder_silent_s`` after its last renewal (Rule 5), and one that does not answer probes (an
    older version) after ``lease_duration_s``. Kubernetes uses 15 / 10 / 2 s."""

    lease_duration_s: float = 15.0
    renew_deadline_s: float = 12.0
    retry_period_s: float = 0.4
    holder_silent_s: float = 2.5
    """How long a holder that neither renews nor answers probes may be silent before a candidate
    acquires (Rule 5), and how long after its last acknowledged renewal the leader decides (Rule 6).
    0: no probes (the leader decides until its renew deadline; others wait a full lease)."""

    def __post_init__(self) -> None:
        if not self.lease_duration_s > self.renew_deadline_s > self.retry_period_s > 0:
            raise ValueError("lease timings need lease_duration_s > renew_deadline_s > retry_period_s > 0 (got "
                             f"{self.lease_duration_s:g} / {self.renew_deadline_s:g} / {self.retry_period_s:g})")
        if self.holder_silent_s and not self.renew_deadline_s >= self.holder_silent_s > self.retry_period_s:
            raise ValueError("holder_silent_s needs renew_deadline_s >= holder_silent_s > retry_period_s, or 0 (got "
                             f"{self.holder_silent_s:g})")

    @property
    def decide_window_s(self) -> float:
        """How long after its last acknowledged renewal a leader decides (Rule 6)."""
        return self.holder_silent_s or self.renew_deadline_s


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
    holder_silent_s: float = 0.0
    """The holder's ``LeaseConfig.holder_silent_s``: it answers liveness probes, and may be taken over
    this long after it fell silent (0: it does not answer them; written by older versions)."""


class Observed(msgspec.Struct, frozen=True, kw_only=True):
    """What a candidate knows of the lease: its revision (0: no lease) and when it first saw it."""

    revision: int
    holder: str = ""
    lease_duration_s: float = 0.0
    released: bool = False
    seen_at: float
    holder_silent_s: float = 0.0
    """The holder's setting (from the lease): 0 means it is never taken over early."""
    silent_since: float | None = None
    """When the first of the probes of the holder that have all gone unanswered since was sent
    (None: it answered the last one, or it was not asked yet at this revision)."""


class Held(msgspec.Struct, frozen=True, kw_only=True):
    """What a leader knows of its own lease."""

    epoch: int
    revision: int
    """The lease key's revision after our last acknowledged write."""
    renewed_at: float
    """When that write was sent (our clock)."""
    renewals: int = 0


def observe(previous: Observed | None, revision: int, lease: LeaseRecord | None, now: float) -> Observed:
    """The candidate's view after reading the lease at ``now``: the first-seen time (and the
    holder's silence) is kept while the revision stays the same (Rules 3 and 5)."""
    if previous is not None and previous.revision == revision:
        return previous
    if lease is None:
        return Observed(revision=revision, seen_at=now)
    return Observed(revision=revision, holder=lease.holder, lease_duration_s=lease.lease_duration_s,
                    released=lease.released, seen_at=now, holder_silent_s=lease.holder_silent_s)


def wants_probe(observed: Observed, identity: str) -> bool:
    """Should the candidate ``identity`` ask the holder whether it is alive (Rule 5)?"""
    return (observed.revision != 0 and not observed.released and observed.holder_silent_s > 0
            and observed.holder != identity)


def probed(observed: Observed, answered: bool, sent_at: float) -> Observed:
    """The view after a probe of the holder sent at ``sent_at`` (after a successful read of the
    lease in the same round): an answer clears the silence, none starts it (or lets it run on)."""
    if answered:
        return msgspec.structs.replace(observed, silent_since=None) if observed.silent_since is not None else observed
    if observed.silent_since is not None:
        return observed
    return msgspec.structs.replace(observed, silent_since=max(sent_at, observed.seen_at))


def unsure(observed: Observed | None) -> Observed | None:
    """The view after a round whose lease read failed: the candidate's own link may be down, so
    the holder's silence so far proves nothing (Rule 5)."""
    if observed is None or observed.silent_since is None:
        return observed
    return msgspec.structs.replace(observed, silent_since=None)


def may_acquire(observed: Observed, now: float) -> bool:
    """True when a candidate may try its compare-and-set on ``observed.revision`` (Rules 3, 5)."""
    return now >= acquire_at(observed)


def acquire_at(observed: Observed) -> float:
    """The earliest time :func:`may_acquire` can be true for this observation (if the holder stays
    silent, for the early path)."""
    if observed.revision == 0 or observed.released:
        return observed.seen_at
    full = observed.seen_at + observed.lease_duration_s
    if observed.silent_since is None or observed.holder_silent_s <= 0:
        return full
    return min(full, max(observed.silent_since, observed.seen_at) + observed.holder_silent_s)


def still_leading(held: Held, now: float, config: LeaseConfig) -> bool:
    """True while the leader may go on deciding (Rule 2)."""
    return now < held.renewed_at + config.renew_deadline_s


def may_decide(held: Held, now: float, config: LeaseConfig) -> bool:
    """True while the leader may send the leader's commands (Rule 6): it holds the lease and its
    last acknowledged renewal is recent enough that no candidate can have taken it over early."""
    return now < decide_until(held, config) and still_leading(held, now, config)


def decide_until(held: Held, config: LeaseConfig) -> float:
    return held.renewed_at + config.decide_window_s


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
