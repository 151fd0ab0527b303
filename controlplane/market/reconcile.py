"""Reconciliation: the ledger against metered usage × prices, to the fen. Pure.

What this module promises:

- Rule 1: :func:`expected_for_tokens` and :func:`expected_for_attempts` recompute, from the metered
  figures and the prices alone (catalogue, offers), what each key must have posted to each account.
- Rule 2: :func:`reconcile` compares the ledger's (key, account, kind) sums with those expectations
  over the kinds expected, and lists every difference: ``missing`` (expected, not posted),
  ``unexpected`` (posted, not expected), ``amount`` (both, different). ``ok`` only with none.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import msgspec

from controlplane.market import catalogue, ledger, offers, postings


class Expected(msgspec.Struct, frozen=True, kw_only=True):
    key: str
    account: str
    kind: str
    amount_fen: int


class TokenLine(msgspec.Struct, frozen=True, kw_only=True):
    """A metered usage line as flushed (``usage.UsageRow`` plus the flush it went out in)."""

    flush: str
    tenant: str
    model: str
    site: str
    prompt_tokens: int
    completion_tokens: int


class MeteredAttempt(msgspec.Struct, frozen=True, kw_only=True):
    """A metered attempt (``lifecycle.Meter``) with the offer it was billed at."""

    job_id: str
    attempt: int
    cards: int
    start_at: float
    end_at: float
    offer: offers.Offer


class Difference(msgspec.Struct, frozen=True, kw_only=True):
    key: str
    account: str
    kind: str
    ledger_fen: int
    expected_fen: int
    problem: str


class Reconciliation(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    checked: int
    """(key, account, kind) triples compared."""
    ledger_fen: int
    expected_fen: int
    differences: list[Difference]


def expected_for_tokens(lines: Iterable[TokenLine], models: Mapping[str, catalogue.ModelRecord]) -> list[Expected]:
    """Each usage line's tenant charge at the catalogue's prices (``token_charge``)."""
    out = []
    for line in lines:
        price = catalogue.price_usage(models[line.model], line.prompt_tokens, line.completion_tokens)
        out.append(Expected(key=postings.usage_key(line.flush, line.tenant, line.model, line.site),
                            account=postings.tenant_account(line.tenant), kind="token_charge", amount_fen=-price))
    return out


def expected_for_attempts(attempts: Iterable[MeteredAttempt], fees: postings.Fees = postings.DEFAULT_FEES) -> list[Expected]:
    """Each attempt's owner earning: cards × billed hours × offer (``earning``)."""
    return [
        Expected(key=postings.attempt_key(a.job_id, a.attempt),
                 account=postings.provider_account(a.offer.provider, fees), kind="earning",
                 amount_fen=offers.lease_price(a.offer, a.cards, a.start_at, max(a.end_at, a.start_at)))
        for a in attempts
    ]


def reconcile(txns: Iterable[ledger.Transaction], expected: Iterable[Expected]) -> Reconciliation:
    """Rule 2."""
    want: dict[tuple[str, str, str], int] = {}
    for x in expected:
        k = (x.key, x.account, x.kind)
        want[k] = want.get(k, 0) + x.amount_fen
    kinds = {k[2] for k in want}
    have: dict[tuple[str, str, str], int] = {}
    for t in txns:
        for e in t.entries:
            if e.kind in kinds:
                k = (t.key, e.account, e.kind)
                have[k] = have.get(k, 0) + e.amount_fen
    diffs = []
    for k in sorted(want.keys() | have.keys()):
        w, h = want.get(k), have.get(k)
        if w == h:
            continue
        if h is None:
            if w == 0:
                continue  # a zero charge posts no entry
            problem = "missing"
        elif w is None:
            problem = "unexpected"
        else:
            problem = "amount"
        diffs.append(Difference(key=k[0], account=k[1], kind=k[2], ledger_fen=h or 0, expected_fen=w or 0,
                                problem=problem))
    return Reconciliation(ok=not diffs, checked=len(want.keys() | have.keys()), ledger_fen=sum(have.values()),
                          expected_fen=sum(want.values()), differences=diffs)
