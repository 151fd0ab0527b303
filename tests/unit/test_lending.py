"""lending: offers before the morning ramp, reclaim with the checkpoint first (known answers)."""

from __future__ import annotations

from controlplane.core import lending

# 2026-11-23 00:00 local (UTC+8) = 2026-11-22 16:00 UTC.
MIDNIGHT = 1795363200.0
H = 3600.0
# An edge site of 32 cards: inference needs 4 cards at night, 28 from 07:00 local.
NEED = [4.0] * 7 + [28.0] * 17


def site(**kw: object) -> lending.Site:
    base: dict[str, object] = dict(id="sh-edge", cards={"H20": 32}, held={"H20": 4.0}, need_by_hour=NEED)
    base.update(kw)
    return lending.Site(**base)  # type: ignore[arg-type]


def test_idle_cards_are_offered_until_before_the_morning_ramp() -> None:
    offers, notes = lending.offers(MIDNIGHT + 1 * H, [site()], margin_s=900.0)
    assert not notes
    (o,) = offers
    assert (o.site, o.accelerator, o.cards) == ("sh-edge", "H20", 28)
    assert o.until == MIDNIGHT + 7 * H - 900.0  # 15 min before 07:00 local
    assert "local hour 7" in o.reason


def test_no_offer_when_the_ramp_is_too_close_or_cards_are_busy() -> None:
    offers, notes = lending.offers(MIDNIGHT + 6.5 * H, [site()], min_lend_s=3600.0)
    assert not offers and "inference needs its cards" in notes[0]
    offers, notes = lending.offers(MIDNIGHT + 1 * H, [site(held={"H20": 32.0})])
    assert not offers and "no idle cards" in notes[0]
    offers, notes = lending.offers(MIDNIGHT + 12 * H, [site()])  # daytime: the need is there now
    assert not offers


def test_lent_attempts_checkpoint_and_stop_before_the_reclaim() -> None:
    reclaim = MIDNIGHT + 7 * H - 900.0
    lent = [lending.Lent(job_id="j1", attempt=3, site="sh-edge", cards=8, checkpoint_s=300.0, reclaim_at=reclaim)]
    stops, wake = lending.reclaims(MIDNIGHT + 5 * H, lent, margin_s=60.0)
    assert not stops and wake == reclaim - 300.0 - 60.0
    stops, _ = lending.reclaims(wake, lent, margin_s=60.0, restart_hint={"j1": "zj-regional"})
    (s,) = stops
    assert (s.job_id, s.attempt, s.restart_hint) == ("j1", 3, "zj-regional")
    # Checkpoint first: the stop leaves the checkpoint time before the cards are reclaimed.
    assert s.at + 300.0 < reclaim
