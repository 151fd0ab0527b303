"""The lease rules on an injected clock: who may lead, when, and that two never overlap: a holder
that falls silent is taken over early, and still no two processes ever decide at once."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.replicated import lease_rules as rules

CFG = rules.LeaseConfig(lease_duration_s=3.0, renew_deadline_s=2.0, retry_period_s=0.4, holder_silent_s=0)


def lease(holder: str = "a", duration_s: float = 3.0, released: bool = False) -> rules.LeaseRecord:
    return rules.LeaseRecord(holder=holder, epoch=7, lease_duration_s=duration_s, released=released)


@pytest.mark.parametrize("durations", [(3, 3, 0.4), (3, 2, 2), (2, 3, 0.4), (3, 2, 0), (1, 2, 3)])
def test_config_needs_lease_longer_than_deadline_longer_than_retry(durations: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError, match="lease_duration_s > renew_deadline_s > retry_period_s"):
        rules.LeaseConfig(lease_duration_s=durations[0], renew_deadline_s=durations[1], retry_period_s=durations[2],
                          holder_silent_s=0)


@pytest.mark.parametrize("silent_s", [0.4, 0.1, 2.5, -1.0])
def test_config_needs_holder_silence_between_retry_and_deadline(silent_s: float) -> None:
    with pytest.raises(ValueError, match="renew_deadline_s >= holder_silent_s > retry_period_s"):
        rules.LeaseConfig(lease_duration_s=3.0, renew_deadline_s=2.0, retry_period_s=0.4, holder_silent_s=silent_s)


def test_defaults_ride_out_a_stream_election_and_take_a_silent_holder_over_within_3_5s() -> None:
    config = rules.LeaseConfig()
    # nats-server's Raft waits 4-9 s before a follower campaigns; the leader must outlast that
    assert config.renew_deadline_s >= 10.0
    assert config.holder_silent_s + config.retry_period_s <= 3.0


def test_no_lease_or_a_released_one_may_be_taken_at_once() -> None:
    assert rules.may_acquire(rules.observe(None, 0, None, now=10.0), now=10.0)
    assert rules.may_acquire(rules.observe(None, 5, lease(released=True), now=10.0), now=10.0)


def test_candidate_times_the_lease_from_when_it_first_saw_the_revision() -> None:
    seen = rules.observe(None, 5, lease(), now=100.0)
    again = rules.observe(seen, 5, lease(), now=101.5)
    assert again.seen_at == 100.0  # same revision: the first sighting counts
    assert not rules.may_acquire(again, now=102.9)
    assert rules.may_acquire(again, now=103.0)
    assert rules.acquire_at(again) == 103.0
    renewed = rules.observe(again, 6, lease(), now=102.0)  # the holder renewed: start again
    assert renewed.seen_at == 102.0 and not rules.may_acquire(renewed, now=104.9)


def test_candidate_uses_the_holders_lease_duration() -> None:
    seen = rules.observe(None, 5, lease(duration_s=10.0), now=0.0)
    assert not rules.may_acquire(seen, now=9.9) and rules.may_acquire(seen, now=10.0)


def test_leader_stops_at_its_renew_deadline_and_renewals_move_it() -> None:
    held = rules.Held(epoch=3, revision=10, renewed_at=50.0)
    assert rules.still_leading(held, 51.99, CFG)
    assert not rules.still_leading(held, 52.0, CFG)
    assert rules.next_renewal_at(held, CFG) == pytest.approx(50.4)
    assert rules.renewal_budget_s(held, 51.5, CFG) == pytest.approx(0.5)
    assert rules.renewal_budget_s(held, 53.0, CFG) == 0.0
    later = rules.renewed(held, 11, sent_at=51.0)
    assert later.epoch == 3 and later.revision == 11 and later.renewals == 1
    assert rules.still_leading(later, 52.5, CFG)


@given(
    sent_at=st.floats(0, 1e6, allow_nan=False),
    seen_delay=st.floats(0, 100, allow_nan=False),
    lease_s=st.floats(0.3, 60, allow_nan=False),
    deadline_frac=st.floats(0.1, 0.99),
)
def test_old_leader_always_stops_before_a_candidate_may_acquire(sent_at: float, seen_delay: float, lease_s: float,
                                                                deadline_frac: float) -> None:
    """For any renewal sent at ``sent_at`` and seen by a candidate at ``sent_at + seen_delay`` (never
    before it was sent), the candidate's earliest acquisition comes after the leader stopped."""
    config = rules.LeaseConfig(lease_duration_s=lease_s, renew_deadline_s=lease_s * deadline_frac,
                               retry_period_s=lease_s * deadline_frac / 2, holder_silent_s=0)
    held = rules.Held(epoch=1, revision=9, renewed_at=sent_at)
    seen = rules.observe(None, 9, lease(duration_s=config.lease_duration_s), now=sent_at + seen_delay)
    assert rules.acquire_at(seen) > rules.stop_at(held, config)
    assert not rules.still_leading(held, rules.acquire_at(seen), config)


# ---------------------------------------------------------------------------- Rules 5 and 6: a silent holder

SILENT = rules.LeaseConfig(lease_duration_s=15.0, renew_deadline_s=12.0, retry_period_s=0.4, holder_silent_s=2.0)


def probing_lease(holder: str = "a", silent_s: float = 2.0) -> rules.LeaseRecord:
    return rules.LeaseRecord(holder=holder, epoch=7, lease_duration_s=15.0, holder_silent_s=silent_s)


def test_a_holder_silent_for_its_holder_silent_s_may_be_taken_over_early() -> None:
    seen = rules.observe(None, 5, probing_lease(), now=100.0)
    assert rules.wants_probe(seen, "b") and not rules.wants_probe(seen, "a")  # nobody probes itself
    silent = rules.probed(seen, answered=False, sent_at=100.1)
    assert silent.silent_since == 100.1
    again = rules.probed(silent, answered=False, sent_at=100.5)
    assert again.silent_since == 100.1  # the first unanswered probe counts
    assert not rules.may_acquire(again, now=102.09)
    assert rules.may_acquire(again, now=102.1) and rules.acquire_at(again) == pytest.approx(102.1)


def test_one_answer_or_a_renewal_or_a_failed_read_clears_the_silence() -> None:
    silent = rules.probed(rules.observe(None, 5, probing_lease(), now=100.0), answered=False, sent_at=100.0)
    answered = rules.probed(silent, answered=True, sent_at=101.0)
    assert answered.silent_since is None and not rules.may_acquire(answered, now=103.0)
    renewed = rules.observe(silent, 6, probing_lease(), now=101.0)  # the holder renewed: alive
    assert renewed.silent_since is None and not rules.may_acquire(renewed, now=103.0)
    unsure = rules.unsure(silent)
    assert unsure is not None and unsure.silent_since is None and not rules.may_acquire(unsure, now=103.0)
    assert rules.unsure(None) is None


def test_a_holder_that_does_not_answer_probes_waits_out_a_full_lease() -> None:
    """An older hub writes no ``holder_silent_s`` (0): its silence says nothing, nobody probes it."""
    seen = rules.observe(None, 5, probing_lease(silent_s=0.0), now=100.0)
    assert not rules.wants_probe(seen, "b")
    silent = rules.probed(seen, answered=False, sent_at=100.0)
    assert not rules.may_acquire(silent, now=114.9) and rules.may_acquire(silent, now=115.0)


def test_the_leader_holds_to_its_deadline_but_decides_only_within_holder_silent_s() -> None:
    held = rules.Held(epoch=3, revision=10, renewed_at=50.0)
    assert rules.may_decide(held, 51.99, SILENT) and not rules.may_decide(held, 52.0, SILENT)
    assert rules.still_leading(held, 61.99, SILENT) and not rules.still_leading(held, 62.0, SILENT)
    assert rules.may_decide(rules.renewed(held, 11, sent_at=58.0), 59.0, SILENT)  # a renewal lands: decides again
    assert rules.may_decide(held, 51.99, CFG) and not rules.may_decide(held, 52.0, CFG)  # no probes: to the deadline


Step = tuple[float, int, str, bool]


@settings(max_examples=400, deadline=None)
@given(
    silent_s=st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=3, max_size=3),
    steps=st.lists(st.tuples(st.integers(0, 12).map(lambda tenths: tenths / 10), st.integers(0, 2),
                             st.sampled_from(["renew", "campaign", "campaign", "read_failed"]), st.booleans()),
                   min_size=10, max_size=120),
)
def test_no_two_processes_ever_decide_at_once_and_only_the_newest_epoch_commits(silent_s: list[float],
                                                                                steps: list[Step]) -> None:
    """Three processes run the rules against a compare-and-set record, with time passing
    arbitrarily between their steps, renewals whose acknowledgement is lost, and liveness probes
    answered or not *regardless of whether the holder lives* (lost answers, paused links): the
    holder can be taken over early while it still believes it holds the lease. Still (Rule 6), at
    no moment do two processes decide, and (Rule 4) a fenced commit lands only with the newest
    epoch: each process commits whenever it believes it holds the lease."""
    configs = [rules.LeaseConfig(lease_duration_s=3.0, renew_deadline_s=2.5, retry_period_s=0.4, holder_silent_s=s)
               for s in silent_s]
    record: dict[str, tuple[int, rules.LeaseRecord | None]] = {"lease": (0, None), "fence": (0, None)}
    seq = 0
    held: list[rules.Held | None] = [None, None, None]
    observed: list[rules.Observed | None] = [None, None, None]
    newest_epoch = 0
    now = 0.0
    for dt, who, action, flag in steps:
        now += dt
        cfg = configs[who]
        lease_revision, lease_value = record["lease"]
        h = held[who]
        if h is not None and not rules.still_leading(h, now, cfg):
            held[who] = h = None  # past its deadline: stopped
        if h is not None:
            # a leader that believes it holds the lease commits a fenced write: it lands only if
            # the fence is still at its epoch
            if record["fence"][0] == h.epoch:
                assert h.epoch == newest_epoch
            if action == "renew":
                if lease_revision == h.revision:  # our compare-and-set holds
                    seq += 1
                    record["lease"] = (seq, rules.LeaseRecord(holder=str(who), epoch=h.epoch, lease_duration_s=3.0,
                                                              holder_silent_s=cfg.holder_silent_s))
                    if flag:  # acknowledged (else the acknowledgement was lost)
                        held[who] = rules.renewed(h, seq, sent_at=now)
                elif lease_value is None or lease_value.holder != str(who):
                    held[who] = None  # lease taken: stopped
        elif action == "read_failed":
            observed[who] = rules.unsure(observed[who])
        elif action == "campaign":
            o = rules.observe(observed[who], lease_revision, lease_value, now)
            if rules.wants_probe(o, str(who)) and not rules.may_acquire(o, now):
                o = rules.probed(o, answered=flag, sent_at=now)  # the answer: arbitrary
            observed[who] = o
            if rules.may_acquire(o, now) and lease_revision == o.revision:
                seq += 2
                newest_epoch = seq - 1  # the fence's new revision
                record["fence"] = (newest_epoch, None)
                record["lease"] = (seq, rules.LeaseRecord(holder=str(who), lease_duration_s=3.0,
                                                          holder_silent_s=cfg.holder_silent_s))
                held[who] = rules.Held(epoch=newest_epoch, revision=seq, renewed_at=now)
                observed[who] = None
        deciders = [i for i, x in enumerate(held) if x is not None and rules.may_decide(x, now, configs[i])]
        assert len(deciders) <= 1, (now, held)
