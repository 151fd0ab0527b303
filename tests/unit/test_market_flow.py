"""One job and one day of tokens through the whole market, as the wiring will drive it: quote,
accept, budget, attempts billed as they end, usage flushes, statements, reconciliation."""

from __future__ import annotations

from controlplane.core import placement
from controlplane.market import budgets, catalogue, ledger, offers, postings, quotes, reconcile
from topology import layout

NOW = 1_794_704_400.0   # 2026-11-15 09:00 China time (the run stays within November)
TARIFF = layout.Tariff(flat_cny_per_kwh=0.36, peak_cny_per_kwh=0.36, valley_cny_per_kwh=0.36)
POOL = placement.Pool(id="nx-zw", provider="westgrid", cards_total={"910B": 256}, cards_free={"910B": 256},
                      kw_per_card={"910B": 0.4}, units={"910B": 0.8}, tariff=TARIFF, pue=1.1,
                      failure_rate_per_card_hour=0.002, restart_s=600.0)
OFFER = offers.Offer(id="zw-910b", pool="nx-zw", provider="westgrid", accelerator="910B", fen_per_card_hour=700,
                     windows=(offers.Window(start_hour=23, end_hour=7, fen_per_card_hour=450),))
MODEL = catalogue.ModelRecord(id="qwen2-7b", owner="modelco", input_fen_per_mtok=100, output_fen_per_mtok=300,
                              owner_share_bp=2000, filing=catalogue.Filing(number="BJ-2026-7", scope="public",
                                                                         filed_on="2026-06-01"))


def test_a_quoted_job_and_a_day_of_tokens_balance_to_the_fen() -> None:
    job = placement.JobSpec(id="j1", tenant="acme", cards=32, accelerators=("910B",), est_hours=12.0)
    q = quotes.quote_job(job, [POOL], [OFFER], NOW, quote_id="q-1")
    option = quotes.accept(q, "nx-zw", "910B", "acme", NOW + 60)
    assert isinstance(option, quotes.QuoteOption)
    budget = budgets.Budget(tenant="acme", limit_fen=5_000_000)
    assert budgets.check(budget, 0, option.max_fen).verdict in ("allow", "warn")

    # The job is billed attempt by attempt as they end: a card fault after 9 h, then 12 h more
    # (longer than quoted, as if unlucky): the cap binds, the network absorbs the rest.
    starts = [(1, NOW + 120, NOW + 120 + 9 * 3600), (2, NOW + 120 + 9 * 3600 + 600, NOW + 120 + 21 * 3600 + 600)]
    book = ledger.Ledger()
    charged = 0
    metered = []
    for n, s, e in starts:
        (line,) = quotes.price_attempts([quotes.AttemptUsage(attempt=n, pool="nx-zw", cards=32, start_at=s, end_at=e,
                                                             offer=OFFER)])
        share = quotes.attempt_charge(quotes.cap_fen(option), charged, line.price_fen)
        charged += share
        assert isinstance(book.post(postings.attempt_transaction("acme", "j1", line, share, quote_id=q.id)),
                          ledger.Posted)
        metered.append(reconcile.MeteredAttempt(job_id="j1", attempt=n, cards=32, start_at=s, end_at=e, offer=OFFER))
    whole = quotes.charge_for(option, [quotes.AttemptUsage(attempt=m.attempt, pool="nx-zw", cards=32,
                                                           start_at=m.start_at, end_at=m.end_at, offer=OFFER)
                                       for m in metered])
    assert charged == whole.charged_fen == option.max_fen < whole.metered_fen

    # Tokens: the public-facing tenant may call the filed model; one flush of usage.
    assert catalogue.may_call(MODEL, public_facing=True, now=NOW) == catalogue.Allowed(header="BJ-2026-7")
    lines = [reconcile.TokenLine(flush="f1", tenant="acme", model=MODEL.id, site="hz-edge",
                                 prompt_tokens=3_123_457, completion_tokens=987_654)]
    for tl in lines:
        book.post(postings.usage_transaction(tl.flush, NOW + 30, tl.tenant, MODEL, tl.site, tl.prompt_tokens,
                                             tl.completion_tokens))

    # Everything balances, reconciles, and the three answers add up.
    start, end = budgets.period_bounds("month", NOW)
    assert sum(ledger.balances(book).values()) == 0
    check = reconcile.reconcile(book, reconcile.expected_for_attempts(metered)
                                + reconcile.expected_for_tokens(lines, {MODEL.id: MODEL}))
    assert check.ok, check.differences
    totals = postings.party_totals(list(book), start, end)
    token_fen = catalogue.price_usage(MODEL, 3_123_457, 987_654)
    assert totals.tenants_owe_fen["acme"] == whole.charged_fen + token_fen
    assert totals.providers_earn_fen == {"westgrid": whole.metered_fen - sum(
        -e.amount_fen for t in book for e in t.entries if e.account == "provider:westgrid" and e.kind == "commission")}
    assert (sum(totals.tenants_owe_fen.values())
            == sum(totals.providers_earn_fen.values()) + totals.operator_kept_fen)
    assert postings.spent_fen(list(book), "acme", start, end) == whole.charged_fen + token_fen
    assert budgets.standing(budget, postings.spent_fen(list(book), "acme", start, end)).verdict in ("allow", "warn")
    provider = ledger.statement(book, "provider:westgrid", start, end)
    assert sum(x.amount_fen for x in provider.lines if x.entry_kind == "earning") == whole.metered_fen
