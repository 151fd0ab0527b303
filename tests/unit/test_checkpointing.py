"""Young/Daly maths against the published examples and the waste curve it minimises."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.core import checkpointing as ck

MIN, HOUR = 60.0, 3600.0


@pytest.mark.parametrize(
    ("mtbf_h", "want_min"),
    [(24.0, 117.0), (6.0, 57.0)],  # REFERENCE.md: C = 5 min, M = 24 h -> 117 min; M = 6 h -> 57 min
)
def test_daly_matches_published_examples(mtbf_h: float, want_min: float) -> None:
    assert ck.daly_interval_s(5 * MIN, mtbf_h * HOUR) / MIN == pytest.approx(want_min, abs=0.5)


def test_young_is_sqrt_2cm_and_daly_is_close_when_c_is_small() -> None:
    c, m = 30.0, 100 * HOUR
    assert ck.young_interval_s(c, m) == pytest.approx(math.sqrt(2 * c * m))
    assert ck.daly_interval_s(c, m) == pytest.approx(ck.young_interval_s(c, m), rel=0.01)


def test_daly_caps_at_mtbf_when_checkpoints_cost_more_than_two_mtbf() -> None:
    assert ck.daly_interval_s(3 * HOUR, 1 * HOUR) == 1 * HOUR


def test_job_mtbf_shrinks_with_cards_and_is_infinite_without_failures() -> None:
    one = ck.job_mtbf_s(1e-4, 1)
    assert one == pytest.approx(10_000 * HOUR)
    assert ck.job_mtbf_s(1e-4, 1000) == pytest.approx(one / 1000)
    assert ck.job_mtbf_s(0.0, 64) == math.inf
    assert ck.daly_interval_s(300, math.inf) == math.inf
    assert ck.expected_waste(600, 300, 120, math.inf) == pytest.approx(0.5)
    assert ck.min_waste(300, 120, math.inf) == 0.0


@given(
    c=st.floats(min_value=1.0, max_value=1800.0),
    m_h=st.floats(min_value=2.0, max_value=2000.0),
    r=st.floats(min_value=0.0, max_value=1800.0),
)
def test_young_interval_minimises_the_waste_curve(c: float, m_h: float, r: float) -> None:
    m = m_h * HOUR
    t_star = ck.young_interval_s(c, m)
    w_star = ck.expected_waste(t_star, c, r, m)
    assert w_star == pytest.approx(ck.min_waste(c, r, m), rel=1e-9)
    for factor in (0.5, 0.8, 1.25, 2.0):
        assert ck.expected_waste(t_star * factor, c, r, m) >= w_star


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: ck.job_mtbf_s(-1.0, 8), "failure_rate_per_card_hour"),
        (lambda: ck.job_mtbf_s(1e-4, 0), "cards"),
        (lambda: ck.daly_interval_s(float("nan"), 3600.0), "checkpoint_cost_s"),
        (lambda: ck.young_interval_s(300.0, 0.0), "mtbf_s"),
        (lambda: ck.expected_waste(0.0, 300.0, 60.0, 3600.0), "interval_s"),
        (lambda: ck.min_waste(300.0, -1.0, 3600.0), "restart_s"),
    ],
)
def test_bad_arguments_are_named(call, name: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=name):
        call()


def test_practical_interval_is_clamped_to_floor_and_job_length() -> None:
    assert ck.practical_interval_s(0.0, 10 * HOUR, 5 * HOUR) == 60.0  # zero cost would ask for T = 0
    assert ck.practical_interval_s(300.0, math.inf, 2 * HOUR) == 2 * HOUR  # no failures: at the end
    t = ck.daly_interval_s(300.0, 24 * HOUR)
    assert ck.practical_interval_s(300.0, 24 * HOUR, 100 * HOUR) == pytest.approx(t)


def test_goodput_waste_is_dalys_complete_model() -> None:
    # No failures: only the checkpoints' share; infinite interval and MTBF: nothing.
    assert ck.goodput_waste(600.0, 300.0, 120.0, math.inf) == pytest.approx(0.5)
    assert ck.goodput_waste_unchecked(math.inf, 300.0, 120.0, math.inf) == 0.0
    # Known answer: T = 3,600 s, C = 300 s, R = 600 s, M = 10 h.
    m = 36_000.0
    expected = m * math.exp(600.0 / m) * (math.exp(3900.0 / m) - 1.0) / 3600.0 - 1.0
    assert ck.goodput_waste(3600.0, 300.0, 600.0, m) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.1634, abs=1e-4)
    # Above the first-order waste, and close to it when M is long against T.
    assert ck.goodput_waste(3600.0, 300.0, 600.0, m) > ck.expected_waste(3600.0, 300.0, 600.0, m)
    assert ck.goodput_waste(3600.0, 300.0, 600.0, 1e9) == pytest.approx(
        ck.expected_waste(3600.0, 300.0, 600.0, 1e9), rel=1e-4)
    # A segment that practically never runs through: infinite waste, not an overflow.
    assert ck.goodput_waste(3600.0, 300.0, 600.0, 1.0) == math.inf
    with pytest.raises(ValueError, match="mtbf_s"):
        ck.goodput_waste(3600.0, 300.0, 600.0, -1.0)
