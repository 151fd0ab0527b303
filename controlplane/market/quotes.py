"""Quotes for training jobs: priced placements with a spread, and the charge a quote binds. Pure.

What this module promises:

- Rule 1: a :class:`Quote` lists, per feasible placement (pool × accelerator with an offer in force),
  the start window, the expected price, a spread (``p10_fen``/``p90_fen``) and the quoted maximum
  (``max_fen``), all in integer fen, valid until ``valid_until``. Options are ordered by what the
  tenant pays: meeting the deadline first, then expected price, then pool id. Pools placement
  filtered out, or without an offer, are listed in ``unquoted`` with the reason.
- Rule 2 (the spread): the failure-free duration on the pool is ``base = work × (1 + C/T)``
  (checkpoint overhead). Failures arrive as a Poisson process with mean ``λ = work / M``; each
  costs ``loss = (run_s − base) / λ`` seconds on average, placement's expected loss spread over
  them (≈ ``T/2 + R``; placement's goodput rule uses Daly's complete model, which also counts
  failures during restarts). A duration at quantile q is ``base + n_q × loss`` with ``n_q`` the
  Poisson quantile, so the expected duration (``n = λ``) is placement's ``run_s`` exactly. Each duration is priced over its actual
  time-of-use window at the offer (``offers.lease_price``).
- Rule 3 (the cap): :func:`charge_for` charges the metered price of the job's attempts, but at most
  the quoted ``max_fen``; the cap grows only with the job's *own* behaviour (``own_work_s``, the
  failure-free run time the job turned out to need, longer than quoted), in proportion. Infrastructure
  failures beyond the quoted risk are the network's cost, not the tenant's (``absorbed_fen``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import msgspec

from controlplane.core import placement
from controlplane.market import money, offers


class QuotePolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How quotes are made."""

    valid_s: float = 900.0
    """How long a quote binds (15 minutes): offers and free cards change."""
    low_q: float = 0.10
    high_q: float = 0.90
    cap_q: float = 0.95
    """The quoted maximum is the price at this failure quantile: above it the network pays."""
    max_options: int = 8


DEFAULT_POLICY = QuotePolicy()


class QuoteOption(msgspec.Struct, frozen=True, kw_only=True):
    """One feasible placement, priced."""

    pool: str
    provider: str
    accelerator: str
    offer_id: str
    cards: int
    start_at: float
    """When the run would start (placement may wait for a cheaper tariff window)."""
    work_s: float
    """Failure-free compute time on this pool's cards (the job's own work, as quoted)."""
    expected_run_s: float
    expected_fen: int
    p10_fen: int
    p90_fen: int
    max_fen: int
    energy_fen: int
    """Energy the expected run draws (placement's model), for the provider's margin."""
    margin_fen: int
    """expected_fen − energy_fen: what the owner earns over energy on the expected run."""
    meets_deadline: bool = True
    notes: list[str] = []


class Unquoted(msgspec.Struct, frozen=True, kw_only=True):
    """A pool that gave no option, and why."""

    pool: str
    accelerator: str
    reason: str


class Quote(msgspec.Struct, frozen=True, kw_only=True):
    """A set of priced options for one job spec, binding until ``valid_until``."""

    id: str
    tenant: str
    created_at: float
    valid_until: float
    options: list[QuoteOption]
    unquoted: list[Unquoted] = []


class Candidate(msgspec.Struct, frozen=True, kw_only=True):
    """A scored placement (from ``placement``) and the offer that prices it."""

    pool: placement.Pool
    offer: offers.Offer
    breakdown: placement.CostBreakdown


class QuoteRefused(msgspec.Struct, frozen=True, kw_only=True, tag="refused"):
    """A submission against a quote that cannot be honoured (a 409/410 for the gateway)."""

    code: str
    """``quote_expired``, ``quote_unknown_option`` or ``quote_other_tenant``."""
    message: str


class AttemptUsage(msgspec.Struct, frozen=True, kw_only=True):
    """One metered attempt (from ``lifecycle.Meter``) and the offer it is priced at."""

    attempt: int
    pool: str
    cards: int
    start_at: float
    end_at: float
    offer: offers.Offer


class ChargeLine(msgspec.Struct, frozen=True, kw_only=True):
    """One attempt priced at its offer: what its pool's owner earns."""

    attempt: int
    pool: str
    provider: str
    accelerator: str
    offer_id: str
    cards: int
    start_at: float
    end_at: float
    billed_end_at: float
    price_fen: int


class Charge(msgspec.Struct, frozen=True, kw_only=True):
    """What a job costs: metered at offers, capped by its quote."""

    lines: list[ChargeLine]
    metered_fen: int
    cap_fen: int | None
    charged_fen: int
    """min(metered, cap): what the tenant pays."""
    absorbed_fen: int
    """metered − charged (>= 0): failure risk beyond the quote, paid by the network."""
    reason: str


# --------------------------------------------------------------------------- spread


def poisson_quantile(lam: float, q: float) -> int:
    """Smallest n with P(N <= n) >= q for N ~ Poisson(lam). Deterministic; log-space terms."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be within (0, 1), got {q!r}")
    if not lam >= 0 or math.isinf(lam):
        raise ValueError(f"lam must be finite and >= 0, got {lam!r}")
    if lam == 0.0:
        return 0
    log_term = -lam
    cdf = 0.0
    n = 0
    limit = int(lam + 12.0 * math.sqrt(lam) + 20.0)
    while n <= limit:
        cdf += math.exp(log_term)
        if cdf >= q:
            return n
        n += 1
        log_term += math.log(lam) - math.log(n)
    return n


def durations_s(bd: placement.CostBreakdown, checkpoint_cost_s: float, restart_s: float,
                quantiles: Sequence[float]) -> tuple[float, float, list[float]]:
    """(base, expected, [duration at each quantile]) of a run, in seconds (Rule 2)."""
    work = bd.work_s
    interval = bd.interval_s if bd.interval_s > 0 else math.inf
    base = work * (1.0 + (checkpoint_cost_s / interval if math.isfinite(interval) else 0.0))
    mtbf_s = bd.mtbf_h * 3600.0 if bd.mtbf_h is not None else math.inf
    if not math.isfinite(mtbf_s) or mtbf_s <= 0 or work <= 0:
        return base, base, [base for _ in quantiles]
    lam = work / mtbf_s
    loss = (interval / 2.0 if math.isfinite(interval) else work / 2.0) + restart_s  # first order
    if bd.run_s > base:  # placement's own expected loss (its goodput rule), spread over the failures
        loss = (bd.run_s - base) / lam
    return base, base + lam * loss, [base + poisson_quantile(lam, q) * loss for q in quantiles]


# --------------------------------------------------------------------------- quoting


def option_for(job: placement.JobSpec, cand: Candidate, policy: QuotePolicy = DEFAULT_POLICY) -> QuoteOption:
    """Price one scored placement at its offer (Rules 1-2)."""
    bd, offer, pool = cand.breakdown, cand.offer, cand.pool
    base, expected, (lo, hi, cap) = durations_s(
        bd, job.checkpoint_cost_s, pool.restart_s, (policy.low_q, policy.high_q, policy.cap_q))
    start = bd.start_at

    def price(duration_s: float) -> int:
        return offers.lease_price(offer, job.cards, start, start + duration_s)

    expected_fen = price(expected)
    p90 = price(hi)
    energy = offers.energy_fen(pool, bd.accelerator, job.cards, start, start + expected)
    notes = list(bd.notes)
    if offer.min_lease_s and base < offer.min_lease_s:
        notes.append(f"billed at the offer's minimum lease of {offer.min_lease_s / 3600.0:.1f} h")
    return QuoteOption(
        pool=pool.id, provider=offer.provider, accelerator=bd.accelerator, offer_id=offer.id, cards=job.cards,
        start_at=start, work_s=bd.work_s, expected_run_s=expected, expected_fen=expected_fen,
        p10_fen=price(lo), p90_fen=p90, max_fen=max(price(cap), p90, expected_fen),
        energy_fen=energy, margin_fen=expected_fen - energy, meets_deadline=bd.meets_deadline, notes=notes,
    )


def quote(
    job: placement.JobSpec,
    candidates: Iterable[Candidate],
    now: float,
    *,
    quote_id: str,
    unquoted: Sequence[Unquoted] = (),
    policy: QuotePolicy = DEFAULT_POLICY,
) -> Quote:
    """A :class:`Quote` over scored candidates (Rule 1). ``quote_id`` comes from the caller (no
    randomness in the core)."""
    opts = [option_for(job, c, policy) for c in candidates]
    opts.sort(key=lambda o: (not o.meets_deadline, o.expected_fen, o.pool, o.accelerator))
    return Quote(id=quote_id, tenant=job.tenant, created_at=now, valid_until=now + policy.valid_s,
                 options=opts[: policy.max_options], unquoted=list(unquoted))


def candidates(
    job: placement.JobSpec,
    pools: Sequence[placement.Pool],
    all_offers: Sequence[offers.Offer],
    now: float,
    *,
    model: placement.CostModel = placement.DEFAULT_MODEL,
) -> tuple[list[Candidate], list[Unquoted]]:
    """Score ``job`` on every pool with placement's own model (``placement.rank``) and pair each
    scored placement with the offer in force at its start; the rest are :class:`Unquoted`."""
    scored, filtered = placement.rank(job, pools, now, model=model)
    by_id = {p.id: p for p in pools}
    out: list[Candidate] = []
    skipped = [Unquoted(pool=v.pool, accelerator=v.accelerator, reason=v.reason) for v in filtered]
    for bd in scored:
        offer = offers.select(all_offers, bd.pool, bd.accelerator, bd.start_at)
        if offer is None:
            skipped.append(Unquoted(pool=bd.pool, accelerator=bd.accelerator,
                                    reason=f"no offer for {bd.accelerator} in force"))
            continue
        out.append(Candidate(pool=by_id[bd.pool], offer=offer, breakdown=bd))
    return out, skipped


def quote_job(
    job: placement.JobSpec,
    pools: Sequence[placement.Pool],
    all_offers: Sequence[offers.Offer],
    now: float,
    *,
    quote_id: str,
    policy: QuotePolicy = DEFAULT_POLICY,
    model: placement.CostModel = placement.DEFAULT_MODEL,
) -> Quote:
    """``POST /v1/quotes`` in one call: :func:`candidates` then :func:`quote`."""
    cands, skipped = candidates(job, pools, all_offers, now, model=model)
    return quote(job, cands, now, quote_id=quote_id, unquoted=skipped, policy=policy)


def accept(q: Quote, pool: str, accelerator: str, tenant: str, now: float) -> QuoteOption | QuoteRefused:
    """A submission against quote ``q`` choosing ``pool``/``accelerator``: the option it binds, or why not."""
    if tenant != q.tenant:
        return QuoteRefused(code="quote_other_tenant", message=f"quote {q.id} was made for another tenant")
    if now >= q.valid_until:
        return QuoteRefused(code="quote_expired",
                            message=f"quote {q.id} expired {now - q.valid_until:.0f} s ago; ask for a new one")
    for o in q.options:
        if o.pool == pool and o.accelerator == accelerator:
            return o
    return QuoteRefused(code="quote_unknown_option",
                        message=f"quote {q.id} has no option for {accelerator} at {pool}")


# --------------------------------------------------------------------------- charging


def price_attempts(attempts: Iterable[AttemptUsage]) -> list[ChargeLine]:
    """Each attempt priced at its own offer (rounded per attempt: one ledger line each)."""
    lines = []
    for a in sorted(attempts, key=lambda a: a.attempt):
        end = max(a.end_at, a.start_at)
        lines.append(ChargeLine(
            attempt=a.attempt, pool=a.pool, provider=a.offer.provider, accelerator=a.offer.accelerator,
            offer_id=a.offer.id, cards=a.cards, start_at=a.start_at, end_at=end,
            billed_end_at=offers.billed_end(a.offer, a.start_at, end),
            price_fen=offers.lease_price(a.offer, a.cards, a.start_at, end),
        ))
    return lines


def cap_fen(option: QuoteOption, own_work_s: float | None = None) -> int:
    """The quoted maximum, grown in proportion when the job's own work exceeded the quoted work."""
    if own_work_s is None or option.work_s <= 0 or own_work_s <= option.work_s:
        return option.max_fen
    return money.round_half_up(option.max_fen * money.exact(own_work_s) / money.exact(option.work_s))


def charge_for(option: QuoteOption | None, attempts: Iterable[AttemptUsage], *,
               own_work_s: float | None = None) -> Charge:
    """What the tenant pays for a job's attempts (Rule 3); ``option`` None: no quote, no cap.

    Args:
        own_work_s: the failure-free run time the job turned out to need on the quoted cards
            (None: as quoted). Only this raises the cap: time lost to infrastructure never does.
    """
    lines = price_attempts(attempts)
    metered = sum(line.price_fen for line in lines)
    if option is None:
        return Charge(lines=lines, metered_fen=metered, cap_fen=None, charged_fen=metered, absorbed_fen=0,
                      reason="no quote: metered at the offers")
    cap = cap_fen(option, own_work_s)
    charged = min(metered, cap)
    reason = (f"capped at the quoted maximum {money.cny_text(cap)} CNY" if charged < metered
              else f"metered at the offers, within the quoted maximum {money.cny_text(cap)} CNY")
    return Charge(lines=lines, metered_fen=metered, cap_fen=cap, charged_fen=charged,
                  absorbed_fen=metered - charged, reason=reason)


def attempt_charge(cap: int | None, charged_so_far_fen: int, price_fen: int) -> int:
    """The tenant's share of one more attempt when attempts are billed as they end: the charges of
    a job's attempts, taken in order, sum to ``min(total, cap)`` exactly."""
    if cap is None:
        return price_fen
    return max(0, min(price_fen, cap - charged_so_far_fen))
