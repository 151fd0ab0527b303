"""The lease rules on an injected clock: who may lead, when, and that two never overlap."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.replicated import lease_rules as rules

CFG = rules.LeaseConfig(lease_duration_s=3.0, renew_deadline_s=2.0, retry_period_s=0.4)


def lease(holder: str = "a", duration_s: float = 3.0, released: bool = False) -> rules.LeaseRecord:
    return rules.LeaseRecord(holder=holder, epoch=7, lease_duration_s=duration_s, released=released)


@pytest.mark.parametrize("durations", [(3, 3, 0.4), (3, 2, 2), (2, 3, 0.4), (3, 2, 0), (1, 2, 3)])
def test_config_needs_lease_longer_than_deadline_longer_than_retry(durations: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError, match="lease_duration_s > renew_deadline_s > retry_period_s"):
        rules.LeaseConfig(lease_duration_s=durations[0], renew_deadline_s=durations[1], retry_period_s=durations[2])


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
                               retry_period_s=lease_s * deadline_frac / 2)
    held = rules.Held(epoch=1, revision=9, renewed_at=sent_at)
    seen = rules.observe(None, 9, lease(duration_s=config.lease_duration_s), now=sent_at + seen_delay)
    assert rules.acquire_at(seen) > rules.stop_at(held, config)
    assert not rules.still_leading(held, rules.acquire_at(seen), config)
