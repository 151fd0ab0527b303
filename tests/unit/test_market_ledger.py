"""The ledger, statements, CSV, postings and reconciliation (controlplane/market/ledger.py,
postings.py, reconcile.py)."""

from __future__ import annotations

import csv
import io

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.market import catalogue, ledger, offers, postings, quotes, reconcile

T0 = 1_796_000_400.0
MODEL = catalogue.ModelRecord(id="qwen2-7b", owner="modelco", input_fen_per_mtok=200, output_fen_per_mtok=600,
                              owner_share_bp=3000)
OFFER = offers.Offer(id="zw-o", pool="nx-zw", provider="westgrid", accelerator="910B", fen_per_card_hour=900)


def attempt(n: int, hours: float, start: float = T0, offer: offers.Offer = OFFER) -> quotes.AttemptUsage:
    return quotes.AttemptUsage(attempt=n, pool=offer.pool, cards=8, start_at=start, end_at=start + hours * 3600.0,
                               offer=offer)


def test_transaction_must_balance_and_name_valid_accounts() -> None:
    e = ledger.Entry
    ok = ledger.transaction("k", T0, "x", [e(account="tenant:a", amount_fen=-5, kind="c"),
                                            e(account="operator:margin", amount_fen=5, kind="c"),
                                            e(account="provider:p", amount_fen=0, kind="c")])
    assert [x.account for x in ok.entries] == ["tenant:a", "operator:margin"]    # zero lines dropped
    with pytest.raises(ledger.UnbalancedTransaction, match="sum to 1 fen"):
        ledger.transaction("k", T0, "x", [e(account="tenant:a", amount_fen=1, kind="c")])
    with pytest.raises(ledger.UnbalancedTransaction, match="not an int"):
        ledger.transaction("k", T0, "x", [e(account="tenant:a", amount_fen=0.5, kind="c")])  # type: ignore[arg-type]
    with pytest.raises(ledger.UnbalancedTransaction, match="finite"):
        ledger.transaction("k", float("nan"), "x", [])
    with pytest.raises(ledger.UnbalancedTransaction, match="is not tenant"):
        ledger.transaction("k", T0, "x", [e(account="bank", amount_fen=0, kind="c")])


def test_reposting_is_idempotent_and_a_different_body_is_a_conflict() -> None:
    book = ledger.Ledger()
    txn = postings.usage_transaction("f1", T0, "acme", MODEL, "hz-edge", 1_000_000, 1_000_000)
    assert isinstance(book.post(txn), ledger.Posted)
    assert isinstance(book.post(txn), ledger.Replayed)
    other = postings.usage_transaction("f1", T0, "acme", MODEL, "hz-edge", 1_000_000, 2_000_000)
    result = book.post(other)
    assert isinstance(result, ledger.Conflict) and result.existing == txn
    assert len(book) == 1 and book.get(txn.key) == txn
    assert repr(book) == "<Ledger transactions=1 entries=3 volume_fen=800 replays=1 conflicts=1>"


def test_token_usage_posts_charge_owner_share_and_operator_revenue() -> None:
    txn = postings.usage_transaction("f1", T0, "acme", MODEL, "hz-edge", 1_000_000, 1_000_000)
    assert {(x.account, x.amount_fen, x.kind) for x in txn.entries} == {
        ("tenant:acme", -800, "token_charge"), ("tenant:modelco", 240, "owner_share"),
        ("operator:margin", 560, "token_revenue")}
    own = postings.usage_transaction("f1", T0, "modelco", MODEL, "hz-edge", 1_000_000, 0)
    assert {(x.account, x.amount_fen) for x in own.entries} == {("tenant:modelco", -200), ("operator:margin", 200)}


def test_a_third_party_provider_earns_card_hours_times_its_offer() -> None:
    charge = quotes.charge_for(None, [attempt(1, 2.0), attempt(2, 3.5, start=T0 + 3 * 3600)])
    txns = postings.job_transactions("acme", "j1", charge)
    book = ledger.Ledger(txns)
    st_ = ledger.statement(book, "provider:westgrid", T0, T0 + 86_400)
    earnings = sum(line.amount_fen for line in st_.lines if line.entry_kind == "earning")
    assert earnings == 8 * 5.5 * 900 == 39_600
    commission = -sum(line.amount_fen for line in st_.lines if line.entry_kind == "commission")
    assert commission == 3960 and st_.closing_fen == 39_600 - 3960
    totals = postings.party_totals(list(book), T0, T0 + 86_400)
    assert totals.tenants_owe_fen == {"acme": 39_600}
    assert totals.providers_earn_fen == {"westgrid": 35_640}
    assert totals.operator_kept_fen == 3960


def test_the_operators_own_pools_earn_into_operator_pools_without_commission() -> None:
    own = msgspec.structs.replace(OFFER, provider="cpn-operator")
    charge = quotes.charge_for(None, [attempt(1, 1.0, offer=own)])
    (txn,) = postings.job_transactions("acme", "j1", charge)
    assert {(x.account, x.amount_fen) for x in txn.entries} == {("tenant:acme", -7200), ("operator:pools", 7200)}


def test_statement_csv() -> None:
    book = ledger.Ledger(postings.job_transactions("acme", "j1", quotes.charge_for(None, [attempt(1, 1.0)])))
    text = ledger.statement_csv(ledger.statement(book, "tenant:acme", T0 - 60, T0 + 86_400))
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == list(ledger.CSV_COLUMNS)
    assert rows[1][2] == "opening" and rows[-1][2] == "closing"
    assert rows[2][1:3] == ["job:j1:attempt:1", "training"] and rows[2][6:] == ["-7200", "-72.00", "-7200"]
    assert rows[-1][6:] == ["-7200", "-72.00", "-7200"]
    assert rows[2][0] == "2026-11-30T10:00:00+08:00"      # the attempt's end, China local time


def test_reconciliation_lists_every_difference() -> None:
    metered = [reconcile.MeteredAttempt(job_id="j1", attempt=1, cards=8, start_at=T0, end_at=T0 + 3600, offer=OFFER)]
    lines = [reconcile.TokenLine(flush="f1", tenant="acme", model=MODEL.id, site="hz", prompt_tokens=10**6,
                                 completion_tokens=10**6)]
    expected = (reconcile.expected_for_attempts(metered)
                + reconcile.expected_for_tokens(lines, {MODEL.id: MODEL}))
    txns = postings.job_transactions("acme", "j1", quotes.charge_for(None, [attempt(1, 1.0)]))
    txns.append(postings.usage_transaction("f1", T0, "acme", MODEL, "hz", 10**6, 10**6))
    good = reconcile.reconcile(txns, expected)
    assert good.ok and good.differences == [] and good.checked == 2
    # a fen off, a missing line, an unexpected one
    wrong = postings.usage_transaction("f1", T0, "acme", MODEL, "hz", 10**6, 10**6 + 2_000)
    extra = postings.usage_transaction("f2", T0, "beta", MODEL, "hz", 10**6, 10**6)
    bad = reconcile.reconcile([wrong, extra], expected)
    assert not bad.ok
    assert [(d.key, d.problem, d.ledger_fen, d.expected_fen) for d in bad.differences] == [
        ("job:j1:attempt:1", "missing", 0, 7200),
        ("usage:f1:acme:qwen2-7b:hz", "amount", -801, -800),
        ("usage:f2:beta:qwen2-7b:hz", "unexpected", -800, 0),
    ]


_entries = st.lists(st.tuples(st.sampled_from(["tenant:a", "tenant:b", "provider:p", "operator:margin"]),
                              st.integers(-10**9, 10**9)), min_size=1, max_size=6)


def _balanced(key: str, at: float, pairs: list[tuple[str, int]]) -> ledger.Transaction:
    entries = [ledger.Entry(account=a, amount_fen=v, kind="x") for a, v in pairs]
    entries.append(ledger.Entry(account="operator:margin", amount_fen=-sum(v for _, v in pairs), kind="x"))
    return ledger.transaction(key, at, "test", entries)


@given(txns=st.lists(st.tuples(st.floats(0, 1e6), _entries), max_size=25),
       window=st.tuples(st.floats(0, 1e6), st.floats(0, 1e6)))
def test_books_balance_and_statements_equal_the_sum_of_their_entries(
        txns: list[tuple[float, list[tuple[str, int]]]], window: tuple[float, float]) -> None:
    book = ledger.Ledger(_balanced(f"k{i}", at, pairs) for i, (at, pairs) in enumerate(txns))
    for t in book:
        assert sum(e.amount_fen for e in t.entries) == 0
    assert sum(ledger.balances(book).values()) == 0
    start, end = sorted(window)
    for account in ledger.accounts(book):
        s = ledger.statement(book, account, start, end)
        assert s.closing_fen - s.opening_fen == sum(line.amount_fen for line in s.lines) == s.credits_fen - s.debits_fen
        assert s.opening_fen == ledger.balances(book, before=start).get(account, 0)
        assert s.closing_fen == ledger.balances(book, before=end).get(account, 0)
        if s.lines:
            assert s.lines[-1].balance_fen == s.closing_fen


@given(pairs=_entries, at=st.floats(0, 1e6))
def test_reposting_changes_nothing(pairs: list[tuple[str, int]], at: float) -> None:
    txn = _balanced("k", at, pairs)
    book = ledger.Ledger([txn])
    before = (list(book), ledger.balances(book))
    assert isinstance(book.post(txn), ledger.Replayed)
    assert (list(book), ledger.balances(book)) == before
