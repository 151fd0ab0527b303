"""The training policy of issue 15 item 4, as pure plans: a job waits for a cheaper tariff window only
when it asked to (``prefer: cost``), its deadline (if any) allows it AND waiting beats starting now at
the best pool that can start it by the threshold; every wait has a reason of a known kind; backfill
keeps the cards busy while the head waits."""

from __future__ import annotations

import msgspec
import pytest

from controlplane.core import placement as pl
from controlplane.core import scheduler as sc
from tests.unit.test_scheduler import NOW, H, job, plan, pool, running, starts, tariff, waits

TOU = tariff(0.7, peak=1.2, valley=0.3)
"""10:00 local is a peak hour (1.2 CNY/kWh); the valley (0.3) starts at midnight, 14 h away."""


def test_a_job_without_a_deadline_starts_now_on_free_cards_rather_than_waiting_for_the_valley() -> None:
    p = plan([pool("tou", tariff=TOU)], [job("plain")])
    assert starts(p) == {"plain": "tou"} and p.start[0].start_at == NOW and not p.wait


def test_a_cost_first_job_without_a_deadline_waits_and_says_why_and_how_much() -> None:
    (w,) = plan([pool("tou", tariff=TOU)], [job("thrifty", prefer="cost")]).wait
    assert w.until == NOW + 14 * H and w.pool == "tou" and w.kind == "tariff"
    assert w.reason.startswith("waits 14.0 h for a cheaper tariff window at tou: saves ")
    assert "(68%) against starting now at tou" in w.reason  # 10:00-14:00 averages 0.95 CNY/kWh; the valley 0.3
    assert "threshold 20%; cost-first" in w.reason


def test_a_cost_first_job_with_deadline_slack_waits_naming_the_saving_and_the_rule() -> None:
    (w,) = plan([pool("tou", tariff=TOU)], [job("patient", deadline=NOW + 40 * H, prefer="cost")]).wait
    assert w.kind == "tariff" and w.until == NOW + 14 * H
    assert "against starting now at tou" in w.reason and "cost-first, its deadline allows it" in w.reason
    # A deadline too close for the valley: it starts now, whatever it asked.
    p = plan([pool("tou", tariff=TOU)], [job("tight", deadline=NOW + 6 * H, prefer="cost")])
    assert starts(p) == {"tight": "tou"} and p.start[0].start_at == NOW


@pytest.mark.parametrize("prefer", ["time", None])
def test_a_job_not_cost_first_never_waits_even_with_a_deadline_that_would_allow_it(prefer: str | None) -> None:
    p = plan([pool("tou", tariff=TOU)], [job("hurry", deadline=NOW + 40 * H, prefer=prefer)])
    assert starts(p) == {"hurry": "tou"} and p.start[0].start_at == NOW


def test_waiting_must_beat_the_best_pool_that_can_start_now_by_the_threshold() -> None:
    """The valley at ``tou`` (0.3) is cheaper than ``flat`` now (0.33), but by 9%, under the 20%
    threshold: the job starts now at ``flat``. The old rule compared each pool with itself and waited."""
    pools = [pool("tou", tariff=TOU), pool("flat", price=0.33)]
    p = plan(pools, [job("patient", deadline=NOW + 40 * H, prefer="cost")])
    assert starts(p) == {"patient": "flat"} and p.start[0].start_at == NOW
    # With no threshold the valley wins again: the saving is real, just small.
    free_model = msgspec.structs.replace(pl.DEFAULT_MODEL, min_wait_saving=0.0)
    (w,) = plan(pools, [job("patient", deadline=NOW + 40 * H, prefer="cost")], model=free_model).wait
    assert w.pool == "tou" and "against starting now at flat" in w.reason and "(9%)" in w.reason


def test_the_threshold_is_the_hubs_config_field_in_percent() -> None:
    from controlplane.config import HubConfig

    assert HubConfig().training_min_wait_saving_pct == 20.0 == pl.DEFAULT_MODEL.min_wait_saving * 100
    with pytest.raises(msgspec.ValidationError, match="training_min_wait_saving_pct"):
        msgspec.convert({"training_min_wait_saving_pct": 150}, HubConfig)


def test_every_wait_has_a_reason_of_a_known_kind() -> None:
    tenants = {"capped": sc.Tenant(id="capped", quota_cards=8)}
    p = plan(
        [pool("p1", cards=64, free=16, tariff=TOU), pool("dear", cards=8, price=0.9)],
        [job("head", cards=64, submitted_at=0), job("long", cards=16, est_hours=10.0, submitted_at=1),
         job("thrifty", prefer="cost", submitted_at=2), job("over", tenant="capped", submitted_at=3),
         job("capped-price", cards=8, max_price_cny=0.01, submitted_at=4)],
        running=[running("r", cards=48, expected_end_at=NOW + 2 * H), running("c", tenant="capped", pool="x")],
        tenants=tenants,
    )
    kinds = {w.job_id: w.kind for w in p.wait}
    assert kinds == {"head": "reserved", "long": "blocked", "thrifty": "tariff", "over": "quota",
                     "capped-price": "price"}
    assert all(w.reason for w in p.wait)
    assert sc.wait_kind("no pool has 8 free A800 cards") == "cards"
    assert sc.wait_kind("p1: would delay h, which has it reserved at 9; p2: expected 3.00 CNY, over max_price 1.00") \
        == "blocked"
    # Not a wait's reason (the lifecycle's, after a requeue): the next wait is news for the events.
    assert sc.wait_kind("stopped: preempted") == sc.wait_kind("") == ""
    assert sc.wait_topic("") != sc.wait_topic("cards")
    # The job's events tell waiting for cards (whichever way) from the other kinds.
    assert {sc.wait_topic(k) for k in ("cards", "reserved", "blocked")} == {"capacity"}
    assert len({sc.wait_topic(k) for k in ("tariff", "quota", "preempting", "price", "cards")}) == 5


# --------------------------------------------------------------------------- backfill


def test_backfill_starts_a_small_job_that_ends_before_the_heads_reservation_and_not_one_that_would_delay_it() -> None:
    p = plan(
        [pool("p1", cards=64, free=16)],
        [job("head", cards=64, submitted_at=0), job("delays", cards=16, est_hours=3.0, submitted_at=1),
         job("fits", cards=16, est_hours=1.0, submitted_at=2)],
        running=[running("r", cards=48, expected_end_at=NOW + 2 * H)],
    )
    assert p.reservation is not None and p.reservation.at == NOW + 2 * H
    assert starts(p) == {"fits": "p1"}
    assert "would delay head" in waits(p)["delays"]
    s = p.start[0]
    assert s.start_at + s.breakdown.run_s <= p.reservation.at


def test_cards_stay_busy_while_the_head_waits_for_a_tariff_window_or_its_quota() -> None:
    """A waiting job holds nothing: the next jobs take the free cards now."""
    tenants = {"capped": sc.Tenant(id="capped", quota_cards=8)}
    p = plan([pool("tou", cards=16, tariff=TOU)],
             [job("thrifty", cards=16, prefer="cost", submitted_at=0), job("over", tenant="capped", submitted_at=1),
              job("next", cards=16, submitted_at=2)],
             running=[running("c", tenant="capped", pool="elsewhere")], tenants=tenants)
    assert {w.job_id: w.kind for w in p.wait} == {"thrifty": "tariff", "over": "quota"}
    assert starts(p) == {"next": "tou"}
