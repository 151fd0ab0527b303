"""What each priced event posts to the ledger: accounts, the operator's fees, and the transactions
for a training attempt and a line of token usage. Pure.

Accounts (``ledger`` Rule 1 signs: + credits, − debits):

| account | holds |
|---|---|
| ``tenant:<id>`` | what the tenant is charged (negative: it owes), and owner shares it earns |
| ``provider:<id>`` | a third-party provider's gross earnings at its offers, less the operator's commission |
| ``operator:pools`` | gross earnings of the operator's own pools (the operator is a provider too) |
| ``operator:margin`` | commissions on third-party pools and token revenue |
| ``operator:quote-risk`` | what the network absorbed when a quote's cap bound (negative) |

What the network kept over a period = the sum of the ``operator:`` accounts.

Promises:

- Rule 1: a training attempt posts: tenant −(its capped charge); the pool's owner +(card-hours ×
  offer, the attempt's price); for a third-party pool the owner −commission and
  ``operator:margin`` +commission; ``operator:quote-risk`` −(price − capped charge). A provider's
  ``earning`` lines therefore equal its pools' card-hours × its offers exactly.
- Rule 2: a line of token usage posts: tenant −price; the model's owner +share (when another tenant
  called it and the model has an ``owner_share_bp``); ``operator:margin`` +the rest.
- Rule 3: keys are derived from what is billed (:func:`attempt_key`, :func:`usage_key`), so the
  same event always posts under the same key.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from controlplane.market import catalogue, ledger, money, quotes

OPERATOR_POOLS = "operator:pools"
OPERATOR_MARGIN = "operator:margin"
OPERATOR_RISK = "operator:quote-risk"


class Fees(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The operator's terms."""

    operator_provider: str = "cpn-operator"
    """The provider id of the operator's own pools (``topology`` sites' ``provider``)."""
    commission_bp: int = 1000
    """Commission on third-party pools' earnings, in basis points (10 %, illustrative)."""


DEFAULT_FEES = Fees()


def tenant_account(tenant: str) -> str:
    return f"tenant:{tenant}"


def provider_account(provider: str, fees: Fees = DEFAULT_FEES) -> str:
    """The account a pool owner earns into: ``operator:pools`` for the operator's own pools."""
    return OPERATOR_POOLS if provider == fees.operator_provider else f"provider:{provider}"


def attempt_key(job_id: str, attempt: int) -> str:
    return f"job:{job_id}:attempt:{attempt}"


def usage_key(flush: str, tenant: str, model: str, site: str) -> str:
    return f"usage:{flush}:{tenant}:{model}:{site}"


def attempt_transaction(tenant: str, job_id: str, line: quotes.ChargeLine, tenant_fen: int, *,
                        quote_id: str = "", fees: Fees = DEFAULT_FEES) -> ledger.Transaction:
    """Rule 1 for one attempt, the tenant paying ``tenant_fen`` (<= the attempt's price; see
    ``quotes.attempt_charge``).

    Raises:
        ledger.UnbalancedTransaction: ``tenant_fen`` is negative or above the attempt's price.
    """
    if not 0 <= tenant_fen <= line.price_fen:
        raise ledger.UnbalancedTransaction(
            f"{attempt_key(job_id, line.attempt)}: tenant share {tenant_fen} outside 0..{line.price_fen}")
    owner = provider_account(line.provider, fees)
    commission = 0 if owner == OPERATOR_POOLS else money.basis_points(line.price_fen, fees.commission_bp)
    hours = line.cards * (line.billed_end_at - line.start_at) / 3600.0
    what = f"{line.cards} {line.accelerator} at {line.pool}, {hours:.4f} card-h at offer {line.offer_id}"
    entries = [
        ledger.Entry(account=tenant_account(tenant), amount_fen=-tenant_fen, kind="charge",
                     memo=what + (f", quote {quote_id}" if quote_id else "")),
        ledger.Entry(account=owner, amount_fen=line.price_fen, kind="earning", memo=what),
        ledger.Entry(account=owner, amount_fen=-commission, kind="commission", memo=f"{fees.commission_bp} bp"),
        ledger.Entry(account=OPERATOR_MARGIN, amount_fen=commission, kind="commission", memo=line.provider),
        ledger.Entry(account=OPERATOR_RISK, amount_fen=tenant_fen - line.price_fen, kind="quote_absorbed",
                     memo=f"over quote {quote_id}" if quote_id else ""),
    ]
    return ledger.transaction(attempt_key(job_id, line.attempt), line.end_at, "training", entries, ref=job_id)


def job_transactions(tenant: str, job_id: str, charge: quotes.Charge, *, quote_id: str = "",
                     fees: Fees = DEFAULT_FEES) -> list[ledger.Transaction]:
    """A whole job's attempts as transactions, the cap taken in attempt order: the tenant lines sum
    to ``charge.charged_fen`` and the owners' earning lines to ``charge.metered_fen``."""
    out = []
    so_far = 0
    for line in charge.lines:
        share = quotes.attempt_charge(charge.cap_fen, so_far, line.price_fen)
        so_far += share
        out.append(attempt_transaction(tenant, job_id, line, share, quote_id=quote_id, fees=fees))
    return out


def usage_transaction(flush: str, at: float, tenant: str, model: catalogue.ModelRecord, site: str,
                      prompt_tokens: int, completion_tokens: int) -> ledger.Transaction:
    """Rule 2 for one flushed usage line (tenant, model, site) at the catalogue's prices."""
    price = catalogue.price_usage(model, prompt_tokens, completion_tokens)
    share = money.basis_points(price, model.owner_share_bp) if model.owner != tenant else 0
    what = f"{prompt_tokens} in + {completion_tokens} out tokens of {model.id} at {site}"
    entries = [
        ledger.Entry(account=tenant_account(tenant), amount_fen=-price, kind="token_charge", memo=what),
        ledger.Entry(account=tenant_account(model.owner), amount_fen=share, kind="owner_share", memo=model.id),
        ledger.Entry(account=OPERATOR_MARGIN, amount_fen=price - share, kind="token_revenue", memo=model.id),
    ]
    return ledger.transaction(usage_key(flush, tenant, model.id, site), at, "tokens", entries,
                              ref=f"{model.id}@{site}")


def adjustment(key: str, at: float, account: str, amount_fen: int, counter_account: str, memo: str) -> ledger.Transaction:
    """A correction (a credit note, a write-off): ``amount_fen`` to ``account``, the opposite to
    ``counter_account``. Entries are never edited: this is how a mistake is put right."""
    return ledger.transaction(key, at, "adjustment", [
        ledger.Entry(account=account, amount_fen=amount_fen, kind="adjustment", memo=memo),
        ledger.Entry(account=counter_account, amount_fen=-amount_fen, kind="adjustment", memo=memo),
    ])


SPENDING_KINDS = frozenset({"charge", "token_charge", "adjustment"})
"""Entry kinds on a tenant's account that count against its budget (an owner share it earns does not)."""


def spent_fen(txns: Sequence[ledger.Transaction], tenant: str, start: float, end: float) -> int:
    """What ``tenant`` spent in ``[start, end)``: its charges less credit adjustments (budgets' ``spent``)."""
    account = tenant_account(tenant)
    return -sum(e.amount_fen for t in txns if start <= t.at < end
                for e in t.entries if e.account == account and e.kind in SPENDING_KINDS)


class PartyTotals(msgspec.Struct, frozen=True, kw_only=True):
    """Over a period: what each tenant owes (net charges), each provider earns (net), the network kept."""

    tenants_owe_fen: dict[str, int]
    providers_earn_fen: dict[str, int]
    operator_kept_fen: int
    operator_by_account_fen: dict[str, int]


def party_totals(txns: Sequence[ledger.Transaction], start: float, end: float) -> PartyTotals:
    """The operator's three answers for ``[start, end)``; they sum to zero (owed = earned + kept)."""
    moved: dict[str, int] = {}
    for t in txns:
        if start <= t.at < end:
            for e in t.entries:
                moved[e.account] = moved.get(e.account, 0) + e.amount_fen
    tenants = {a.split(":", 1)[1]: -v for a, v in sorted(moved.items()) if a.startswith("tenant:")}
    providers = {a.split(":", 1)[1]: v for a, v in sorted(moved.items()) if a.startswith("provider:")}
    operator = {a: v for a, v in sorted(moved.items()) if a.startswith("operator:")}
    return PartyTotals(tenants_owe_fen=tenants, providers_earn_fen=providers,
                       operator_kept_fen=sum(operator.values()), operator_by_account_fen=operator)
