"""core.feasibility: a job no declared pool could ever run is named with the field to blame; and the
job feed's progress marks (a pure rule)."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.core import feasibility, placement
from controlplane.services.job_feed import progress_marks


def pool(id: str, cards: dict[str, int], *, region: str = "east", provider: str = "op", tee: bool = False,
         healthy: bool = True, free: dict[str, int] | None = None) -> placement.Pool:
    return placement.Pool(id=id, region=region, provider=provider, tee=tee, healthy=healthy, cards_total=cards,
                          cards_free=cards if free is None else free, executors=frozenset())


def job(**kw: Any) -> placement.JobSpec:
    base: dict[str, Any] = dict(id="j", tenant="t", cards=8, accelerators=("A800",), est_hours=1.0)
    base.update(kw)
    return placement.JobSpec(**base)


POOLS = [
    pool("big", {"A800": 64, "910B": 32}, region="east", tee=True),
    pool("west", {"A800": 16, "L20": 4}, region="west", provider="third"),
    pool("tiny", {"910B": 4}, region="south"),
]


@pytest.mark.parametrize(("kw", "field", "words"), [
    (dict(cards=100), "cards", "64 A800 cards in all"),
    (dict(accelerators=("H20",)), "accelerators", "no H20 cards"),
    (dict(cards=4, accelerators=("L20",), regions=("east",)), "regions", "west: region west not allowed"),
    (dict(cards=4, accelerators=("910B",), regions=("south",), tee=True), "tee", "no TEE"),
    (dict(cards=16, providers=("third",), regions=("east",)), "providers", "big: provider op not allowed"),
])
def test_a_job_no_pool_could_ever_hold_names_the_field_it_fails_on(kw: dict[str, Any], field: str, words: str) -> None:
    never = feasibility.never_fits(job(**kw), POOLS)
    assert never is not None and never.field == field, never
    assert words in never.reason and "no declared site can ever run" in never.reason


@pytest.mark.parametrize("kw", [
    dict(cards=64),                                           # the whole of one pool
    dict(cards=32, accelerators=("H20", "910B")),             # a later preference fits
    dict(cards=4, accelerators=("910B",), regions=("south",)),
    dict(cards=16, tee=True),
])
def test_a_job_one_pool_could_hold_once_idle_is_accepted(kw: dict[str, Any]) -> None:
    assert feasibility.never_fits(job(**kw), POOLS) is None


def test_state_that_changes_never_refuses_a_job() -> None:
    # Down, busy and executor-less pools hold the job later: it waits, it is not refused.
    pools = [pool("down", {"A800": 64}, healthy=False, free={"A800": 0})]
    assert feasibility.never_fits(job(cards=64, workload="container"), pools) is None


def test_no_declared_pool_at_all_is_a_refusal() -> None:
    assert feasibility.never_fits(job(), []) is not None


def test_any_accelerator_means_those_some_pool_could_run_it_on() -> None:
    j = job(cards=8, accelerators=("A800", "H20", "910B", "L20"))
    assert feasibility.fitting_accelerators(j, POOLS) == ["A800", "910B"]


def test_the_refusal_lists_the_closest_pools_first_and_counts_the_rest() -> None:
    pools = [pool(f"p{i}", {"910B": 4}) for i in range(10)] + [pool("near", {"A800": 4})]
    never = feasibility.never_fits(job(cards=8), pools)
    assert never is not None and never.field == "cards"
    assert never.reason.index("near:") < never.reason.index("p0:") and "and 5 more" in never.reason


def test_progress_marks_fire_once_per_step_and_leave_the_end_to_the_exit() -> None:
    key = ("j", 1)
    assert progress_marks({}, {key: 0.04}, 0.05) == {}
    assert progress_marks({}, {key: 0.05}, 0.05) == {key: 0.05}
    assert progress_marks({key: 0.05}, {key: 0.09}, 0.05) == {}
    assert progress_marks({key: 0.05}, {key: 0.31}, 0.05) == {key: 0.3}   # a jump: one mark, the last step
    assert progress_marks({key: 0.95}, {key: 1.0}, 0.05) == {}            # 100 % is attempt_exited's
    assert progress_marks({}, {key: float("nan")}, 0.05) == {}
