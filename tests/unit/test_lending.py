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
    # 06:30: lending 28 would last 15 min; only the 4 cards the forecast never needs are offered.
    offers, notes = lending.offers(MIDNIGHT + 6.5 * H, [site()], min_lend_s=3600.0)
    assert [(o.cards, o.until) for o in offers] == [(4, MIDNIGHT + 6.5 * H + 24 * H)]
    assert "none within the horizon" in offers[0].reason
    offers, notes = lending.offers(MIDNIGHT + 6.5 * H, [site(need_by_hour=[4.0] * 7 + [32.0] * 17)], min_lend_s=3600.0)
    assert not offers and "inference needs its cards in 30 min" in notes[0]
    offers, notes = lending.offers(MIDNIGHT + 1 * H, [site(held={"H20": 32.0})])
    assert not offers and "no idle cards" in notes[0]
    offers, notes = lending.offers(MIDNIGHT + 12 * H, [site()])  # daytime: only what the peak leaves
    assert [o.cards for o in offers] == [4]


def test_a_site_lends_fewer_cards_rather_than_none_as_the_ramp_nears() -> None:
    # need rises by 4 cards an hour from 03:00 local: the later it is, the fewer cards last an hour.
    need = [4.0] * 3 + [4.0 + 4 * (h - 2) for h in range(3, 24)]
    at_1, _ = lending.offers(MIDNIGHT + 1 * H, [site(need_by_hour=need)], margin_s=0.0)
    at_5, _ = lending.offers(MIDNIGHT + 5 * H, [site(need_by_hour=need)], margin_s=0.0)
    assert (at_1[0].cards, at_1[0].until) == (28, MIDNIGHT + 3 * H)  # all idle cards last 2 h (03:00 needs 8)
    # 05:00 needs 16 now and 20 at 06:00: 16 cards stay, 16 are lent for the hour left
    assert (at_5[0].cards, at_5[0].until) == (16, MIDNIGHT + 6 * H)
    # never more than the idle cards, and the forecast is met in every hour of the offer
    for o in at_1 + at_5:
        assert o.cards <= 28


def test_lent_cards_are_reclaimed_before_the_hour_that_needs_them() -> None:
    lent = site(lent={"H20": 20}, held={"H20": 4.0})
    assert lending.reclaim_at(MIDNIGHT + 1 * H, lent, margin_s=900.0) == MIDNIGHT + 7 * H - 900.0
    assert lending.reclaim_at(MIDNIGHT + 1 * H, site(), margin_s=900.0) is None  # nothing lent
    # a forecast from a declared profile: the peak hour needs the whole site
    need = lending.profile_need([1.0] * 12 + [2.0] * 12, 32.0)
    assert need[0] == 16.0 and need[23] == 32.0


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


RULES = lending.Rules(profile=[1.0] * 7 + [4.0] * 17, margin_s=900.0, min_lend_s=3600.0)
"""Inference may need a quarter of an edge's cards at night and all of them from 07:00 local."""


def test_decide_stops_due_gangs_first_then_offers_what_is_idle() -> None:
    holding = lending.Holding(site="e1", cards={"H20": 8}, held={"H20": 1.0})
    gang = lending.Attempt(job_id="j1", attempt=2, site="e1", accelerator="H20", cards=4, checkpoint_s=300.0)
    night = lending.decide(MIDNIGHT + 1 * H, [holding], [gang], RULES)
    # 1 held + 4 lent, 3 idle. Offers keep the night's need (2 cards) and the held replica grown with
    # headroom towards 07:00 (1 x 4 x 1.5 = 6 during 06:00-07:00): 2 cards, until 05:45. The gang
    # lent before is reclaimed by the forecast without headroom (hysteresis): 07:00 needs more than
    # the 4 it leaves, so its cards are back by 06:45 and its stop falls due 300 s + 60 s before.
    assert [(o.cards, o.until) for o in night.offers] == [(2, MIDNIGHT + 5.75 * H)]
    assert not night.stops and night.wake == MIDNIGHT + 6.75 * H - 360.0
    due = lending.decide(night.wake, [holding], [gang], RULES)
    assert [(s.job_id, s.attempt) for s in due.stops] == [("j1", 2)]
    # a site reclaiming lends nothing meanwhile (Rule 5); once the gang has exited, what is left
    # lasts under an hour, so nothing is offered either
    assert not due.offers and due.notes == ["e1: reclaiming its lent H20 cards, lends none"]
    after = lending.decide(night.wake + 300.0, [holding], [], RULES)
    assert not after.offers and "inference needs its cards" in after.notes[0]


def test_lent_pools_show_only_the_offered_cards() -> None:
    from controlplane.core import placement

    pools = [placement.Pool(id="e1", cards_total={"H20": 8}, cards_free={"H20": 7}),
             placement.Pool(id="h1", cards_total={"A800": 8}, cards_free={"A800": 8})]
    plan = lending.decide(MIDNIGHT + 1 * H, [lending.Holding(site="e1", cards={"H20": 8}, held={"H20": 1.0})], [], RULES)
    shown = {p.id: p.cards_free for p in lending.lend_pools(pools, plan, {"e1"})}
    # 7 free by the heartbeat, 6 offered (2 stay for the night's need until 05:45); the hub is not lent
    assert shown == {"e1": {"H20": 6}, "h1": {"A800": 8}}
    day = lending.decide(MIDNIGHT + 12 * H, [lending.Holding(site="e1", cards={"H20": 8}, held={"H20": 1.0})], [], RULES)
    assert {p.id: p.cards_free for p in lending.lend_pools(pools, day, {"e1"})}["e1"] == {"H20": 0}


def test_the_types_inference_keeps_first_meet_the_forecast_and_the_others_are_lent_whole() -> None:
    """Rule 6: an edge of 16 L20 and 16 H20 (a replica holds 2 H20). Alone, each type keeps a
    quarter of its cards for the night (the profile's share) and lends 12; with H20 kept for
    inference first, the H20 cards cover the site's whole night forecast (8 cards, 12 at 06:00 with
    the replica grown), so all 16 L20 are lent until 06:45, and no H20 is offered."""
    holding = lending.Holding(site="e1", cards={"L20": 16, "H20": 16}, held={"H20": 2.0})
    per_type = lending.decide(MIDNIGHT + 1 * H, [holding], [], RULES)
    assert sorted((o.accelerator, o.cards, o.until) for o in per_type.offers) == [
        ("H20", 12, MIDNIGHT + 5.75 * H), ("L20", 12, MIDNIGHT + 6.75 * H)]
    rules = lending.Rules(profile=RULES.profile, margin_s=900.0, min_lend_s=3600.0, inference_first=("H20",))
    first = lending.decide(MIDNIGHT + 1 * H, [holding], [], rules)
    assert [(o.accelerator, o.cards, o.until) for o in first.offers] == [("L20", 16, MIDNIGHT + 6.75 * H)]
    # By day the site needs all 32: 16 H20 and every L20; an L20 gang lent at night is reclaimed
    # before 07:00 as before.
    assert not lending.decide(MIDNIGHT + 12 * H, [holding], [], rules).offers
    gang = lending.Attempt(job_id="j1", attempt=1, site="e1", accelerator="L20", cards=16, checkpoint_s=300.0)
    assert lending.decide(MIDNIGHT + 1 * H, [holding], [gang], rules).wake == MIDNIGHT + 6.75 * H - 360.0
