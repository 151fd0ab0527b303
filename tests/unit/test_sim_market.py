"""cpn sim prices the day (docs/market.md, docs/sim.md): offers at energy cost plus a markup, each
metered attempt priced and posted as the hub posts it, totals that balance to the fen. Pure."""

from __future__ import annotations

import msgspec

from controlplane.market import offers
from controlplane.tools.sim import core_market, core_scenario, core_training
from tests.unit.test_sim_known import one_job, two_pool_network
from topology import layout as tlayout

MARKET = core_scenario.Market(markup_pct=30.0, commission_bp=1000)


def _run(lay: tlayout.Layout) -> core_training.TrainingSim:
    start = core_scenario.start_epoch_s(core_scenario.DEFAULT_START)
    sim = core_training.TrainingSim("cpn", core_training.cpn_planner, lay, lay.sites, [one_job(start)],
                                    start_s=start, tick_s=60.0, failure_scale=1.0, reserved_cards={})
    sim.advance(start + 10 * 3600)
    sim.close(start + 10 * 3600)
    return sim


def test_one_job_on_the_operators_pool_is_priced_by_hand() -> None:
    lay = two_pool_network(0.60, 0.30)
    sim = _run(lay)
    (line,) = sim.metered
    assert line[3] == "pb-hub" and line[5] == 8 and line[7] - line[6] == 7500.0
    priced = core_market.offers_for(lay.sites, lay.accelerators, MARKET)
    offer, _ = priced[("pb-hub", "A800")]
    # 0.4 kW × PUE 1.2 × 0.30 CNY/kWh = 14.4 fen per card-hour, + 30 % = 18.72 -> 19 fen (half up).
    assert (offer.fen_per_card_hour, offer.windows, offer.provider) == (19, (), "cpn-operator")
    m = core_market.price_policy(sim.metered, priced, MARKET)
    # 8 cards × 7,500 s = 16.667 card-hours × 19 = 316.67 -> 317 fen; energy 16.667 × 14.4 = 240 fen.
    assert m["tenant_spend_fen"] == 317 and m["energy_fen"] == 240 and m["margin_over_energy_fen"] == 77
    assert m["operator_pools_fen"] == 317 and m["provider_earnings_fen"] == 0 and m["operator_kept_fen"] == 317
    assert m["lending_earned_fen"] == 0
    m = core_market.price_policy(sim.metered, priced, MARKET, lent=["pb-hub"])
    assert m["lending_earned_fen"] == 317


def test_a_third_party_pool_pays_its_provider_less_the_commission_and_it_all_balances() -> None:
    lay = two_pool_network(0.60, 0.30)
    lay = msgspec.structs.replace(lay, sites=[msgspec.structs.replace(s, provider="xirang-7") if s.id == "pb-hub" else s
                                              for s in lay.sites])
    sim = _run(lay)
    m = core_market.price_policy(sim.metered, core_market.offers_for(lay.sites, lay.accelerators, MARKET), MARKET)
    # 317 fen earned, 10 % commission (31.7 -> 32, half up) kept by the operator.
    assert m["providers"] == {"xirang-7": 285} and m["operator_margin_fen"] == 32 and m["operator_pools_fen"] == 0
    assert m["tenant_spend_fen"] == m["provider_earnings_fen"] + m["operator_kept_fen"] == 317


def test_time_of_use_tariffs_become_offer_windows() -> None:
    lay = two_pool_network(0.60, 0.30)
    site = lay.sites[0]
    tou = tlayout.Tariff(flat_cny_per_kwh=0.5, peak_cny_per_kwh=1.0, valley_cny_per_kwh=0.25,
                         peak_hours=[9, 10, 11], valley_hours=[0, 1, 2, 3, 4, 5, 6, 23])
    site = msgspec.structs.replace(site, tariff=tou)
    priced = core_market.offers_for([site], lay.accelerators, MARKET)
    offer, pool = priced[(site.id, "A800")]
    assert offers.offer_problem(offer) is None
    # 0.4 × 1.2 × tariff × 100 × 1.3: valley 15.6 -> 16, flat 31.2 -> 31, peak 62.4 -> 62 fen.
    assert offer.hours() == tuple([16] * 7 + [31] * 2 + [62] * 3 + [31] * 11 + [16])
