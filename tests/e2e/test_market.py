"""The market end to end: a real hub (SQLite file, aiohttp on port 0), a real nats-server and a real
agent serving ``chat`` and ``unlisted`` (sim backend) at hz-edge: the
admin API and ``cpn market`` for the catalogue, offers, budgets and tenant settings; the filing and
budget gates before a request is relayed; usage flushes posted to the ledger in the flush's own
transaction; statements (JSON and CSV) and the reconciliation."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controlplane import cli
from controlplane.core.errors import Refused
from controlplane.hub import Hub
from controlplane.nats.natsserver import NatsServer
from controlplane.services.market import MarketService
from controlplane.market import offers
from controlplane.store.db import transaction
from controlplane.store.market import billing, records
from controlplane.store.market import ledger as ledger_store
from edge_agent import wire
from edge_agent.agent import Agent
from edge_agent.config import AgentConfig, BackendConfig, BusConfig, ExecutorsConfig, ModelConfig, SimBackendConfig
from tests.support.hubrig import Client, hub_config, running_hub, services_of
from tests.support.waiting import until

MODEL = {"owner": "acme", "input_fen_per_mtok": 1_000_000, "output_fen_per_mtok": 2_000_000}
"""1 fen per input token, 2 per output token: a statement can be checked by hand."""
FILING = {"number": "Beijing-GenAI-2024-0001", "scope": "public", "filed_on": "2024-05-01"}
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def market_of(hub: Hub) -> MarketService:
    return services_of(hub).market


def records_of(hub: Hub) -> list[offers.Offer]:
    return records.list_offers(hub.db)


@pytest.fixture
async def market(tmp_path: Path, nats_server: NatsServer,
                 request: pytest.FixtureRequest) -> AsyncIterator[tuple[Hub, Client, Client, Client]]:
    """A hub, its admin, tenants acme and pub, and an agent at hz-edge; parametrize ``market``
    indirectly with the sim's milliseconds per token to make requests last (default 1)."""
    per_token_ms = getattr(request, "param", 1)
    async with running_hub(hub_config(tmp_path, nats_server.url)) as hub:
        admin_key = hub.create_admin_key("test")
        acme = hub.create_tenant("acme", default_origin="hangzhou")
        public = hub.create_tenant("pub", default_origin="hangzhou")
        agent = Agent(AgentConfig(
            site="hz-edge", nats=nats_server.url, city="hangzhou", accelerators={"910B": 4},
            data_dir=str(tmp_path / "hz-edge"),
            models=[ModelConfig(name="chat", cards=1.0, slots=16), ModelConfig(name="unlisted", cards=1.0, slots=4)],
            backend=BackendConfig(sim=SimBackendConfig(ttft_ms=1, per_token_ms=per_token_ms, slots=16)),
        ))
        await agent.start()
        try:
            await until(lambda: (v := hub.registry.get("hz-edge")) is not None and v.slots_free("chat") > 0
                        and v.slots_free("unlisted") > 0, 10, "agent serving")
            async with aiohttp.ClientSession() as session:
                base = f"http://127.0.0.1:{hub.http_port}"
                yield hub, Client(session, base, admin_key), Client(session, base, acme), Client(session, base, public)
        finally:
            await agent.stop()


async def test_catalogue_offers_budgets_and_settings_through_the_admin_api(market) -> None:  # type: ignore[no-untyped-def]
    hub, admin, acme, _ = market
    status, body, _ = await admin.call("PUT", "/v1/market/models/chat", {**MODEL, "filing": FILING})
    assert status == 200 and body["revision"] == 1 and body["filing"]["number"] == FILING["number"], body
    status, body, _ = await admin.call("PUT", "/v1/market/models/chat", {**MODEL, "version": "2"})
    assert status == 200 and body["revision"] == 2, body  # a new price or version is a new revision
    status, body, _ = await acme.call("GET", "/v1/market/models")
    assert status == 200 and [(m["id"], m["version"]) for m in body["data"]] == [("chat", "2")]

    offer = {"id": "hz-night", "pool": "hz-edge", "provider": "cpn-operator", "accelerator": "910B",
             "fen_per_card_hour": 1000, "windows": [{"start_hour": 23, "end_hour": 7, "fen_per_card_hour": 400}]}
    status, body, _ = await admin.call("POST", "/v1/market/offers", offer)
    assert status == 201 and body["provider"] == "cpn-operator", body
    status, body, _ = await admin.call("POST", "/v1/market/offers", {**offer, "valid_from": body["valid_from"]})
    assert status == 200, body  # the same offer again changes nothing
    status, body, _ = await admin.call("GET", "/v1/market/offers?pool=hz-edge")
    assert [(o["id"], o["in_force"]) for o in body["data"]] == [("hz-night", True)]
    status, body, _ = await admin.call("DELETE", "/v1/market/offers/hz-night")
    assert status == 200 and body["valid_until"] is not None
    status, body, _ = await admin.call("GET", "/v1/market/offers")
    assert [o["in_force"] for o in body["data"]] == [False]

    status, body, _ = await admin.call("PUT", "/v1/tenants/acme/budget", {"limit_fen": 5000, "period": "day"})
    assert status == 200 and body["limit_fen"] == 5000 and body["spent_fen"] == 0 and body["limit_cny"] == "50.00"
    status, body, _ = await admin.call("PUT", "/v1/tenants/pub/market",
                                       {"public_facing": True, "filing_number": "ICP-2024-7"})
    assert status == 200 and body == {"tenant": "pub", "public_facing": True, "filing_number": "ICP-2024-7"}
    status, body, _ = await admin.call("GET", "/v1/tenants/acme/market")
    assert body["public_facing"] is False

    # Tenants may read the catalogue, never change the market.
    for method, path, payload in [("PUT", "/v1/market/models/x", MODEL), ("POST", "/v1/market/offers", offer),
                                  ("PUT", "/v1/tenants/acme/budget", {"limit_fen": 1}),
                                  ("GET", "/v1/market/totals", None)]:
        status, body, _ = await acme.call(method, path, payload)
        assert status == 403, (path, body)


@pytest.mark.parametrize(("path", "payload", "status", "param"), [
    ("/v1/market/models/chat", {**MODEL, "input_fen_per_mtok": -1}, 400, "input_fen_per_mtok"),
    ("/v1/market/models/chat", {**MODEL, "input_fen_per_mtok": 1.5}, 400, "input_fen_per_mtok"),
    ("/v1/market/models/chat", {**MODEL, "owner": "nobody"}, 404, "tenant"),
    ("/v1/market/models/chat", {**MODEL, "price": 3}, 422, "price"),
    ("/v1/market/models/chat", {**MODEL, "filing": {**FILING, "scope": "world"}}, 400, "filing.scope"),
    ("/v1/market/models/Bad%20Id", MODEL, 400, "id"),
    ("/v1/tenants/acme/budget", {"limit_fen": -5}, 400, "limit_fen"),
    ("/v1/tenants/acme/budget", {"limit_fen": 5, "period": "year"}, 400, "period"),
    ("/v1/tenants/ghost/budget", {"limit_fen": 5}, 404, "tenant"),
])
async def test_bad_admin_input_is_a_4xx_naming_the_field(market, path: str, payload: dict[str, Any], status: int,
                                                         param: str) -> None:  # type: ignore[no-untyped-def]
    hub, admin, _, _ = market
    got, body, _ = await admin.call("PUT", path, payload)
    assert (got, body["error"]["param"]) == (status, param), body
    assert ledger_store.balances(hub.db) == {}


async def test_an_offer_with_overlapping_windows_or_an_unknown_pool_is_refused(market) -> None:  # type: ignore[no-untyped-def]
    _, admin, _, _ = market
    offer = {"id": "o1", "pool": "hz-edge", "provider": "cpn-operator", "accelerator": "910B", "fen_per_card_hour": 10,
             "windows": [{"start_hour": 22, "end_hour": 6, "fen_per_card_hour": 4},
                         {"start_hour": 5, "end_hour": 9, "fen_per_card_hour": 4}]}
    status, body, _ = await admin.call("POST", "/v1/market/offers", offer)
    assert status == 400 and body["error"]["param"] == "windows[1]" and "hour 5" in body["error"]["message"], body
    status, body, _ = await admin.call("POST", "/v1/market/offers", {**offer, "windows": [], "pool": "atlantis"})
    assert status == 400 and body["error"]["param"] == "pool", body
    status, body, _ = await admin.call("POST", "/v1/market/offers", {**offer, "windows": []})
    assert status == 201
    status, body, _ = await admin.call("POST", "/v1/market/offers", {**offer, "windows": [], "fen_per_card_hour": 11})
    assert status == 409 and body["error"]["param"] == "id", body  # a new price is a new offer


async def test_an_offer_naming_another_provider_than_the_pools_declared_one_is_a_422(market) -> None:  # type: ignore[no-untyped-def]
    """The operator's declaration (layout, then PUT /v1/sites/{site}/declaration) says whose pool
    it is; an offer naming anyone else, even published by an admin, is refused naming provider."""
    hub, admin, _, _ = market
    offer = {"id": "o1", "pool": "hz-edge", "provider": "xirang-7", "accelerator": "910B", "fen_per_card_hour": 10}
    status, body, _ = await admin.call("POST", "/v1/market/offers", offer)  # the layout: the operator's
    assert (status, body["error"]["param"], body["error"]["code"]) == (422, "provider", "offer_provider_mismatch"), body
    assert "'cpn-operator'" in body["error"]["message"], body
    status, _, _ = await admin.call("PUT", "/v1/sites/hz-edge/declaration", {"provider": "xirang-7"})
    assert status == 200
    status, body, _ = await admin.call("POST", "/v1/market/offers", {**offer, "provider": "cpn-operator"})
    assert (status, body["error"]["param"]) == (422, "provider"), body  # now not the operator's either
    status, body, _ = await admin.call("POST", "/v1/market/offers", offer)
    assert status == 201, body
    assert [o.provider for o in records_of(hub)] == ["xirang-7"]


async def test_a_provider_key_manages_only_its_own_pools_offers_and_reads_only_its_own_statement(market) -> None:  # type: ignore[no-untyped-def]
    hub, admin, acme, _ = market
    for site, provider in (("hz-edge", "xirang-7"), ("sh-hub", "westgrid")):
        status, _, _ = await admin.call("PUT", f"/v1/sites/{site}/declaration", {"provider": provider})
        assert status == 200
    status, issued, _ = await admin.call("POST", "/v1/providers/xirang-7/keys", {"label": "ops"})
    assert status == 201 and issued["role"] == "provider" and issued["provider_id"] == "xirang-7", issued
    assert issued["tenant_id"] is None
    status, body, _ = await admin.call("POST", "/v1/providers/cpn-operator/keys")
    assert (status, body["error"]["param"]) == (400, "provider"), body  # the operator's pools: admin keys
    xirang = Client(admin.session, admin.base, issued["api_key"])

    # Its own pool, as itself: published, listed, withdrawn.
    offer = {"id": "x-910b", "pool": "hz-edge", "provider": "xirang-7", "accelerator": "910B", "fen_per_card_hour": 900}
    status, body, _ = await xirang.call("POST", "/v1/market/offers", offer)
    assert status == 201 and body["provider"] == "xirang-7", body
    status, body, _ = await admin.call("POST", "/v1/market/offers", {
        "id": "w-910b", "pool": "sh-hub", "provider": "westgrid", "accelerator": "910B", "fen_per_card_hour": 800})
    assert status == 201, body
    status, body, _ = await xirang.call("GET", "/v1/market/offers")
    assert status == 200 and [o["id"] for o in body["data"]] == ["x-910b"], body  # not westgrid's
    # Another provider's pool, another provider's name, another provider's offer: 403.
    for method, path, payload, param in [
            ("POST", "/v1/market/offers", {**offer, "id": "x2", "pool": "sh-hub"}, "pool"),
            ("POST", "/v1/market/offers", {**offer, "id": "x3", "provider": "westgrid"}, "provider"),
            ("POST", "/v1/market/offers", {**offer, "id": "x4", "pool": "sh-hub", "provider": "westgrid"}, "provider"),
            ("DELETE", "/v1/market/offers/w-910b", None, "offer"),
            ("GET", "/v1/market/offers?provider=westgrid", None, "provider"),
            ("GET", "/v1/statements?account=provider:westgrid", None, "account"),
            ("GET", "/v1/statements?account=tenant:acme", None, "account")]:
        status, body, _ = await xirang.call(method, path, payload)
        assert (status, body["error"]["param"]) == (403, param), (path, payload, body)
    # Nothing else: tenant APIs, admin APIs, the catalogue.
    for method, path, payload in [("POST", "/v1/chat/completions", CHAT), ("GET", "/v1/usage", None),
                                  ("POST", "/v1/quotes", {"cards": 1, "est_hours": 1}), ("GET", "/v1/jobs", None),
                                  ("GET", "/v1/market/models", None), ("GET", "/v1/market/totals", None),
                                  ("PUT", "/v1/tenants/acme/budget", {"limit_fen": 1}), ("GET", "/v1/sites", None),
                                  ("POST", "/v1/providers/xirang-7/keys", None)]:
        status, body, _ = await xirang.call(method, path, payload)
        assert status == 403, (path, body)
    assert [o.id for o in records_of(hub)] == ["w-910b", "x-910b"]

    # Its statement: its own account, JSON and CSV.
    status, body, _ = await xirang.call("GET", "/v1/statements")
    assert status == 200 and body["account"] == "provider:xirang-7", body
    status, _, headers = await xirang.call("GET", "/v1/statements?account=provider:xirang-7&format=csv")
    assert status == 200 and headers["Content-Type"].startswith("text/csv")
    status, body, _ = await xirang.call("DELETE", "/v1/market/offers/x-910b")
    assert status == 200 and body["valid_until"] is not None, body

    # Revoked like any key.
    status, listed, _ = await admin.call("GET", "/v1/providers/xirang-7/keys")
    assert [(k["id"], k["provider_id"], k["tenant_id"]) for k in listed["data"]] == [(issued["id"], "xirang-7", None)]
    status, _, _ = await admin.call("DELETE", f"/v1/providers/xirang-7/keys/{issued['id']}")
    assert status == 200
    status, body, _ = await xirang.call("GET", "/v1/statements")
    assert status == 401, body


async def test_a_public_facing_tenant_is_refused_a_model_without_a_public_filing(market) -> None:  # type: ignore[no-untyped-def]
    hub, admin, acme, pub = market
    await admin.call("PUT", "/v1/tenants/pub/market", {"public_facing": True})
    for model in ({**MODEL}, {**MODEL, "filing": {**FILING, "scope": "internal"}},
                  {**MODEL, "version": "2", "filing": {**FILING, "covers_version": "1"}},
                  {**MODEL, "filing": {**FILING, "filed_on": "2999-01-01"}}):
        assert (await admin.call("PUT", "/v1/market/models/chat", model))[0] == 200
        market_of(hub).refresh()  # not wait out the second
        status, body, headers = await pub.call("POST", "/v1/chat/completions", CHAT)
        assert status == 403, body
        assert body["error"]["code"] == "model_not_filed" and body["error"]["param"] == "model"
        assert body["filing"]["model"] == "chat" and "public-service filing" in body["filing"]["missing"]
        assert {k.lower() for k in headers} >= {"x-request-id"}, headers
    # A model not in the catalogue has no filing at all.
    status, body, _ = await pub.call("POST", "/v1/infer", {"model": "unlisted", "input": "hi"})
    assert status == 403 and "not in the catalogue" in body["filing"]["missing"], body
    # An internal tenant may call the unfiled model (and an unlisted one); no filing header to show.
    status, body, headers = await acme.call("POST", "/v1/chat/completions", CHAT)
    assert status == 200, body
    status, body, headers = await acme.call("POST", "/v1/infer", {"model": "unlisted", "input": "hi"})
    assert status == 200 and "X-CPN-Model-Filing" not in headers, body
    # Filed for public service, in force, for this version: served, with its number displayed.
    assert (await admin.call("PUT", "/v1/market/models/chat", {**MODEL, "filing": FILING}))[0] == 200
    market_of(hub).refresh()
    status, body, headers = await pub.call("POST", "/v1/chat/completions", CHAT)
    assert status == 200 and headers["X-CPN-Model-Filing"] == FILING["number"], body
    status, body, headers = await pub.call("POST", "/v1/infer", {"model": "chat", "input": "hi"})
    assert status == 200 and headers["X-CPN-Model-Filing"] == FILING["number"], body
    # Streaming answers carry it too.
    async with pub.session.post(pub.base + "/v1/chat/completions", json={**CHAT, "stream": True},
                                headers=pub.headers()) as resp:
        assert resp.status == 200 and resp.headers["X-CPN-Model-Filing"] == FILING["number"]
        assert (await resp.read()).rstrip().endswith(b"[DONE]")


async def test_usage_is_priced_in_its_flush_and_statements_reconcile(market) -> None:  # type: ignore[no-untyped-def]
    hub, admin, acme, _ = market
    await admin.call("PUT", "/v1/market/models/chat", MODEL)
    hub.accounting.buffer.add("acme", "chat", "hz-edge", 100, 20)
    hub.accounting.buffer.add("acme", "chat", "sh-hub", 7, 3)
    hub.accounting.buffer.add("acme", "unpriced", "sh-hub", 50, 50)
    hub.accounting.flush()
    # 100 + 2 × 20 = 140 fen and 7 + 2 × 3 = 13 fen; the unpriced model costs nothing.
    status, st, _ = await acme.call("GET", "/v1/statements")
    assert status == 200, st
    assert st["closing_fen"] == -153 and st["opening_fen"] == 0 and st["closing_cny"] == "-1.53"
    assert sorted(line["amount_fen"] for line in st["lines"]) == [-140, -13]
    status, usage, _ = await acme.call("GET", "/v1/usage")
    priced = usage["models"]["chat"]
    assert priced["prompt_tokens"] * 1 + priced["completion_tokens"] * 2 == 153  # statement = usage × prices
    lines = billing.usage_lines(hub.db)
    assert [(x.model, x.priced) for x in lines] == [("chat", True), ("chat", True), ("unpriced", False)]
    status, rec, _ = await admin.call("GET", "/v1/market/reconcile")
    assert status == 200 and rec["ok"] is True and rec["checked"] == 2 and rec["ledger_fen"] == -153, rec
    status, totals, _ = await admin.call("GET", "/v1/market/totals")
    assert totals["tenants_owe_fen"] == {"acme": 153} and totals["operator_kept_fen"] == 153
    assert totals["imbalance_fen"] == 0
    # CSV: opening row, one row per entry, closing row; the same figures.
    async with acme.session.get(acme.base + "/v1/statements?format=csv", headers=acme.headers()) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(await resp.text())))
    assert rows[0]["kind"] == "opening" and rows[-1]["kind"] == "closing" and rows[-1]["balance_fen"] == "-153"
    # A tenant sees only its own account; an admin names one.
    status, body, _ = await acme.call("GET", "/v1/statements?account=operator:margin")
    assert status == 404
    status, body, _ = await admin.call("GET", "/v1/statements?account=operator:margin")
    assert status == 200 and body["closing_fen"] == 153
    status, body, _ = await admin.call("GET", "/v1/statements")
    assert status == 400 and body["error"]["param"] == "account"
    status, body, _ = await acme.call("GET", "/v1/statements?period=year")
    assert status == 400 and body["error"]["param"] == "period"


async def test_a_failed_flush_posts_nothing_and_is_retried_whole(market) -> None:  # type: ignore[no-untyped-def]
    hub, admin, acme, _ = market
    await admin.call("PUT", "/v1/market/models/chat", MODEL)

    def boom(flush: Any) -> None:
        raise RuntimeError("disk full")

    hub.accounting.usage_listeners.append(boom)
    hub.accounting.buffer.add("acme", "chat", "hz-edge", 10, 0)
    hub.accounting.flush()
    assert ledger_store.balances(hub.db) == {} and billing.usage_lines(hub.db) == []
    assert hub.db.conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0] == 0  # counters rolled back too
    hub.accounting.usage_listeners.remove(boom)
    hub.accounting.flush()
    assert ledger_store.balances(hub.db)["tenant:acme"] == -10


async def test_a_flush_written_again_after_it_landed_bills_once(market) -> None:  # type: ignore[no-untyped-def]
    """A flush whose write failed with its outcome unknown (the replicated record may have taken
    it before its quorum answered) is written again as it was: if it had landed, nothing is billed
    twice. Here it lands through another transaction, then its own write fails and is retried."""
    hub, admin, acme, _ = market
    await admin.call("PUT", "/v1/market/models/chat", MODEL)
    landed: list[Any] = []

    def lands_then_fails(flush: Any) -> None:
        landed.append(flush)
        raise RuntimeError("quorum lost after the record took it")

    hub.accounting.usage_listeners.append(lands_then_fails)
    hub.accounting.buffer.add("acme", "chat", "hz-edge", 10, 0)
    hub.accounting.flush()
    hub.accounting.usage_listeners.remove(lands_then_fails)
    assert hub.accounting.pending_rows == 1 and [f.id for f in hub.accounting.in_doubt] == [landed[0].id]
    with transaction(hub.db):  # what the record had taken
        services_of(hub).market.post_usage(landed[0])
    hub.accounting.buffer.add("acme", "chat", "hz-edge", 5, 0)  # served meanwhile: a flush of its own
    hub.accounting.flush()
    assert hub.accounting.pending_rows == 0
    assert ledger_store.balances(hub.db)["tenant:acme"] == -15
    assert len(billing.usage_lines(hub.db)) == 2


async def test_a_tenant_at_its_budget_gets_402_with_the_figures(market) -> None:  # type: ignore[no-untyped-def]
    hub, admin, acme, _ = market
    await admin.call("PUT", "/v1/market/models/chat", MODEL)
    await admin.call("PUT", "/v1/tenants/acme/budget", {"limit_fen": 100, "period": "month"})
    market_of(hub).refresh()
    hub.accounting.buffer.add("acme", "chat", "hz-edge", 60, 20)  # 100 fen: at the limit, still in the buffer
    status, body, _ = await acme.call("POST", "/v1/chat/completions", CHAT)
    assert status == 402, body
    assert body["error"]["code"] == "budget_exceeded" and body["error"]["type"] == "insufficient_quota"
    assert body["budget"]["limit_fen"] == 100 and body["budget"]["spent_fen"] == 100
    assert body["budget"]["remaining_fen"] == 0 and body["budget"]["incoming_fen"] > 0
    assert "budget exceeded" in body["error"]["message"]
    hub.accounting.flush()  # the same once flushed to the ledger
    status, body, _ = await acme.call("POST", "/v1/infer", {"model": "chat", "input": "hi", "max_tokens": 1})
    assert status == 402 and body["budget"]["spent_fen"] == 100, body
    status, usage, _ = await acme.call("GET", "/v1/usage")
    assert usage["budget"]["warnings"] == [50, 80, 100] and usage["budget"]["used_pct"] == 100
    # Raised: served again, and what it used is charged at the next flush.
    await admin.call("PUT", "/v1/tenants/acme/budget", {"limit_fen": 10_000})
    market_of(hub).refresh()
    status, body, _ = await acme.call("POST", "/v1/chat/completions", CHAT)
    assert status == 200, body
    hub.accounting.flush()
    status, st, _ = await acme.call("GET", "/v1/statements")
    cost = body["usage"]["prompt_tokens"] + 2 * body["usage"]["completion_tokens"]
    assert st["closing_fen"] == -100 - cost, st


@pytest.mark.parametrize("market", [150], indirect=True)
async def test_requests_in_flight_together_cannot_overshoot_the_budget(market) -> None:  # type: ignore[no-untyped-def]
    """Each request holds the most it can cost (10 fen: 2 prompt bytes at 1 fen, 4 tokens at 2)
    from admission until its answer is done. 10 requests sent together (each lasting ~0.6 s)
    against 35 fen: 3 are served, 7 refused with 402, and the tenant spends at most 35 fen. Without
    the holds all 10 pass the check before any usage is counted."""
    hub, admin, acme, _ = market
    await admin.call("PUT", "/v1/market/models/chat", MODEL)
    status, _, _ = await admin.call("PUT", "/v1/tenants/acme/budget", {"limit_fen": 35, "period": "month"})
    assert status == 200
    answers = await asyncio.gather(*(acme.call("POST", "/v1/chat/completions", CHAT) for _ in range(10)))
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [200] * 3 + [402] * 7, [(s, b) for s, b, _ in answers]
    refused = [body for status, body, _ in answers if status == 402]
    assert all(b["budget"]["held_fen"] >= 30 and b["budget"]["incoming_fen"] == 10 for b in refused), refused
    assert market_of(hub).counters["refused_budget"] == 7
    assert market_of(hub).held_fen("acme") == 0  # every hold released with its answer
    hub.accounting.flush()
    spent = -ledger_store.balances(hub.db)["tenant:acme"]
    served = [body["usage"] for status, body, _ in answers if status == 200]
    assert spent == sum(u["prompt_tokens"] + 2 * u["completion_tokens"] for u in served) <= 35


async def test_quotes_need_a_tenant_and_a_valid_job_body(market) -> None:  # type: ignore[no-untyped-def]
    _, admin, acme, _ = market
    job = {"cards": 4, "accelerators": ["910B"], "est_hours": 1.0}
    status, body, _ = await acme.call("POST", "/v1/quotes", job)
    assert status == 201 and body["object"] == "quote" and body["options"] == [], body  # no site is up
    assert body["valid_until"] > body["created_at"]
    status, body, _ = await acme.call("POST", "/v1/quotes", {**job, "cards": 0})
    assert status == 400 and body["error"]["param"] == "cards"
    status, body, _ = await acme.call("POST", "/v1/quotes", {**job, "quote_id": "q-1"})
    assert status == 400 and body["error"]["param"] == "quote_id"
    status, body, _ = await admin.call("POST", "/v1/quotes", job)
    assert status == 403
    status, body, _ = await acme.call("POST", "/v1/jobs", {**job, "quote_id": "q-nope"})
    assert status == 404 and body["error"]["param"] == "quote_id"


def _cli(*argv: str) -> int:
    return cli.main(["market", *argv])


async def test_cpn_market_writes_what_the_running_hub_applies(market, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    hub, admin, acme, pub = market
    db = hub.config.db_path
    assert _cli("model", "set", "chat", "--owner", "acme", "--input-fen-per-mtok", "1000000",
                "--output-fen-per-mtok", "2000000", "--db", db) == 0
    assert _cli("tenant", "pub", "--public-facing", "--db", db) == 0
    # Within a second the hub refuses the unfiled model to the public-facing tenant.
    async def refused() -> bool:
        return (await pub.call("POST", "/v1/chat/completions", CHAT))[0] == 403
    deadline = time.monotonic() + 5
    while not await refused():
        assert time.monotonic() < deadline, "the hub did not apply cpn market tenant"
    assert _cli("model", "set", "chat", "--owner", "acme", "--input-fen-per-mtok", "1000000",
                "--output-fen-per-mtok", "2000000", "--filing-number", "N-1", "--filing-scope", "public",
                "--filed-on", "2024-05-01", "--db", db) == 0
    assert _cli("budget", "set", "acme", "--limit-cny", "12.34", "--db", db) == 0
    assert _cli("offer", "add", "hz-1", "--pool", "hz-edge", "--provider", "cpn-operator", "--accelerator", "910B",
                "--fen-per-card-hour", "900", "--window", "23-7:400", "--db", db) == 0
    status, body, _ = await admin.call("GET", "/v1/tenants/acme/budget")
    assert body["limit_fen"] == 1234
    capsys.readouterr()
    assert _cli("model", "list", "--db", db) == 0 and "N-1 (public, 2024-05-01)" in capsys.readouterr().out
    assert _cli("offer", "list", "--db", db) == 0 and "hz-1" in capsys.readouterr().out
    hub.accounting.buffer.add("acme", "chat", "hz-edge", 5, 5)
    hub.accounting.flush()
    assert _cli("statement", "tenant:acme", "--csv", "--db", db) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(",-15")
    assert _cli("reconcile", "--db", db) == 0 and '"ok": true' in capsys.readouterr().out
    # A budget set by the CLI binds the running hub within a second: 15 fen spent of 10.
    assert _cli("budget", "set", "acme", "--limit-fen", "10", "--db", db) == 0
    deadline = time.monotonic() + 5
    while (await acme.call("POST", "/v1/chat/completions", CHAT))[0] != 402:
        assert time.monotonic() < deadline, "the hub did not apply cpn market budget"


@pytest.mark.parametrize(("argv", "needle"), [
    (["model", "set", "m", "--owner", "acme", "--input-fen-per-mtok", "-1", "--output-fen-per-mtok", "0"],
     "input_fen_per_mtok must be a non-negative int"),
    (["model", "set", "m", "--owner", "ghost", "--input-fen-per-mtok", "1", "--output-fen-per-mtok", "0"],
     "tenant 'ghost' not found"),
    (["model", "set", "m", "--owner", "acme", "--input-fen-per-mtok", "1", "--output-fen-per-mtok", "0",
      "--filing-number", "N"], "a filing needs --filing-number, --filing-scope and --filed-on together"),
    (["offer", "add", "o", "--pool", "atlantis", "--provider", "p", "--accelerator", "910B", "--fen-per-card-hour", "1"],
     "--pool 'atlantis' is not a site"),
    (["offer", "add", "o", "--pool", "hz-edge", "--provider", "p", "--accelerator", "910B", "--fen-per-card-hour", "1",
      "--window", "night"], "--window 'night' is not START-END:FEN"),
    (["offer", "add", "o", "--pool", "hz-edge", "--provider", "p", "--accelerator", "910B", "--fen-per-card-hour", "1"],
     "--provider 'p' does not own pool hz-edge: the operator declared 'cpn-operator' its provider"),
    (["offer", "withdraw", "nope"], "offer 'nope' not found"),
    (["budget", "set", "acme", "--limit-cny", "lots"], "--limit-cny must be an amount of CNY"),
    (["budget", "show", "acme"], "tenant 'acme' has no budget"),
    (["statement", "bank:x"], "is not tenant:ID, provider:ID or operator:NAME"),
])
async def test_cpn_market_bad_input_exits_2_with_one_line(market, capsys: pytest.CaptureFixture[str],
                                                          argv: list[str], needle: str) -> None:  # type: ignore[no-untyped-def]
    hub, _, _, _ = market
    capsys.readouterr()
    assert _cli(*argv, "--db", hub.config.db_path) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


def test_cpn_market_without_a_database_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli("model", "list", "--db", str(tmp_path / "none.db")) == 2
    assert "no hub database at" in capsys.readouterr().err and not (tmp_path / "none.db").exists()


# --------------------------------------------------------------------------- training


def _training_agent(site: str, city: str, cards: int, url: str, tmp: Path) -> Agent:
    return Agent(AgentConfig(
        site=site, nats=url, city=city, tier="edge", accelerators={"910B": cards}, heartbeat_s=1.0,
        data_dir=str(tmp / site), bus=BusConfig(reconnect_wait_s=0.2, reconnect_jitter_s=0.1, event_backoff_max_s=1.0),
        executors=ExecutorsConfig(enabled=["sim"]),
    ))


@contextlib.asynccontextmanager
async def _training_sites(hub: Hub, url: str, tmp: Path) -> AsyncIterator[None]:
    """sh-hub (8 910B, Shanghai) and hz-edge (4 910B, Hangzhou): agents running sim training,
    registered with ``hub`` for the block."""
    agents = [_training_agent(site, city, cards, url, tmp)
              for site, city, cards in (("sh-hub", "shanghai", 8), ("hz-edge", "hangzhou", 4))]
    try:
        for a in agents:
            await a.start()
        await until(lambda: all((v := hub.registry.get(a.site)) is not None and v.registered for a in agents),
                    10, "agents registered")
        yield
    finally:
        for a in agents:
            await a.stop()


async def test_placement_by_offer_price_and_a_quote_pins_its_pool_and_caps_the_charge(
        tmp_path: Path, nats_server: NatsServer) -> None:
    """sh-hub (the operator's, PUE 1.25) is where placement by energy alone puts a 910B job; hz-edge,
    a third-party provider's pool, offers the lower price. A job without a quote goes to hz-edge
    (placement minimises the offer price) and its provider's statement is its card-hours × its
    offer less the commission; a job submitted against the quote's sh-hub option runs there (the
    quote pins it) and is charged at most the quoted maximum."""
    async with running_hub(hub_config(tmp_path, nats_server.url, sim_time_scale=3600)) as hub:
        admin = hub.create_admin_key("test")
        key = hub.create_tenant("acme")
        async with _training_sites(hub, nats_server.url, tmp_path):
            async with aiohttp.ClientSession() as session:
                base = f"http://127.0.0.1:{hub.http_port}"
                op, acme = Client(session, base, admin), Client(session, base, key)
                status, body, _ = await op.call("PUT", "/v1/sites/hz-edge/declaration", {"provider": "xirang-7"})
                assert status == 200 and body["provider"] == "xirang-7", body
                status, issued, _ = await op.call("POST", "/v1/providers/xirang-7/keys")
                assert status == 201, issued
                xirang = Client(session, base, issued["api_key"])  # the provider publishes its own offer
                for who, offer in ((op, {"id": "sh-910b", "pool": "sh-hub", "provider": "cpn-operator",
                                         "accelerator": "910B", "fen_per_card_hour": 3000, "valid_from": 0}),
                                   (xirang, {"id": "hz-910b", "pool": "hz-edge", "provider": "xirang-7",
                                             "accelerator": "910B", "fen_per_card_hour": 1000, "valid_from": 0})):
                    status, body, _ = await who.call("POST", "/v1/market/offers", offer)
                    assert status == 201, body
                job = {"name": "sim", "cards": 4, "accelerators": ["910B"], "est_hours": 1.0, "checkpoint_cost_s": 30,
                       "checkpoint_interval_min": 10}
                status, quote, _ = await acme.call("POST", "/v1/quotes", job)
                assert status == 201, quote
                assert [o["pool"] for o in quote["options"]] == ["hz-edge", "sh-hub"], quote["unquoted"]
                hz, sh = quote["options"]
                assert hz["provider"] == "xirang-7" and hz["p10_fen"] <= hz["expected_fen"] <= hz["p90_fen"] <= hz["max_fen"]
                assert hz["expected_fen"] < sh["expected_fen"] and sh["energy_fen"] < hz["energy_fen"]
                assert sh["margin_fen"] == sh["expected_fen"] - sh["energy_fen"]

                # Not the quoted job: refused. Over the budget: 402 with the figures.
                status, body, _ = await acme.call("POST", "/v1/jobs", {**job, "est_hours": 2.0, "quote_id": quote["id"]})
                assert status == 409 and body["error"]["code"] == "quote_spec_mismatch", body
                await op.call("PUT", "/v1/tenants/acme/budget", {"limit_fen": sh["max_fen"] - 1})
                quoted = {**job, "quote_id": quote["id"], "quote_pool": "sh-hub"}
                status, body, _ = await acme.call("POST", "/v1/jobs", quoted)
                assert status == 402 and body["budget"]["incoming_fen"] == sh["max_fen"], body
                await op.call("PUT", "/v1/tenants/acme/budget", {"limit_fen": 10**9})

                status, sub, _ = await acme.call("POST", "/v1/jobs", quoted, headers={"Idempotency-Key": "q1"})
                assert status == 201, sub
                status, free, _ = await acme.call("POST", "/v1/jobs", job)
                assert status == 201, free
                jq, jf = sub["id"], free["id"]
                await until(lambda: all((r := _job(hub, j)) is not None and r.state == "succeeded" for j in (jq, jf)),
                            30, "jobs succeeded")
                _, vq, _ = await acme.call("GET", f"/v1/jobs/{jq}")
                _, vf, _ = await acme.call("GET", f"/v1/jobs/{jf}")
                assert [a["pool"] for a in vq["attempts"]] == ["sh-hub"], vq["attempts"]  # pinned by its quote
                assert [a["pool"] for a in vf["attempts"]] == ["hz-edge"], vf["attempts"]  # the cheaper offer
                assert "offer price" in vf["placement"]["chosen"], vf["placement"]

                _, cq, _ = await acme.call("GET", f"/v1/jobs/{jq}/charges")
                assert 0 < cq["charged_fen"] <= sh["max_fen"], (cq, sh)
                _, cf, _ = await acme.call("GET", f"/v1/jobs/{jf}/charges")
                (line,) = cf["attempts"]
                card_h = line["cards"] * (line["end_at"] - line["start_at"]) / 3600
                assert abs(card_h - vf["card_hours"]) < 1e-5  # billed what metering measured
                assert cf["charged_fen"] == round(card_h * 1000)  # no quote: metered at the offer, uncapped
                status, st, _ = await xirang.call("GET", "/v1/statements")  # its own, with its own key
                assert status == 200 and st["account"] == "provider:xirang-7", st
                status, via_admin, _ = await op.call("GET", "/v1/statements?account=provider:xirang-7")
                assert via_admin == st
                earned = sum(x["amount_fen"] for x in st["lines"] if x["entry_kind"] == "earning")
                commission = -sum(x["amount_fen"] for x in st["lines"] if x["entry_kind"] == "commission")
                assert earned == cf["charged_fen"] and commission == (earned + 5) // 10, st  # 10 %, half up
                assert st["closing_fen"] == earned - commission
                status, pools, _ = await op.call("GET", "/v1/statements?account=operator:pools")
                assert pools["closing_fen"] == sum(x["amount_fen"] for x in pools["lines"]) >= cq["charged_fen"]
                status, tst, _ = await acme.call("GET", "/v1/statements")
                assert tst["closing_fen"] == -(cq["charged_fen"] + cf["charged_fen"])
                status, rec, _ = await op.call("GET", "/v1/market/reconcile")
                assert rec["ok"] is True and rec["checked"] == 2, rec
                status, totals, _ = await op.call("GET", "/v1/market/totals")
                assert totals["providers_earn_fen"] == {"xirang-7": earned - commission}
                assert totals["tenants_owe_fen"]["acme"] == cq["charged_fen"] + cf["charged_fen"]
                assert totals["imbalance_fen"] == 0
                status, usage, _ = await acme.call("GET", "/v1/usage")
                assert usage["budget"]["spent_fen"] == cq["charged_fen"] + cf["charged_fen"]
                # A retry of the quoted submission answers as first answered, though the budget
                # is now spent and the job done.
                await op.call("PUT", "/v1/tenants/acme/budget", {"limit_fen": 1})
                status, again, headers = await acme.call("POST", "/v1/jobs", quoted, headers={"Idempotency-Key": "q1"})
                assert (status, again["id"], headers.get("Idempotent-Replayed")) == (201, jq, "true"), again
                status, body, _ = await acme.call("POST", "/v1/jobs", quoted, headers={"Idempotency-Key": "q2"})
                assert status == 402, body


def _job(hub: Hub, job_id: str) -> Any:
    from controlplane.store import jobs as store_jobs

    return store_jobs.get_job(hub.db, job_id)


async def test_accepted_jobs_hold_their_maximum_against_the_budget_until_billed_or_ended(
        tmp_path: Path, nats_server: NatsServer) -> None:
    """budgets Rule 4 over HTTP: a job accepted holds its most-it-can-cost (a quoted job: the
    quote's maximum; an unquoted one: the largest maximum among the feasible priced placements)
    until it ends, so the next submission that would pass the budget with it is refused 402 with
    the figures; once the job is cancelled (its attempt billed) only what it was charged counts."""
    async with running_hub(hub_config(tmp_path, nats_server.url)) as hub:  # real time: jobs run for an hour
        admin = hub.create_admin_key("test")
        key = hub.create_tenant("acme", default_origin="hangzhou")
        async with _training_sites(hub, nats_server.url, tmp_path):
            async with aiohttp.ClientSession() as session:
                base = f"http://127.0.0.1:{hub.http_port}"
                op, acme = Client(session, base, admin), Client(session, base, key)
                for pool, fen in (("sh-hub", 3000), ("hz-edge", 1000)):
                    status, body, _ = await op.call("POST", "/v1/market/offers", {
                        "id": f"{pool}-910b", "pool": pool, "provider": "cpn-operator", "accelerator": "910B",
                        "fen_per_card_hour": fen, "valid_from": 0})
                    assert status == 201, body
                job = {"name": "sim", "cards": 4, "accelerators": ["910B"], "est_hours": 1.0, "checkpoint_cost_s": 30,
                       "checkpoint_interval_min": 10}
                status, quote, _ = await acme.call("POST", "/v1/quotes", job)
                assert status == 201, quote
                hz, sh = sorted(quote["options"], key=lambda o: o["max_fen"])
                assert (hz["pool"], sh["pool"]) == ("hz-edge", "sh-hub") and hz["max_fen"] < sh["max_fen"]
                limit = sh["max_fen"] + hz["max_fen"]
                assert (await op.call("PUT", "/v1/tenants/acme/budget", {"limit_fen": limit}))[0] == 200

                # A job against the quote's hz-edge option holds the quote's maximum.
                status, first, _ = await acme.call("POST", "/v1/jobs", {**job, "quote_id": quote["id"],
                                                                          "quote_pool": "hz-edge"})
                assert status == 201, first
                assert _job(hub, first["id"]).spec.budget_hold_fen == hz["max_fen"]
                status, budget, _ = await op.call("GET", "/v1/tenants/acme/budget")
                assert (budget["spent_fen"], budget["jobs_held_fen"]) == (0, hz["max_fen"]), budget
                # An unquoted job may land on sh-hub, the dearest offer: it needs sh's maximum, which fits
                # exactly (hz + sh = the limit) ...
                status, second, _ = await acme.call("POST", "/v1/jobs", job)
                assert status == 201, second
                assert _job(hub, second["id"]).spec.budget_hold_fen == sh["max_fen"]
                # ... and a third one does not: 402 with the figures, held included.
                status, body, _ = await acme.call("POST", "/v1/jobs", job)
                assert status == 402, body
                assert body["error"]["code"] == "budget_exceeded" and "held by work in flight" in body["error"]["message"]
                figures = body["budget"]
                assert (figures["limit_fen"], figures["spent_fen"], figures["held_fen"], figures["incoming_fen"],
                        figures["incoming_basis"]) == (limit, 0, limit, sh["max_fen"], "most_expensive_offer"), figures
                # So is an inference request of the same tenant: nothing is left while both jobs live.
                assert (await op.call("PUT", "/v1/market/models/chat", MODEL))[0] == 200
                market_of(hub).refresh()
                with pytest.raises(Refused) as refused:
                    market_of(hub).admit(wire.InferRequest(request_id="r1", tenant="acme", model="chat", prompt="hi",
                                                           max_tokens=1), time.time())
                assert refused.value.status == 402 and refused.value.body["budget"]["held_fen"] == limit

                # Cancelled: the jobs' attempts are billed (a few seconds of 4 cards at most) and
                # their holds released; only what they were charged still counts.
                for j in (first["id"], second["id"]):
                    status, body, _ = await acme.call("DELETE", f"/v1/jobs/{j}")
                    assert status == 200, body
                status, budget, _ = await op.call("GET", "/v1/tenants/acme/budget")
                charged = 0
                for j in (first["id"], second["id"]):
                    charged += (await acme.call("GET", f"/v1/jobs/{j}/charges"))[1]["charged_fen"]
                assert (budget["jobs_held_fen"], budget["held_fen"], budget["spent_fen"]) == (0, 0, charged), budget
                assert charged < hz["max_fen"]
                status, third, _ = await acme.call("POST", "/v1/jobs", job)
                assert status == 201, third
