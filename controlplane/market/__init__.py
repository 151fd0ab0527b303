"""The market: priced models and pools, quotes, budgets and a ledger in integer fen (docs/market.md).

Pure modules (no I/O, no clock: ``now`` is an argument):

- ``money`` — integer fen, exact rounding (half up, once per line), largest-remainder allocation.
- ``catalogue`` — model records, filings, the public-service filing rule and its header.
- ``offers`` — pool owners' prices per card-hour, time-of-use windows, minimum lease, margin over energy.
- ``quotes`` — priced placements with a spread, acceptance, and the capped charge.
- ``budgets`` — spend limits per period: allow / warn / refuse with figures.
- ``ledger`` — double-entry, idempotent transactions; statements; CSV.
- ``postings`` — accounts, fees, and the transactions each priced event posts.
- ``reconcile`` — the ledger against metered usage × prices.

The record: ``controlplane.store.market`` (SQLite; the only market code that touches it).
"""
