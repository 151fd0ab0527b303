"""The market on the replicated record: two hub processes, each with its own SQLite file, on one
real 3-node nats-server cluster (``record = "nats"``).

What these prove (each failed when the market's tables were local to each process): charges
posted at hub A are in the statement, totals and reconciliation read at hub B, and the other way
round; a budget set at A is enforced at B against what A charged; an offer published at the
process that does not lead is priced by the leader's placement, and withdrawn there too; a usage
flush of more lines than one record batch takes lands whole; a job accepted at A holds the
tenant's budget at B until it ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controlplane.core import placement
from controlplane.core.errors import Refused
from controlplane.core.jobspec import JobSpec
from controlplane.hub import Hub
from controlplane.store.market import ledger as ledger_store
from edge_agent import wire
from tests.support.hubrig import Client, hub_config, running_hub, services_of
from tests.support.natscluster import NatsCluster
from tests.support.waiting import until

MODEL = {"owner": "acme", "input_fen_per_mtok": 1_000_000, "output_fen_per_mtok": 2_000_000}
"""1 fen per input token, 2 per output token."""

pytestmark = pytest.mark.serial  # several hubs on a fresh 3-node cluster (as test_replicated_store)


def config(tmp: Path, cluster: NatsCluster, name: str) -> Any:
    (tmp / name).mkdir(exist_ok=True)
    return hub_config(tmp / name, ",".join(cluster.urls), hub_id=name, record="nats")


@pytest.fixture
async def two(tmp_path: Path, cluster: NatsCluster) -> AsyncIterator[tuple[Hub, Hub, Client, Client, str]]:
    """Hubs A and B, an admin client of each, and tenant acme's key (made at A)."""
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(running_hub(config(tmp_path, cluster, "hub-a")))
        b = await stack.enter_async_context(running_hub(config(tmp_path, cluster, "hub-b")))
        session = await stack.enter_async_context(aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)))
        admin_key = a.create_admin_key("test")
        acme_key = a.create_tenant("acme")
        admin_a = Client(session, f"http://127.0.0.1:{a.http_port}", admin_key)
        admin_b = Client(session, f"http://127.0.0.1:{b.http_port}", admin_key)
        await until(lambda: b.tenancy.tenant("acme") is not None, 5, "acme at B")
        yield a, b, admin_a, admin_b, acme_key


def flush(hub: Hub, prompt: int, completion: int, site: str = "hz-edge") -> None:
    hub.accounting.buffer.add("acme", "chat", site, prompt, completion)
    hub.accounting.flush()


async def test_charges_posted_at_either_hub_are_in_the_statement_read_at_the_other(two) -> None:  # type: ignore[no-untyped-def]
    a, b, admin_a, admin_b, _ = two
    status, body, _ = await admin_a.call("PUT", "/v1/market/models/chat", MODEL)
    assert status == 200, body
    await until(lambda: "chat" in {m["id"] for m in services_of(b).market.models()}, 5, "the model at B")
    services_of(b).market.refresh()
    flush(a, 100, 20)                                   # 140 fen, posted at A
    flush(b, 7, 3, site="sh-hub")                       # 13 fen, posted at B
    for hub in (a, b):
        await until(lambda hub=hub: len(ledger_store.load(hub.db)) == 2, 5, f"both postings at {hub}")
    for admin in (admin_a, admin_b):
        status, st, _ = await admin.call("GET", "/v1/statements?account=tenant:acme")
        assert status == 200 and st["closing_fen"] == -153, st
        assert sorted(line["amount_fen"] for line in st["lines"]) == [-140, -13]
        status, rec, _ = await admin.call("GET", "/v1/market/reconcile")
        assert status == 200 and rec["ok"] is True and rec["checked"] == 2 and rec["ledger_fen"] == -153, rec
        status, totals, _ = await admin.call("GET", "/v1/market/totals")
        assert totals["tenants_owe_fen"] == {"acme": 153} and totals["imbalance_fen"] == 0, totals
    # Each entry exactly once at each process, derived from its transaction's body.
    entries = "SELECT key, line, account, amount_fen FROM market_entries ORDER BY key, line"
    assert a.db.conn.execute(entries).fetchall() == b.db.conn.execute(entries).fetchall()
    assert len(a.db.conn.execute(entries).fetchall()) == sum(len(t.entries) for t in ledger_store.load(a.db))


async def test_a_flush_of_more_lines_than_one_record_batch_holds_lands_whole(two) -> None:  # type: ignore[no-untyped-def]
    """600 priced lines are 1200 rows of the record (line + ledger transaction), more than one
    batch takes (1000): the flush goes in chunks, every line lands, at both processes."""
    a, b, admin_a, _, _ = two
    assert (await admin_a.call("PUT", "/v1/market/models/chat", MODEL))[0] == 200
    await until(lambda: "chat" in {m["id"] for m in services_of(a).market.models()}, 5, "the model at A")
    for i in range(600):
        a.accounting.buffer.add("acme", "chat", f"site-{i}", 1, 1)
    a.accounting.flush()
    assert a.accounting.pending_rows == 0
    await until(lambda: len(ledger_store.load(b.db)) == 600, 10, "600 postings at B")
    assert ledger_store.balances(b.db)["tenant:acme"] == -600 * 3
    assert services_of(b).market.reconcile().ok


async def test_a_budget_set_at_a_is_enforced_at_b_against_what_a_charged(two) -> None:  # type: ignore[no-untyped-def]
    a, b, admin_a, admin_b, _ = two
    assert (await admin_a.call("PUT", "/v1/market/models/chat", MODEL))[0] == 200
    status, body, _ = await admin_a.call("PUT", "/v1/tenants/acme/budget", {"limit_fen": 150, "period": "month"})
    assert status == 200, body
    flush(a, 100, 20)                                   # 140 of 150 fen spent, at A
    await until(lambda: len(ledger_store.load(b.db)) == 1, 5, "A's posting at B")
    status, body, _ = await admin_b.call("GET", "/v1/tenants/acme/budget")
    assert status == 200 and body["limit_fen"] == 150 and body["spent_fen"] == 140, body
    market_b = services_of(b).market
    market_b.refresh()
    req = wire.InferRequest(request_id="r1", tenant="acme", model="chat", prompt="hi" * 4, max_tokens=4)
    with pytest.raises(Refused) as refused:             # 8 bytes of prompt + 2 × 4 = 16 fen > 10 left
        market_b.admit(req, market_b.clock.time())
    assert refused.value.status == 402
    assert refused.value.body["budget"]["spent_fen"] == 140 and refused.value.body["budget"]["limit_fen"] == 150
    small = wire.InferRequest(request_id="r2", tenant="acme", model="chat", prompt="hi", max_tokens=1)
    market_b.admit(small, market_b.clock.time())        # 2 + 2 = 4 fen fits
    market_b.release("r2")


async def test_an_offer_published_away_from_the_leader_is_priced_by_its_placement(two) -> None:  # type: ignore[no-untyped-def]
    a, b, admin_a, admin_b, _ = two
    await until(lambda: services_of(a).leadership.leading or services_of(b).leadership.leading, 10, "a leader")
    leader, follower_admin = (a, admin_b) if services_of(a).leadership.leading else (b, admin_a)
    offer = {"id": "hz-day", "pool": "hz-edge", "provider": "cpn-operator", "accelerator": "910B",
             "fen_per_card_hour": 1234}
    status, body, _ = await follower_admin.call("POST", "/v1/market/offers", offer)
    assert status == 201, body
    pool = placement.Pool(id="hz-edge", cards_total={"910B": 8}, cards_free={"910B": 8})
    market = services_of(leader).market

    def priced() -> dict[str, tuple[float, ...]]:
        market.refresh()
        return market.price_pools([pool], market.clock.time())[0].card_hour_cny

    await until(lambda: priced() == {"910B": (12.34,) * 24}, 5, "the leader pricing the offer")
    assert (await follower_admin.call("DELETE", "/v1/market/offers/hz-day"))[0] == 200
    await until(lambda: priced() == {}, 5, "the withdrawal at the leader")


async def test_a_job_accepted_at_one_hub_holds_the_budget_at_the_other_until_it_ends(two) -> None:  # type: ignore[no-untyped-def]
    """Jobs' holds are in the record (in the job's stored spec): a job accepted at A holding 700 fen
    leaves 300 of a 1000 fen budget at B; cancelled at A, it holds nothing at B."""
    a, b, admin_a, _, _ = two
    assert (await admin_a.call("PUT", "/v1/market/models/chat", MODEL))[0] == 200
    assert (await admin_a.call("PUT", "/v1/tenants/acme/budget", {"limit_fen": 1000}))[0] == 200
    spec = JobSpec(cards=1, accelerators=("910B",), est_hours=1.0, budget_hold_fen=700)
    job, _ = services_of(a).training.submit("acme", spec, None, "h1", time.time())
    market_b = services_of(b).market

    def held_at_b() -> int:
        market_b.refresh()
        return market_b.jobs_held_fen("acme")

    await until(lambda: held_at_b() == 700, 5, "A's job holding at B")
    needs_400 = wire.InferRequest(request_id="r1", tenant="acme", model="chat", prompt="x" * 396, max_tokens=2)
    with pytest.raises(Refused) as refused:
        market_b.admit(needs_400, time.time())
    assert refused.value.body["budget"]["held_fen"] == 700 and refused.value.body["budget"]["incoming_fen"] == 400
    services_of(a).training.cancel(job.id, "acme", time.time())
    await until(lambda: held_at_b() == 0, 5, "the cancelled job's hold released at B")
    market_b.admit(needs_400, time.time())
    market_b.release("r1")


async def test_a_usage_flush_without_quorum_never_holds_the_loop_and_lands_once_it_is_back(
        tmp_path: Path, cluster: NatsCluster) -> None:
    """The regression of the home-region cut (tests/e2e/test_regions.py): a priced flush writes the
    market's rows to the record in its transaction, which blocks its loop while the record answers.
    Without quorum that flush failed, was kept and tried again a second later, for ever: each try
    held the loop for up to a write deadline (the regions test's fault proxies share that loop, so
    the healed gateway links never came back). Now a flush waits for the record to answer (an
    awaited read barrier) and only then writes: no flush holds the loop without quorum, and once
    two nodes of three are back the line lands, once."""
    deadline_s = 3.0
    cfg = dict(record_write_deadline_s=deadline_s, usage_flush_s=0.2)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(running_hub(
            hub_config(tmp_path / "a", ",".join(cluster.urls), hub_id="hub-a", record="nats", **cfg)))
        b = await stack.enter_async_context(running_hub(
            hub_config(tmp_path / "b", ",".join(cluster.urls), hub_id="hub-b", record="nats", **cfg)))
        session = await stack.enter_async_context(aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)))
        a.create_tenant("acme")
        admin_a = Client(session, f"http://127.0.0.1:{a.http_port}", a.create_admin_key("test"))
        assert (await admin_a.call("PUT", "/v1/market/models/chat", MODEL))[0] == 200
        await until(lambda: "chat" in {m["id"] for m in services_of(a).market.models()}, 5, "the model at A")

        for node in cluster.nodes[1:]:
            await cluster.kill(node.name)
        # time every flush of A's loop (a flush is synchronous: its time is the loop's)
        held: list[float] = []
        flush = a.accounting.flush

        def timed() -> None:
            t0 = time.monotonic()
            try:
                flush()
            finally:
                held.append(time.monotonic() - t0)

        # the first flush finds the quorum lost (it may wait once, up to its deadline); from then
        # on the record refuses writes but for a probe now and then, and no flush waits for one
        a.accounting.buffer.add("acme", "chat", "hz-edge", 1, 1)
        bridge = a.db.write_hook.bridge
        await until(lambda: bridge.degraded_since is not None, 30, "A's record refusing writes")
        a.accounting.flush = timed  # type: ignore[method-assign]
        await asyncio.sleep(3 * deadline_s)
        assert sum(held) < deadline_s / 2, f"flushes held the loop {sum(held):.2f} s without quorum: {held}"
        assert a.accounting.pending_rows == 1  # kept for when the record answers

        for node in cluster.nodes[1:]:
            await cluster.restart(node.name)
        await until(lambda: a.accounting.pending_rows == 0, 60, "the flush at A once the quorum is back")
        # B's projection catches up by its watch, or, if the faults left it silent, by its supervisor
        # reading what it misses from the record (within two checks of the record answering)
        await until(lambda: len(ledger_store.load(b.db)) == 1, 5, "the line at B",
                    last=lambda: dict(lines_b=len(ledger_store.load(b.db)), lines_a=len(ledger_store.load(a.db)),
                                      revision_b=b.db.write_hook.bridge.projection.revision,
                                      revision_a=a.db.write_hook.bridge.projection.revision,
                                      restarts_b=b.db.write_hook.bridge.projection.restarts,
                                      filled_b=b.db.write_hook.bridge.projection.filled))
        assert ledger_store.balances(b.db)["tenant:acme"] == -3
