"""The simulated day priced: tenant spend, provider earnings, the operator's margin, and what tidal
lending earned, per policy. Pure (the market's own pricing and postings, docs/market.md).

What it promises:

- Rule 1: each pool's owner (its site's ``provider``) offers each accelerator at its energy cost
  per card-hour, hour by hour (``placement`` board power × PUE × the site's tariff), plus
  ``Market.markup_pct``, in whole fen per card-hour (half up): :func:`offers_for`.
- Rule 2: every metered attempt of a policy is priced at its pool's offer (``quotes.price_attempts``,
  one rounding per attempt) and posted as the hub posts it (``postings.attempt_transaction``, no
  quote: the tenant pays the metered price); :func:`price_policy` sums the postings with
  ``postings.party_totals``, so tenant spend = provider earnings + what the operator kept, to the fen.
- Rule 3: what tidal lending earned is the price of the card time jobs used on lent pools.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from controlplane.core import placement
from controlplane.market import money, offers, postings, quotes
from controlplane.tools.sim.core_scenario import Market
from topology import layout as tlayout

Metered = tuple[str, str, int, str, str, int, float, float]
"""(job, tenant, attempt, pool, accelerator, cards, start, end), as ``TrainingSim.metered``."""


def offer_for(pool: placement.Pool, site: tlayout.Site, acc: str, markup_pct: float) -> offers.Offer:
    """Rule 1 for one pool and accelerator."""
    kw_pue = pool.kw_per_card.get(acc, 0.0) * pool.pue
    factor = money.exact(1) + money.exact(markup_pct) / 100
    hourly = [money.round_half_up(money.exact(kw_pue) * money.exact(p) * 100 * factor)
              for p in placement.tariff_prices(pool.tariff)]
    base = hourly[0]
    windows = []
    h = 0
    while h < 24:
        if hourly[h] == base:
            h += 1
            continue
        start = h
        while h < 24 and hourly[h] == hourly[start]:
            h += 1
        windows.append(offers.Window(start_hour=start, end_hour=h % 24, fen_per_card_hour=hourly[start]))
    return offers.Offer(id=f"sim:{pool.id}:{acc}", pool=pool.id, provider=site.provider or "unknown", accelerator=acc,
                        fen_per_card_hour=base, windows=tuple(windows))


def offers_for(sites: Iterable[tlayout.Site], accelerators: Mapping[str, tlayout.AcceleratorSpec],
               market: Market) -> dict[tuple[str, str], tuple[offers.Offer, placement.Pool]]:
    """Every (pool, accelerator)'s offer and pool (for its energy)."""
    out = {}
    for site in sites:
        pool = placement.pool_from_site(site, accelerators)
        for acc in site.accelerators:
            out[(site.id, acc)] = (offer_for(pool, site, acc, market.markup_pct), pool)
    return out


def price_policy(metered: Sequence[Metered], priced: Mapping[tuple[str, str], tuple[offers.Offer, placement.Pool]],
                 market: Market, lent: Iterable[str] = ()) -> dict[str, Any]:
    """Rules 2 and 3 for one policy's attempts."""
    fees = postings.Fees(operator_provider=market.operator_provider, commission_bp=market.commission_bp)
    lent_ids = set(lent)
    txns = []
    energy = lending = 0
    for job, tenant, attempt, pool_id, acc, cards, start, end in metered:
        if not end > start or (pool_id, acc) not in priced:
            continue
        offer, pool = priced[(pool_id, acc)]
        (line,) = quotes.price_attempts([quotes.AttemptUsage(attempt=attempt, pool=pool_id, cards=cards,
                                                             start_at=start, end_at=end, offer=offer)])
        txns.append(postings.attempt_transaction(tenant, job, line, line.price_fen, fees=fees))
        energy += offers.energy_fen(pool, acc, cards, start, end)
        if pool_id in lent_ids:
            lending += line.price_fen
    totals = postings.party_totals(txns, float("-inf"), float("inf"))
    spend = sum(totals.tenants_owe_fen.values())
    return {
        "tenant_spend_fen": spend,
        "provider_earnings_fen": sum(totals.providers_earn_fen.values()),
        "operator_kept_fen": totals.operator_kept_fen,
        "operator_pools_fen": totals.operator_by_account_fen.get(postings.OPERATOR_POOLS, 0),
        "operator_margin_fen": totals.operator_by_account_fen.get(postings.OPERATOR_MARGIN, 0),
        "energy_fen": energy,
        "margin_over_energy_fen": spend - energy,
        "lending_earned_fen": lending,
        "providers": dict(sorted(totals.providers_earn_fen.items())),
        "attempts_priced": len(txns),
    }
