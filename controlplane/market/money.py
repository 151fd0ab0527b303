"""Money in integer fen: prices, exact rounding, and splitting a total without losing a fen. Pure.

What this module promises:

- Rule 1: every amount of money is an ``int`` of fen (1 CNY = 100 fen). Floats never carry money;
  a float that reaches a pricing function (a metered duration, an energy estimate) is turned into
  an exact :class:`fractions.Fraction` first, so the same inputs always give the same fen.
- Rule 2: rounding happens **once per priced line**, at the end, **half up** (ties away from zero:
  0.5 fen -> 1 fen, -0.5 fen -> -1 fen). This is 四舍五入, the rule of Chinese invoices and of
  most tariff sheets; banker's rounding is fairer over many ties but surprises a tenant checking
  one line by hand. Intermediate results stay exact rationals.
- Rule 3: :func:`allocate` splits a total into parts that sum to exactly the total (largest
  remainder, ties to the earlier part), whatever the weights: no fen is lost or created.

Prices have units in their names: ``fen_per_mtok`` (fen per million tokens),
``fen_per_card_hour``.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from numbers import Rational

FEN_PER_CNY = 100
TOKENS_PER_PRICE_UNIT = 1_000_000
SECONDS_PER_HOUR = 3600

Fen = int
"""An amount of money in fen (signed: negative is a debit in the ledger)."""


def exact(value: float | int | Fraction | str) -> Fraction:
    """``value`` as an exact rational. A float is taken at its exact binary value; a string as
    written (``"0.1"`` is one tenth).

    Raises:
        ValueError: NaN, an infinity, a bool, or a string that is not a number.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a quantity: {value!r}")
    if isinstance(value, (int, Fraction)):
        return Fraction(value)
    if isinstance(value, Rational):
        return Fraction(value.numerator, value.denominator)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"not a finite quantity: {value!r}")
        return Fraction(value)
    if isinstance(value, str):
        try:
            d = Decimal(value.strip())
        except InvalidOperation:
            raise ValueError(f"not a number: {value!r}") from None
        if not d.is_finite():
            raise ValueError(f"not a finite quantity: {value!r}")
        return Fraction(d)
    raise ValueError(f"not a quantity: {value!r}")


def round_half_up(value: Fraction | int) -> Fen:
    """Round an exact amount of fen to a whole fen, ties away from zero (Rule 2)."""
    q = Fraction(value)
    sign = -1 if q < 0 else 1
    a = abs(q)
    whole, rest = divmod(a.numerator, a.denominator)
    if 2 * rest >= a.denominator:
        whole += 1
    return sign * whole


def fen_from_cny(cny: float | int | Fraction | str) -> Fen:
    """CNY to fen, half up: ``fen_from_cny("12.345") == 1235``; a float at its exact value."""
    return round_half_up(exact(cny) * FEN_PER_CNY)


def cny_text(fen: Fen) -> str:
    """Fen as a CNY string with two decimals, exact: ``cny_text(-1205) == "-12.05"``."""
    _require_fen("fen", fen)
    sign = "-" if fen < 0 else ""
    whole, cents = divmod(abs(fen), FEN_PER_CNY)
    return f"{sign}{whole}.{cents:02d}"


def tokens_exact(tokens: int, fen_per_mtok: int) -> Fraction:
    """Exact fen for ``tokens`` at ``fen_per_mtok`` (not yet rounded)."""
    _require_count("tokens", tokens)
    _require_count("fen_per_mtok", fen_per_mtok)
    return Fraction(tokens * fen_per_mtok, TOKENS_PER_PRICE_UNIT)


def price_tokens(prompt_tokens: int, completion_tokens: int, input_fen_per_mtok: int,
                 output_fen_per_mtok: int) -> Fen:
    """Fen for one line of token usage: input and output priced exactly, rounded once (half up).
    In integers (the exact sum is a whole number of millionths of a fen): this runs for every
    request the budget gate admits, and equals rounding the sum of :func:`tokens_exact`."""
    for name, value in (("tokens", prompt_tokens), ("tokens", completion_tokens),
                        ("fen_per_mtok", input_fen_per_mtok), ("fen_per_mtok", output_fen_per_mtok)):
        _require_count(name, value)
    whole, rest = divmod(prompt_tokens * input_fen_per_mtok + completion_tokens * output_fen_per_mtok,
                         TOKENS_PER_PRICE_UNIT)
    return whole + (1 if 2 * rest >= TOKENS_PER_PRICE_UNIT else 0)


def card_time_exact(cards: int, seconds: float | int | Fraction, fen_per_card_hour: int) -> Fraction:
    """Exact fen for ``cards`` held ``seconds`` at ``fen_per_card_hour`` (not yet rounded)."""
    _require_count("cards", cards)
    _require_count("fen_per_card_hour", fen_per_card_hour)
    s = exact(seconds)
    if s < 0:
        raise ValueError(f"seconds must be >= 0, got {seconds!r}")
    return cards * s * fen_per_card_hour / SECONDS_PER_HOUR


def price_card_time(cards: int, seconds: float | int | Fraction, fen_per_card_hour: int) -> Fen:
    """Fen for ``cards`` held ``seconds`` at a flat ``fen_per_card_hour``, rounded once (half up)."""
    return round_half_up(card_time_exact(cards, seconds, fen_per_card_hour))


def allocate(total: Fen, weights: Sequence[int | Fraction]) -> list[Fen]:
    """Split ``total`` fen in proportion to ``weights``; the parts sum to ``total`` exactly.

    Largest remainder (Hamilton): each part gets the floor of its exact share, and the fen left
    over go one each to the parts with the largest fractional remainders (ties: earlier part).
    A negative total is split as the negation of splitting its absolute value, so a refund mirrors
    its charge.

    Raises:
        ValueError: no weights, a negative weight, or all weights zero while ``total`` is not zero.
    """
    _require_fen("total", total)
    if not weights:
        raise ValueError("allocate needs at least one weight")
    ws = [Fraction(w) for w in weights]
    if any(w < 0 for w in ws):
        raise ValueError(f"weights must be >= 0, got {list(weights)!r}")
    wsum = sum(ws, Fraction(0))
    if wsum == 0:
        if total == 0:
            return [0] * len(ws)
        raise ValueError("cannot allocate a non-zero total over weights that are all zero")
    if total < 0:
        return [-p for p in allocate(-total, weights)]
    shares = [total * w / wsum for w in ws]
    parts = [s.numerator // s.denominator for s in shares]
    left = total - sum(parts)
    order = sorted(range(len(ws)), key=lambda i: (-(shares[i] - parts[i]), i))
    for i in order[:left]:
        parts[i] += 1
    return parts


def basis_points(total: Fen, bp: int) -> Fen:
    """``bp``/10,000 of ``total``, half up (a commission or a share)."""
    _require_count("bp", bp)
    if bp > 10_000:
        raise ValueError(f"bp must be <= 10000, got {bp}")
    _require_fen("total", total)
    return round_half_up(Fraction(total * bp, 10_000))


def _require_fen(name: str, value: object) -> None:
    if type(value) is not int:  # noqa: E721 - bool is not money
        raise ValueError(f"{name} must be an int of fen, got {value!r}")


def _require_count(name: str, value: object) -> None:
    if type(value) is not int or value < 0:  # noqa: E721
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
