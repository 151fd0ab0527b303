"""The market's JSON bodies (controlplane/market/views.py)."""

from __future__ import annotations

import msgspec

from controlplane.market import budgets, catalogue, ledger, postings, views


def test_402_body_carries_the_figures() -> None:
    d = budgets.check(budgets.Budget(tenant="acme", limit_fen=10_000), 9_000, 2_500)
    body = views.budget_exceeded_body(d, "month")
    assert body["error"]["code"] == "budget_exceeded" and "budget exceeded" in body["error"]["message"]
    assert body["budget"] == {"limit_fen": 10_000, "limit_cny": "100.00", "spent_fen": 9_000, "spent_cny": "90.00",
                              "held_fen": 0, "held_cny": "0.00", "incoming_fen": 2_500, "incoming_cny": "25.00", "remaining_fen": 1_000,
                              "remaining_cny": "10.00", "period": "month", "used_pct": 115}
    msgspec.json.encode(body)


def test_403_body_names_the_missing_filing() -> None:
    r = catalogue.may_call(catalogue.ModelRecord(id="m", owner="o"), public_facing=True, now=0.0)
    assert isinstance(r, catalogue.Refused)
    body = views.filing_refused_body(r)
    assert body["error"]["code"] == "model_not_filed" and body["filing"]["missing"].startswith("public-service filing")


def test_statement_body_has_exact_fen_and_cny_text() -> None:
    txn = postings.adjustment("c1", 100.0, "tenant:acme", -1234, "operator:margin", "late fee")
    body = views.statement_body(ledger.statement([txn], "tenant:acme", 0.0, 200.0))
    assert body["closing_fen"] == -1234 and body["closing_cny"] == "-12.34"
    assert body["lines"][0]["amount_cny"] == "-12.34" and body["lines"][0]["memo"] == "late fee"
    msgspec.json.encode(body)


def test_quote_body() -> None:
    from controlplane.market import quotes
    opt = quotes.QuoteOption(pool="p", provider="westgrid", accelerator="910B", offer_id="o", cards=8, start_at=0.0,
                             work_s=3600.0, expected_run_s=3700.0, expected_fen=8_222, p10_fen=8_000, p90_fen=9_000,
                             max_fen=9_500, energy_fen=160, margin_fen=8_062)
    body = views.quote_body(quotes.Quote(id="q1", tenant="acme", created_at=0.0, valid_until=900.0, options=[opt]))
    assert body["object"] == "quote" and body["valid_until"] == 900.0
    assert body["options"][0]["max_fen"] == 9_500 and body["options"][0]["max_cny"] == "95.00"
    assert views.quote_refused_status(quotes.QuoteRefused(code="quote_expired", message="")) == 410
    msgspec.json.encode(body)
