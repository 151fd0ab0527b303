"""Token buckets: burst, steady rate, Retry-After, bounded memory (pure, hypothesis where a law exists)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.core.ratelimit import TokenBuckets, retry_after_header


def test_burst_then_refused_with_the_wait_until_the_next_token() -> None:
    tb = TokenBuckets(rate_per_s=2, burst=3)
    assert [tb.take("t1", now=100.0)[0] for _ in range(3)] == [True, True, True]
    allowed, retry_s = tb.take("t1", now=100.0)
    assert not allowed and retry_s == pytest.approx(0.5)
    assert tb.take("t1", now=100.49) == (False, pytest.approx(0.01))
    assert tb.take("t1", now=100.5) == (True, 0.0)
    assert "allowed=4 refused=2" in repr(tb)


def test_keys_do_not_share_a_bucket() -> None:
    tb = TokenBuckets(rate_per_s=1, burst=1)
    assert tb.take("a", 0.0)[0] and tb.take("b", 0.0)[0]
    assert not tb.take("a", 0.0)[0]


def test_cost_and_per_key_limits() -> None:
    tb = TokenBuckets(rate_per_s=1, burst=10)
    assert tb.take("big", 0.0, cost=10)[0]
    assert tb.take("big", 0.0, cost=4) == (False, pytest.approx(4.0))
    # A tenant on a bigger plan: its own rate and burst.
    assert all(tb.take("gold", 0.0, rate_per_s=100, burst=50)[0] for _ in range(50))
    assert tb.take("gold", 0.0, rate_per_s=100, burst=50) == (False, pytest.approx(0.01))


@pytest.mark.parametrize("kwargs, message", [
    ({"cost": 0}, "cost must be > 0"), ({"cost": 11}, "exceeds the burst"), ({"rate_per_s": 0}, "rate_per_s"),
])
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=message):
        TokenBuckets(rate_per_s=1, burst=10).take("k", 0.0, **kwargs)


def test_bad_limits_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="burst"):
        TokenBuckets(rate_per_s=1, burst=0.5)
    with pytest.raises(ValueError, match="max_keys"):
        TokenBuckets(rate_per_s=1, burst=1, max_keys=0)


def test_clock_stepping_back_neither_refills_nor_breaks() -> None:
    tb = TokenBuckets(rate_per_s=1, burst=1)
    assert tb.take("k", 100.0)[0]
    assert not tb.take("k", 50.0)[0]      # earlier clock: no refund
    assert not tb.take("k", 100.5)[0]     # and the bucket did not move backwards
    assert tb.take("k", 101.0)[0]


def test_idle_buckets_are_evicted_and_memory_is_capped() -> None:
    tb = TokenBuckets(rate_per_s=10, burst=10, max_keys=1000)
    for i in range(500):
        tb.take(f"t{i}", now=0.0)
    assert len(tb) == 500
    tb.take("late", now=10.0)  # every other bucket is full again by now: as good as absent
    assert len(tb) == 1
    for i in range(5000):
        tb.take(f"u{i}", now=20.0)
    assert len(tb) <= 1001


def test_retry_after_header_is_whole_seconds_rounded_up() -> None:
    assert [retry_after_header(s) for s in (0.0, 0.01, 1.0, 1.2, 59.99)] == ["1", "1", "1", "2", "60"]


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(0.5, 50), burst=st.integers(1, 20),
    steps=st.lists(st.tuples(st.floats(0, 2), st.sampled_from([1, 1, 1, 2, 3])), min_size=1, max_size=200),
)
def test_never_more_than_burst_plus_rate_times_time(rate: float, burst: int, steps: list[tuple[float, int]]) -> None:
    tb = TokenBuckets(rate_per_s=rate, burst=burst)
    now, spent = 0.0, 0.0
    for dt, cost in steps:
        now += dt
        if cost > burst:
            continue
        allowed, retry_s = tb.take("k", now, cost)
        if allowed:
            spent += cost
        else:
            assert retry_s > 0
            # Waiting exactly what it said is enough (nobody else spends this key's tokens).
            assert tb.peek("k", now + retry_s) >= cost - 1e-6
        assert spent <= burst + rate * now + 1e-6
