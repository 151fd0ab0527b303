"""Quotes, acceptance and the capped charge (controlplane/market/quotes.py, postings.py)."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.core import placement
from controlplane.market import money, offers, postings, quotes
from topology import layout

NOW = 1_796_000_400.0   # 2026-11-30 09:00 China time, a fixed instant
FLAT = layout.Tariff(flat_cny_per_kwh=0.4, peak_cny_per_kwh=0.4, valley_cny_per_kwh=0.4)


def pool(pid: str, *, provider: str = "westgrid", rate: float = 0.0, cards: int = 64, tee: bool = False) -> placement.Pool:
    return placement.Pool(id=pid, provider=provider, cards_total={"910B": cards}, cards_free={"910B": cards},
                          kw_per_card={"910B": 0.4}, units={"910B": 1.0}, tariff=FLAT, pue=1.25,
                          failure_rate_per_card_hour=rate, restart_s=600.0, tee=tee)


def offer(pid: str, fen: int, provider: str = "westgrid", **kw: object) -> offers.Offer:
    return offers.Offer(id=f"{pid}-o", pool=pid, provider=provider, accelerator="910B", fen_per_card_hour=fen,
                        **kw)  # type: ignore[arg-type]


def job(**kw: object) -> placement.JobSpec:
    base: dict[str, object] = dict(id="j1", tenant="acme", cards=8, accelerators=("910B",), est_hours=10.0)
    base.update(kw)
    return placement.JobSpec(**base)  # type: ignore[arg-type]


def test_quote_lists_feasible_placements_cheapest_to_the_tenant_first() -> None:
    pools = [pool("cheap"), pool("dear"), pool("no-offer"), pool("small", cards=4)]
    q = quotes.quote_job(job(), pools, [offer("cheap", 900), offer("dear", 1200), offer("small", 1)], NOW,
                         quote_id="q1")
    assert [o.pool for o in q.options] == ["cheap", "dear"]
    assert q.id == "q1" and q.tenant == "acme" and q.valid_until == NOW + 900.0
    reasons = {u.pool: u.reason for u in q.unquoted}
    assert reasons["no-offer"] == "no offer for 910B in force"
    assert "4 910B cards in all, job needs 8" in reasons["small"]


def test_known_answer_without_failures() -> None:
    q = quotes.quote_job(job(), [pool("p")], [offer("p", 1000)], NOW, quote_id="q")
    o = q.options[0]
    # no failures: T = the whole run, one checkpoint of 300 s -> 10 h + 300 s on 8 cards at 10 CNY
    assert o.expected_fen == o.p10_fen == o.p90_fen == o.max_fen == money.round_half_up(
        Fraction(8 * (36_000 + 300) * 1000, 3600)) == 80_667
    # energy: 8 x 0.4 kW x 1.25 x (10 h + 300 s) x 0.4 CNY/kWh = 16.133 CNY
    assert o.energy_fen == 1613 and o.margin_fen == 80_667 - 1613


def test_failure_risk_gives_a_spread() -> None:
    # 8 cards at 0.01 failures per card-hour: M = 12.5 h, 10 h of work -> 0.8 failures expected
    q = quotes.quote_job(job(), [pool("p", rate=0.01)], [offer("p", 1000)], NOW, quote_id="q")
    o = q.options[0]
    assert o.p10_fen < o.expected_fen < o.p90_fen <= o.max_fen
    bd = placement.score(job(), pool("p", rate=0.01), NOW)
    assert o.expected_run_s == pytest.approx(bd.run_s)     # the expected run is placement's own


@pytest.mark.parametrize(("lam", "q", "n"), [(0.0, 0.9, 0), (0.8, 0.1, 0), (0.8, 0.9, 2), (0.8, 0.95, 2),
                                             (0.8, 0.96, 3), (1000.0, 0.5, 1000)])
def test_poisson_quantiles(lam: float, q: float, n: int) -> None:
    assert quotes.poisson_quantile(lam, q) == n


def _option(max_fen: int = 10_000, work_s: float = 36_000.0) -> quotes.QuoteOption:
    return quotes.QuoteOption(pool="p", provider="westgrid", accelerator="910B", offer_id="p-o", cards=1,
                              start_at=NOW, work_s=work_s, expected_run_s=work_s, expected_fen=max_fen,
                              p10_fen=max_fen, p90_fen=max_fen, max_fen=max_fen, energy_fen=0, margin_fen=max_fen)


def _attempt(n: int, hours: float, fen: int = 1000, start: float = NOW) -> quotes.AttemptUsage:
    return quotes.AttemptUsage(attempt=n, pool="p", cards=1, start_at=start, end_at=start + hours * 3600.0,
                               offer=offer("p", fen))


def test_charge_is_capped_by_the_quote_unless_the_job_itself_ran_longer() -> None:
    opt = _option(max_fen=10_000)
    within = quotes.charge_for(opt, [_attempt(1, 9.0)])
    assert (within.metered_fen, within.charged_fen, within.absorbed_fen) == (9000, 9000, 0)
    # infrastructure failures: three attempts, 14 h of card time in all -> the network pays 4,000
    failing = quotes.charge_for(opt, [_attempt(1, 5.0), _attempt(2, 4.0), _attempt(3, 5.0)])
    assert (failing.metered_fen, failing.cap_fen, failing.charged_fen, failing.absorbed_fen) == (14_000, 10_000, 10_000, 4000)
    assert "capped" in failing.reason
    # the job's own work grew from 10 h to 12 h: the cap grows in proportion
    longer = quotes.charge_for(opt, [_attempt(1, 14.0)], own_work_s=12 * 3600.0)
    assert (longer.cap_fen, longer.charged_fen) == (12_000, 12_000)
    assert quotes.charge_for(None, [_attempt(1, 14.0)]).charged_fen == 14_000


def test_accepting_a_quote() -> None:
    q = quotes.quote_job(job(), [pool("p")], [offer("p", 1000)], NOW, quote_id="q9")
    assert isinstance(quotes.accept(q, "p", "910B", "acme", NOW + 10), quotes.QuoteOption)
    for args, code in ((("p", "910B", "acme", NOW + 900), "quote_expired"),
                       (("p", "910B", "beta", NOW), "quote_other_tenant"),
                       (("x", "910B", "acme", NOW), "quote_unknown_option")):
        refused = quotes.accept(q, *args)
        assert isinstance(refused, quotes.QuoteRefused) and refused.code == code


@given(cap=st.integers(0, 10**7), hours=st.lists(st.floats(0, 200), min_size=1, max_size=6),
       fen=st.integers(0, 5000), third_party=st.booleans(), bp=st.integers(0, 10_000))
def test_charged_within_cap_and_every_posting_balances(cap: int, hours: list[float], fen: int,
                                                        third_party: bool, bp: int) -> None:
    provider = "westgrid" if third_party else "cpn-operator"
    t = NOW
    attempts = []
    for i, h in enumerate(hours, start=1):
        attempts.append(quotes.AttemptUsage(attempt=i, pool="p", cards=8, start_at=t, end_at=t + h * 3600.0,
                                            offer=offer("p", fen, provider=provider)))
        t += h * 3600.0 + 60.0
    charge = quotes.charge_for(_option(max_fen=cap), attempts)
    assert 0 <= charge.charged_fen <= min(cap, charge.metered_fen)
    assert charge.charged_fen + charge.absorbed_fen == charge.metered_fen
    txns = postings.job_transactions("acme", "j1", charge, quote_id="q1", fees=postings.Fees(commission_bp=bp))
    for txn in txns:
        assert sum(e.amount_fen for e in txn.entries) == 0
    tenant = -sum(e.amount_fen for x in txns for e in x.entries if e.account == "tenant:acme")
    earned = sum(e.amount_fen for x in txns for e in x.entries if e.kind == "earning")
    assert tenant == charge.charged_fen and earned == charge.metered_fen
