"""Pool owners' offers: a price per card-hour by accelerator, by time-of-use window. Pure.

What this module promises:

- Rule 1: an :class:`Offer` is one pool owner's (the operator's or a third-party provider's)
  price for one accelerator at one pool, in integer fen per card-hour, with optional time-of-use
  :class:`Window` prices in China local hours (UTC+8, as ``topology.layout``), a minimum lease and
  a validity interval. :func:`offer_problem` names what is wrong with one (overlapping windows,
  bad hours, a negative price).
- Rule 2: the price of a lease is the exact integral of the hourly price over the billed window,
  times the cards, rounded **once** half up (``money`` Rule 2). A window shorter than the offer's
  ``min_lease_s`` is billed as ``min_lease_s`` from its start.
- Rule 3: energy is not re-derived here: :func:`margin_over_energy` takes the energy cost from
  ``placement.metered_energy_cny`` (the same figure metering bills), so the provider's margin over
  energy and placement's explanation agree.
- Rule 4: an offer's ``provider`` is the provider the operator declared for its pool (in the layout
  or ``PUT /v1/sites/{site}``); a pool declared without one is the operator's own.
  :func:`provider_problem` names a mismatch (a 422 naming ``provider``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fractions import Fraction

import msgspec

from controlplane.core import placement
from controlplane.market import money

LOCAL_UTC_OFFSET_S = 8 * 3600
"""Offer hours are China local time (UTC+8, no daylight saving), as ``topology.layout.local_hour``."""


class Window(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A time-of-use price: local hours ``[start_hour, end_hour)``; wraps midnight when end <= start
    (``22 -> 6`` is the night). ``0 -> 0`` would be the whole day: use the offer's base price."""

    start_hour: int
    end_hour: int
    fen_per_card_hour: int


class Offer(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One owner's price for one accelerator at one pool."""

    id: str
    pool: str
    provider: str
    """The pool owner: a third-party provider id, or the operator's own provider id."""
    accelerator: str
    fen_per_card_hour: int
    """Price outside any window."""
    windows: tuple[Window, ...] = ()
    min_lease_s: int = 0
    valid_from: float = 0.0
    valid_until: float | None = None
    """Epoch seconds; None: until withdrawn."""

    def hours(self) -> tuple[int, ...]:
        """The 24 hourly prices (fen per card-hour, local hours 0..23)."""
        table = [self.fen_per_card_hour] * 24
        for w in self.windows:
            for h in _window_hours(w):
                table[h] = w.fen_per_card_hour
        return tuple(table)


class Margin(msgspec.Struct, frozen=True, kw_only=True):
    """What a lease earns its owner over the energy the cards draw."""

    price_fen: int
    energy_fen: int
    margin_fen: int
    """price − energy; negative when the offer is below the energy cost of the window."""


def _window_hours(w: Window) -> list[int]:
    if w.end_hour > w.start_hour:
        return list(range(w.start_hour, w.end_hour))
    return list(range(w.start_hour, 24)) + list(range(0, w.end_hour))


def offer_problem(offer: Offer) -> str | None:
    """What is wrong with an offer (naming the field), or None."""
    for name in ("fen_per_card_hour", "min_lease_s"):
        value = getattr(offer, name)
        if type(value) is not int or value < 0:  # noqa: E721
            return f"{name} must be a non-negative int, got {value!r}"
    if not offer.pool or not offer.provider or not offer.accelerator:
        return "pool, provider and accelerator must be named"
    if offer.valid_until is not None and not offer.valid_until > offer.valid_from:
        return f"valid_until must be after valid_from, got {offer.valid_until!r} <= {offer.valid_from!r}"
    seen: dict[int, int] = {}
    for i, w in enumerate(offer.windows):
        for name in ("start_hour", "end_hour"):
            value = getattr(w, name)
            if type(value) is not int or not 0 <= value <= 23:  # noqa: E721
                return f"windows[{i}].{name} must be an hour 0..23, got {value!r}"
        if w.start_hour == w.end_hour:
            return f"windows[{i}] is empty or the whole day: put a whole-day price in fen_per_card_hour"
        if type(w.fen_per_card_hour) is not int or w.fen_per_card_hour < 0:  # noqa: E721
            return f"windows[{i}].fen_per_card_hour must be a non-negative int, got {w.fen_per_card_hour!r}"
        for h in _window_hours(w):
            if h in seen:
                return f"windows[{i}] overlaps windows[{seen[h]}] at local hour {h}"
            seen[h] = i
    return None


def provider_problem(offer: Offer, declared: str, operator: str = "cpn-operator") -> str | None:
    """What is wrong with ``offer.provider`` when the operator declared ``declared`` the provider of
    its pool ("" = nobody, so the operator's own pool), or None."""
    owner = declared or operator
    if offer.provider != owner:
        return (f"provider {offer.provider!r} does not own pool {offer.pool}: the operator declared {owner!r} "
                "its provider (an offer is published for the pool's declared provider)")
    return None


def valid_at(offer: Offer, now: float) -> bool:
    """True if the offer is in force at ``now``."""
    return offer.valid_from <= now and (offer.valid_until is None or now < offer.valid_until)


def select(offers: Iterable[Offer], pool: str, accelerator: str, now: float) -> Offer | None:
    """The offer in force at ``now`` for ``accelerator`` at ``pool``: the newest (latest
    ``valid_from``, then highest id) supersedes older ones; None if there is none."""
    best: Offer | None = None
    for o in offers:
        if o.pool == pool and o.accelerator == accelerator and valid_at(o, now):
            if best is None or (o.valid_from, o.id) > (best.valid_from, best.id):
                best = o
    return best


def billed_end(offer: Offer, start_at: float, end_at: float) -> float:
    """End of the billed window: at least ``min_lease_s`` after the start."""
    return max(end_at, start_at + offer.min_lease_s)


def _integral(table: Sequence[int], cum: Sequence[int], t: Fraction) -> Fraction:
    """∫ price dt from the epoch to ``t`` (epoch s), in fen per card (prices per card-hour × hours)."""
    hours = (t + LOCAL_UTC_OFFSET_S) / 3600
    day, rem = divmod(hours, 24)
    h = int(rem)
    return day * cum[24] + cum[h] + (rem - h) * table[h]


def lease_exact(offer: Offer, cards: int, start_at: float, end_at: float) -> Fraction:
    """Exact fen for ``cards`` leased over ``[start_at, end_at]`` (min lease applied), unrounded.

    Raises:
        ValueError: a negative card count or an end before the start.
    """
    if type(cards) is not int or cards < 0:  # noqa: E721
        raise ValueError(f"cards must be a non-negative int, got {cards!r}")
    if end_at < start_at:
        raise ValueError(f"end_at {end_at!r} is before start_at {start_at!r}")
    table = offer.hours()
    cum = [0]
    for p in table:
        cum.append(cum[-1] + p)
    t0 = money.exact(start_at)
    t1 = money.exact(billed_end(offer, start_at, end_at))
    return cards * (_integral(table, cum, t1) - _integral(table, cum, t0))


def lease_price(offer: Offer, cards: int, start_at: float, end_at: float) -> money.Fen:
    """Fen for ``cards`` leased over ``[start_at, end_at]`` at ``offer`` (Rule 2)."""
    return money.round_half_up(lease_exact(offer, cards, start_at, end_at))


def energy_fen(pool: placement.Pool, accelerator: str, cards: int, start_at: float, end_at: float) -> money.Fen:
    """Energy cost of the cards over the window, from placement's own metering, in fen (half up)."""
    return money.fen_from_cny(placement.metered_energy_cny(pool, accelerator, cards, start_at, end_at))


def margin_over_energy(offer: Offer, pool: placement.Pool, cards: int, start_at: float, end_at: float) -> Margin:
    """The owner's margin over energy for a lease (energy over the window the cards actually run)."""
    price = lease_price(offer, cards, start_at, end_at)
    energy = energy_fen(pool, offer.accelerator, cards, start_at, end_at)
    return Margin(price_fen=price, energy_fen=energy, margin_fen=price - energy)
