"""The market's answers as JSON-ready dicts, so the gateway only encodes them. Pure.

Error bodies follow the gateway's (OpenAI's) shape, ``{"error": {"message", "type", "code",
"param"}}``, with the figures alongside under ``"budget"`` / ``"filing"``. Money is given in integer
fen (``*_fen``, exact) and as CNY text (``*_cny``, two decimals, for people).
"""

from __future__ import annotations

from typing import Any

import msgspec

from controlplane.market import budgets, catalogue, ledger, money, quotes


def _with_cny(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out[k] = v
        if k.endswith("_fen") and type(v) is int:  # noqa: E721
            out[k[:-4] + "_cny"] = money.cny_text(v)
    return out


def quote_body(q: quotes.Quote) -> dict[str, Any]:
    """``POST /v1/quotes`` 200 body."""
    body: dict[str, Any] = msgspec.to_builtins(q)
    body["object"] = "quote"
    body["options"] = [_with_cny(o) for o in body["options"]]
    return body


def quote_refused_body(r: quotes.QuoteRefused) -> dict[str, Any]:
    """A refused submission against a quote (409 for ``quote_unknown_option``/``quote_other_tenant``,
    410 for ``quote_expired``)."""
    return {"error": {"message": r.message, "type": "invalid_request_error", "code": r.code, "param": "quote_id"}}


def quote_refused_status(r: quotes.QuoteRefused) -> int:
    return 410 if r.code == "quote_expired" else 409


def budget_exceeded_body(d: budgets.BudgetDecision, period: budgets.Period) -> dict[str, Any]:
    """402 body of a refused request or submission, with the figures."""
    figures = _with_cny({"limit_fen": d.limit_fen, "spent_fen": d.spent_fen, "held_fen": d.held_fen,
                         "incoming_fen": d.incoming_fen, "remaining_fen": d.remaining_fen})
    return {"error": {"message": d.message, "type": "insufficient_quota", "code": "budget_exceeded", "param": None},
            "budget": {**figures, "period": period, "used_pct": d.used_pct}}


def budget_standing_body(d: budgets.BudgetDecision, period: budgets.Period) -> dict[str, Any]:
    """The ``budget`` part of ``GET /v1/usage``: figures and the warnings reached."""
    figures = _with_cny({"limit_fen": d.limit_fen, "spent_fen": d.spent_fen, "remaining_fen": d.remaining_fen})
    return {**figures, "period": period, "used_pct": d.used_pct, "warnings": list(d.crossed_pct),
            "message": d.message}


def filing_refused_body(r: catalogue.Refused) -> dict[str, Any]:
    """403 body when a public-facing tenant calls a model without a public-service filing."""
    return {"error": {"message": r.message, "type": "permission_error", "code": r.code, "param": "model"},
            "filing": {"model": r.model, "missing": r.missing}}


def statement_body(st: ledger.Statement) -> dict[str, Any]:
    """``GET /v1/statements`` body (the CSV form is ``ledger.statement_csv``)."""
    body = _with_cny(msgspec.to_builtins(msgspec.structs.replace(st, lines=[])))
    body["object"] = "statement"
    body["lines"] = [_with_cny(line) for line in msgspec.to_builtins(st.lines)]
    return body
