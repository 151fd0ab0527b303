"""The ledger: immutable, idempotent, double-entry transactions in integer fen. Pure.

What this module promises:

- Rule 1 (double entry): a :class:`Transaction` is built only by :func:`transaction`, which refuses
  one whose entries do not sum to exactly zero, or that carries a non-int amount or an account
  that is not ``tenant:<id>``, ``provider:<id>`` or ``operator:<name>``. Sign: a positive amount
  credits the account (it earns, or is owed), a negative one debits it (it pays, or owes). Every
  balance over all accounts is therefore zero, always.
- Rule 2 (idempotent): each transaction has a key (``job:<id>:attempt:<n>``,
  ``usage:<flush>:<tenant>:<model>:<site>``, ...). Posting a key again with the same transaction
  changes nothing (:class:`Replayed`); with a different one it is refused (:class:`Conflict`),
  never overwritten. Build transactions from the event's own times and figures, not the clock,
  so a retry builds the same transaction.
- Rule 3 (immutable): entries are never edited or deleted; a correction is a new transaction.
- Rule 4 (statements): :func:`statement` lists an account's entries in a period with running
  balances; closing − opening is exactly the sum of its lines. :func:`statement_csv` renders one
  as CSV text (no file I/O).

:class:`Ledger` is the in-memory book (tests, ``cpn sim``); ``controlplane.store.market.ledger``
keeps the same rules in SQLite.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from collections.abc import Iterable, Iterator
from typing import Literal

import msgspec

from controlplane.market import money

ACCOUNT_RE = re.compile(r"^(tenant|provider|operator):[a-z0-9][a-z0-9_.-]{0,62}$")
_CHINA = dt.timezone(dt.timedelta(hours=8))


class UnbalancedTransaction(ValueError):
    """A transaction that would break double entry (a bug in the caller: a 5xx, never a 4xx)."""


class Entry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One side of a transaction: ``amount_fen`` credited (+) or debited (−) to ``account``."""

    account: str
    amount_fen: int
    kind: str
    """What the line is: ``charge``, ``earning``, ``commission``, ``quote_absorbed``, ``token_charge``,
    ``token_revenue``, ``owner_share``, ``adjustment``."""
    memo: str = ""


class Transaction(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A balanced set of entries, posted once under ``key``."""

    key: str
    at: float
    """Epoch seconds the transaction belongs to (the metered end, not the posting time)."""
    kind: str
    ref: str = ""
    """What it is about (a job id, a usage line), for statements."""
    entries: tuple[Entry, ...] = ()


def transaction(key: str, at: float, kind: str, entries: Iterable[Entry], *, ref: str = "") -> Transaction:
    """A checked :class:`Transaction` (Rule 1); zero-amount entries are dropped.

    Raises:
        UnbalancedTransaction: entries do not sum to zero, an amount is not an int, an account is
            malformed, or the key is empty.
    """
    if not key or len(key) > 512:
        raise UnbalancedTransaction(f"transaction key must be 1..512 characters, got {key!r}")
    if not (isinstance(at, (int, float)) and at == at and abs(at) != float("inf")):
        raise UnbalancedTransaction(f"{key}: at must be finite epoch seconds, got {at!r}")
    kept: list[Entry] = []
    for e in entries:
        if type(e.amount_fen) is not int:  # noqa: E721
            raise UnbalancedTransaction(f"{key}: amount for {e.account} is not an int of fen: {e.amount_fen!r}")
        if not ACCOUNT_RE.match(e.account):
            raise UnbalancedTransaction(f"{key}: account {e.account!r} is not tenant:/provider:/operator:<id>")
        if e.amount_fen:
            kept.append(e)
    total = sum(e.amount_fen for e in kept)
    if total != 0:
        raise UnbalancedTransaction(f"{key}: entries sum to {total} fen, not 0")
    return Transaction(key=key, at=at, kind=kind, ref=ref, entries=tuple(kept))


class Posted(msgspec.Struct, frozen=True, tag="posted"):
    txn: Transaction


class Replayed(msgspec.Struct, frozen=True, tag="replayed"):
    txn: Transaction


class Conflict(msgspec.Struct, frozen=True, tag="conflict"):
    """The key is taken by a different transaction: nothing was posted."""

    key: str
    existing: Transaction
    message: str


PostResult = Posted | Replayed | Conflict


def repost(existing: Transaction | None, txn: Transaction) -> Literal["new", "replay"] | Conflict:
    """Rule 2 as a decision: how to post ``txn`` when ``existing`` holds its key (or None)."""
    if existing is None:
        return "new"
    if existing == txn:
        return "replay"
    return Conflict(key=txn.key, existing=existing,
                    message=f"transaction {txn.key} is already posted with other entries; post a correction instead")


class Ledger:
    """An append-only book of transactions in memory (Rules 1-3)."""

    __slots__ = ("_txns", "_by_key", "replays", "conflicts")

    def __init__(self, txns: Iterable[Transaction] = ()) -> None:
        self._txns: list[Transaction] = []
        self._by_key: dict[str, Transaction] = {}
        self.replays = 0
        self.conflicts = 0
        for t in txns:
            self.post(t)

    def __repr__(self) -> str:
        entries = sum(len(t.entries) for t in self._txns)
        volume = sum(e.amount_fen for t in self._txns for e in t.entries if e.amount_fen > 0)
        return (f"<Ledger transactions={len(self._txns)} entries={entries} volume_fen={volume} "
                f"replays={self.replays} conflicts={self.conflicts}>")

    def __len__(self) -> int:
        return len(self._txns)

    def __iter__(self) -> Iterator[Transaction]:
        return iter(self._txns)

    def get(self, key: str) -> Transaction | None:
        return self._by_key.get(key)

    def post(self, txn: Transaction) -> PostResult:
        """Post ``txn`` once (Rule 2)."""
        decision = repost(self._by_key.get(txn.key), txn)
        if decision == "new":
            self._txns.append(txn)
            self._by_key[txn.key] = txn
            return Posted(txn)
        if decision == "replay":
            self.replays += 1
            return Replayed(txn)
        assert isinstance(decision, Conflict)
        self.conflicts += 1
        return decision


# --------------------------------------------------------------------------- balances and statements


def ordered(txns: Iterable[Transaction]) -> list[Transaction]:
    """Transactions in book order: by time, then key."""
    return sorted(txns, key=lambda t: (t.at, t.key))


def balances(txns: Iterable[Transaction], *, before: float | None = None) -> dict[str, int]:
    """Every account's balance (fen), over all transactions or those before ``before``."""
    out: dict[str, int] = {}
    for t in txns:
        if before is not None and not t.at < before:
            continue
        for e in t.entries:
            out[e.account] = out.get(e.account, 0) + e.amount_fen
    return dict(sorted(out.items()))


class StatementLine(msgspec.Struct, frozen=True, kw_only=True):
    at: float
    key: str
    kind: str
    ref: str
    entry_kind: str
    memo: str
    amount_fen: int
    balance_fen: int


class Statement(msgspec.Struct, frozen=True, kw_only=True):
    """One account over ``[start, end)``: closing = opening + Σ lines (Rule 4)."""

    account: str
    start: float
    end: float
    opening_fen: int
    lines: list[StatementLine]
    closing_fen: int
    credits_fen: int
    """Sum of the positive lines (earned / owed to the account)."""
    debits_fen: int
    """Sum of the negative lines, as a positive number (charged / paid by the account)."""


def statement(txns: Iterable[Transaction], account: str, start: float, end: float) -> Statement:
    """``account``'s statement for ``[start, end)`` (epoch seconds)."""
    opening = 0
    lines: list[StatementLine] = []
    running = 0
    for t in ordered(txns):
        if t.at >= end:
            break
        for e in t.entries:
            if e.account != account:
                continue
            if t.at < start:
                opening += e.amount_fen
                continue
            if not lines:
                running = opening
            running += e.amount_fen
            lines.append(StatementLine(at=t.at, key=t.key, kind=t.kind, ref=t.ref, entry_kind=e.kind, memo=e.memo,
                                       amount_fen=e.amount_fen, balance_fen=running))
    closing = opening + sum(line.amount_fen for line in lines)
    return Statement(
        account=account, start=start, end=end, opening_fen=opening, lines=lines, closing_fen=closing,
        credits_fen=sum(line.amount_fen for line in lines if line.amount_fen > 0),
        debits_fen=-sum(line.amount_fen for line in lines if line.amount_fen < 0),
    )


def accounts(txns: Iterable[Transaction], prefix: str = "") -> list[str]:
    """Accounts that appear in ``txns`` (those starting with ``prefix``), sorted."""
    return sorted({e.account for t in txns for e in t.entries if e.account.startswith(prefix)})


def china_time(at: float) -> str:
    """Epoch seconds as ISO 8601 in China local time, to the second (statements' clock)."""
    return dt.datetime.fromtimestamp(at, _CHINA).isoformat(timespec="seconds")


CSV_COLUMNS = ("time", "transaction", "kind", "ref", "line", "memo", "amount_fen", "amount_cny", "balance_fen")


def statement_csv(st: Statement) -> str:
    """A statement as CSV text: a header, an ``opening`` row, one row per line, a ``closing`` row.
    Amounts appear both in fen (exact) and CNY (two decimals); times in China local time."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\r\n")
    w.writerow(CSV_COLUMNS)
    w.writerow([china_time(st.start), "", "opening", st.account, "", "", st.opening_fen,
                money.cny_text(st.opening_fen), st.opening_fen])
    for line in st.lines:
        w.writerow([china_time(line.at), line.key, line.kind, line.ref, line.entry_kind, line.memo,
                    line.amount_fen, money.cny_text(line.amount_fen), line.balance_fen])
    w.writerow([china_time(st.end), "", "closing", st.account, "", "", st.closing_fen - st.opening_fen,
                money.cny_text(st.closing_fen - st.opening_fen), st.closing_fen])
    return out.getvalue()
