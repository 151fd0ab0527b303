"""``/v1/deployments`` on a real hub (SQLite file, NATS, HTTP on port 0) with three real sim agents.

demo-3 layout: edge pools sh-edge (Shanghai, 4 H20), hz-edge (Hangzhou, 4 910B), nj-edge (Nanjing,
4 L20). Agents load models in 0.2 s and preload nothing unless a test says so.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controlplane.core import deployments as core_deployments
from controlplane.core import replicas as core_replicas
from controlplane.services import deployments as service_mod
from controlplane.hub import Hub
from controlplane.nats.natsserver import NatsServer
from controlplane.core.registry import SiteView
from controlplane.store import deployments as store
from edge_agent import wire
from edge_agent.agent import Agent
from edge_agent.config import AgentConfig, BackendConfig, ExecutorsConfig, ModelConfig, SimBackendConfig
from tests.support.hubrig import Client, hub_config, running_hub, services_of
from topology import layout as topo_layout
from topology import loader
from tests.support.waiting import until

SITES = {"sh-edge": ("shanghai", {"H20": 4}), "hz-edge": ("hangzhou", {"910B": 4}), "nj-edge": ("nanjing", {"L20": 4})}


def agent_config(site: str, url: str, tmp: Path, models: list[ModelConfig] | None = None) -> AgentConfig:
    city, cards = SITES[site]
    return AgentConfig(
        site=site, nats=url, city=city, tier="edge", accelerators=cards, heartbeat_s=1.0,
        data_dir=str(tmp / site), models=models or [],
        backend=BackendConfig(sim=SimBackendConfig(ttft_ms=0, per_token_ms=0, slots=8, load_time_s=0.2)),
        executors=ExecutorsConfig(enabled=["sim"]),
    )


async def until_http(client: Client, path: str, cond: Callable[[Any], bool], timeout: float, what: str) -> Any:
    seen: list[Any] = [None, None]

    async def holds() -> bool:
        seen[:] = (await client.call("GET", path))[:2]
        return seen[0] == 200 and cond(seen[1])

    await until(holds, timeout, what, interval_s=0.05, last=lambda: seen)
    return seen[1]


class Rig:
    def __init__(self, hub: Hub, agents: dict[str, Agent], acme: Client, globex: Client, admin: Client) -> None:
        self.hub, self.agents, self.acme, self.globex, self.admin = hub, agents, acme, globex, admin


@pytest.fixture
async def rig(tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[Rig]:
    async with running_hub(hub_config(tmp_path, nats_server.url)) as hub:
        admin_key = hub.create_admin_key()
        acme_key = hub.create_tenant("acme", default_origin="hangzhou", rate_per_s=10_000, burst=10_000)
        globex_key = hub.create_tenant("globex", default_origin="hangzhou", rate_per_s=10_000, burst=10_000)
        local = {"nj-edge": [ModelConfig(name="site-m", cards=0.5, slots=4)]}
        agents = {s: Agent(agent_config(s, nats_server.url, tmp_path, local.get(s))) for s in SITES}
        await asyncio.gather(*(a.start() for a in agents.values()))
        try:
            await until(lambda: all((v := hub.registry.get(s)) is not None and v.heartbeats > 0 for s in SITES), 10,
                        "agents heard")
            async with aiohttp.ClientSession() as session:
                base = f"http://127.0.0.1:{hub.http_port}"
                yield Rig(hub, agents, Client(session, base, acme_key), Client(session, base, globex_key),
                          Client(session, base, admin_key))
        finally:
            await asyncio.gather(*(a.stop() for a in agents.values()), return_exceptions=True)


def agent_models(agent: Agent) -> set[tuple[str, str]]:
    return set(agent.inventory.replicas)


async def test_create_get_list_ready_then_delete_unloads(rig: Rig) -> None:
    status, dep, headers = await rig.acme.call("POST", "/v1/deployments", {
        "model": "qwen", "origins": ["hangzhou"], "budget_ms": 10, "cards_per_replica": 0.25, "min_cities": 2,
    })
    assert status == 201, dep
    assert headers["Location"] == f"/v1/deployments/{dep['id']}"
    assert dep["object"] == "deployment" and dep["model"] == "qwen" and dep["state"] == "pending"
    # Committed before the answer: the store already holds the plan.
    assert {r.site for r in store.replicas_of(rig.hub.db, dep["id"])} == {"hz-edge", "sh-edge"}
    assert {(r["site"], r["city"], r["cards"]) for r in dep["replicas"]} == {
        ("hz-edge", "hangzhou", 0.25), ("sh-edge", "shanghai", 0.25)}
    assert dep["coverage"] == {"hangzhou": ["hangzhou", "shanghai"]} and dep["uncovered"] == []

    ready = await until_http(rig.acme, f"/v1/deployments/{dep['id']}", lambda b: b["state"] == "ready", 10, "ready")
    assert {r["state"] for r in ready["replicas"]} == {"ready"}
    # Fractional cards are accounted per site: the agents and the store agree.
    assert store.allocated_cards_by_site(rig.hub.db) == {"hz-edge": {"910B": 0.25}, "sh-edge": {"H20": 0.25}}
    await until(lambda: rig.hub.registry.get("hz-edge").free_cards == {"910B": 3.75}, 5, "free cards")  # type: ignore[union-attr]

    status, listing, _ = await rig.acme.call("GET", "/v1/deployments")
    assert status == 200 and [d["id"] for d in listing["data"]] == [dep["id"]]
    status, body, _ = await rig.acme.call("POST", "/v1/chat/completions",
                                          {"model": "qwen", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and body["choices"][0]["message"]["content"]

    status, gone, _ = await rig.acme.call("DELETE", f"/v1/deployments/{dep['id']}")
    assert status == 200 and gone == {"id": dep["id"], "object": "deployment", "deleted": True}
    assert (await rig.acme.call("GET", f"/v1/deployments/{dep['id']}"))[0] == 404
    assert (await rig.acme.call("DELETE", f"/v1/deployments/{dep['id']}"))[0] == 404
    assert (await rig.acme.call("GET", "/v1/deployments"))[1]["data"] == []
    await until(lambda: not any(m == "qwen" for a in rig.agents.values() for m, _ in agent_models(a)), 5, "unloaded")
    assert store.allocated_cards_by_site(rig.hub.db) == {}
    status, body, _ = await rig.acme.call("POST", "/v1/chat/completions",
                                          {"model": "qwen", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 404 and body["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b'{"model": "m", "origins": ["hangzhou"], "budget_ms": -1}', 400, "budget_ms"),
        (b'{"model": "m", "origins": ["hangzhou"], "cards_per_replica": 0}', 400, "cards_per_replica"),
        (b'{"model": "m", "origins": ["hangzhou"], "cards_per_replica": 5}', 400, "cards_per_replica"),
        (b'{"model": "m", "origins": ["hangzhou"], "min_cities": 0}', 400, "min_cities"),
        (b'{"model": "m", "origins": ["hangzhou", "atlantis"]}', 400, "origins[1]"),
        (b'{"model": "m", "regions": ["mars"]}', 400, "regions[0]"),
        (b'{"model": "m", "origins": ["hangzhou"], "accelerators": ["Z9"]}', 400, "accelerators[0]"),
        (b'{"model": "not a model!", "origins": ["hangzhou"]}', 400, "model"),
        (b'{"model": "m"}', 400, "origins"),
        (b'{"model": "m", "origins": ["hangzhou"], "tenant": "evil"}', 422, "tenant"),
        (b'{"model": "m", "origins": ["hangzhou"]', 400, None),
        (b"", 400, None),
    ],
)
async def test_bad_input_is_a_4xx_naming_the_field(rig: Rig, body: bytes, status: int, field: str | None) -> None:
    got, err, _ = await rig.acme.call("POST", "/v1/deployments", raw=body,
                                      headers={"Content-Type": "application/json"})
    assert got == status, err
    assert err["error"]["param"] == field
    if field:
        assert field in err["error"]["message"]
    assert store.list_for_tenant(rig.hub.db, "acme") == []
    # The hub keeps serving.
    ok, _, _ = await rig.acme.call("POST", "/v1/deployments", {"model": "m", "regions": ["zhejiang"]})
    assert ok == 201


QWEN = {"model": "qwen", "origins": ["hangzhou"], "budget_ms": 10, "cards_per_replica": 0.25, "min_cities": 2}


async def test_same_idempotency_key_and_body_replays_the_first_answer(rig: Rig) -> None:
    key = {"Idempotency-Key": "deploy-qwen-1"}
    s1, first, h1 = await rig.acme.call("POST", "/v1/deployments", QWEN, headers=key)
    assert s1 == 201 and "Idempotent-Replayed" not in h1, first
    assert {r["site"] for r in first["replicas"]} == {"hz-edge", "sh-edge"}
    # Same body, keys in another order, other spacing, a default left out: the first answer.
    reordered = b'{ "min_cities": 2, "cards_per_replica": 0.25, "origins": ["hangzhou"], "model": "qwen" }'
    s2, second, h2 = await rig.acme.call("POST", "/v1/deployments", raw=reordered, headers=key)
    assert (s2, second) == (s1, first) and h2["Idempotent-Replayed"] == "true"
    assert h2["Location"] == f"/v1/deployments/{first['id']}"
    _, listing, _ = await rig.acme.call("GET", "/v1/deployments")
    assert [d["id"] for d in listing["data"]] == [first["id"]]
    assert store.allocated_cards_by_site(rig.hub.db) == {"hz-edge": {"910B": 0.25}, "sh-edge": {"H20": 0.25}}
    # Once the replicas are ready the replay is still the *first* answer, and still creates nothing.
    await until_http(rig.acme, f"/v1/deployments/{first['id']}", lambda b: b["state"] == "ready", 10, "ready")
    s3, third, h3 = await rig.acme.call("POST", "/v1/deployments", QWEN, headers=key)
    assert (s3, third, h3["Idempotent-Replayed"]) == (201, first, "true")
    assert [d.id for d in store.list_for_tenant(rig.hub.db, "acme")] == [first["id"]]
    assert len(store.replicas_of(rig.hub.db, first["id"], include_removed=True)) == 2
    loaded = [(s, m) for s, a in rig.agents.items() for m, _ in agent_models(a) if m == "qwen"]
    assert sorted(loaded) == [("hz-edge", "qwen"), ("sh-edge", "qwen")]


async def test_same_idempotency_key_with_another_body_is_a_422(rig: Rig) -> None:
    key = {"Idempotency-Key": "deploy-qwen-1"}
    s1, first, _ = await rig.acme.call("POST", "/v1/deployments", QWEN, headers=key)
    assert s1 == 201, first
    status, err, headers = await rig.acme.call("POST", "/v1/deployments", {**QWEN, "cards_per_replica": 0.5},
                                               headers=key)
    assert status == 422 and err["error"]["param"] == "Idempotency-Key", err
    assert "Idempotency-Key" in err["error"]["message"] and "Idempotent-Replayed" not in headers
    assert [d.id for d in store.list_for_tenant(rig.hub.db, "acme")] == [first["id"]]
    assert store.allocated_cards_by_site(rig.hub.db) == {"hz-edge": {"910B": 0.25}, "sh-edge": {"H20": 0.25}}


async def test_idempotency_keys_of_two_tenants_never_collide(rig: Rig) -> None:
    key = {"Idempotency-Key": "deploy-qwen-1"}
    s1, mine, _ = await rig.acme.call("POST", "/v1/deployments", QWEN, headers=key)
    s2, theirs, h2 = await rig.globex.call("POST", "/v1/deployments", QWEN, headers=key)
    assert (s1, s2) == (201, 201) and "Idempotent-Replayed" not in h2
    assert mine["id"] != theirs["id"] and (mine["owned_by"], theirs["owned_by"]) == ("acme", "globex")
    assert [d["id"] for d in (await rig.acme.call("GET", "/v1/deployments"))[1]["data"]] == [mine["id"]]
    assert [d["id"] for d in (await rig.globex.call("GET", "/v1/deployments"))[1]["data"]] == [theirs["id"]]
    # Each tenant's key still replays its own deployment.
    _, again, h3 = await rig.globex.call("POST", "/v1/deployments", QWEN, headers=key)
    assert again["id"] == theirs["id"] and h3["Idempotent-Replayed"] == "true"


@pytest.mark.parametrize("key", ["", "k" * 201, "cl\u00e9", "tab\tkey"])
async def test_an_idempotency_key_not_1_to_200_printable_ascii_is_a_400_naming_it(rig: Rig, key: str) -> None:
    status, err, _ = await rig.acme.call("POST", "/v1/deployments", QWEN, headers={"Idempotency-Key": key})
    assert status == 400 and err["error"]["param"] == "Idempotency-Key", err
    assert "Idempotency-Key" in err["error"]["message"]
    assert store.list_for_tenant(rig.hub.db, "acme") == []
    status, dep, _ = await rig.acme.call("POST", "/v1/deployments", QWEN, headers={"Idempotency-Key": "k" * 200})
    assert status == 201, dep


async def test_admin_key_is_not_a_tenant_here(rig: Rig) -> None:
    status, err, _ = await rig.admin.call("POST", "/v1/deployments", {"model": "m", "origins": ["hangzhou"]})
    assert status == 403 and err["error"]["code"] == "forbidden"


async def test_another_tenants_deployment_and_model_are_a_404(rig: Rig) -> None:
    status, dep, _ = await rig.acme.call("POST", "/v1/deployments", {"model": "acme-llm", "origins": ["hangzhou"]})
    assert status == 201
    await until_http(rig.acme, f"/v1/deployments/{dep['id']}", lambda b: b["state"] == "ready", 10, "ready")
    for method in ("GET", "DELETE"):
        status, err, _ = await rig.globex.call(method, f"/v1/deployments/{dep['id']}")
        assert status == 404 and err["error"]["code"] == "not_found", (method, err)
    assert (await rig.globex.call("GET", "/v1/deployments"))[1]["data"] == []
    # The model is the owner's: globex can neither call nor list it; both may call the site's own model.
    for path, body in [("/v1/chat/completions", {"model": "acme-llm", "messages": [{"role": "user", "content": "x"}]}),
                       ("/v1/infer", {"model": "acme-llm", "input": "x"})]:
        status, err, _ = await rig.globex.call("POST", path, body)
        assert status == 404 and err["error"]["code"] == "model_not_found" and err["error"]["param"] == "model"
        assert (await rig.acme.call("POST", path, body))[0] == 200
    _, acme_models, _ = await rig.acme.call("GET", "/v1/models")
    _, globex_models, _ = await rig.globex.call("GET", "/v1/models")
    assert [m["id"] for m in acme_models["data"]] == ["acme-llm", "site-m"]
    assert [m["id"] for m in globex_models["data"]] == ["site-m"]
    status, _, headers = await rig.globex.call("POST", "/v1/infer", {"model": "site-m", "input": "x"})
    assert status == 200 and headers["X-CPN-Site"] == "nj-edge"
    # Still there for its owner.
    assert (await rig.acme.call("GET", f"/v1/deployments/{dep['id']}"))[0] == 200


async def test_one_site_never_hosts_one_model_for_two_deployments(rig: Rig) -> None:
    status, first, _ = await rig.acme.call("POST", "/v1/deployments", {"model": "shared", "origins": ["hangzhou"]})
    assert status == 201 and {r["site"] for r in first["replicas"]} == {"hz-edge", "sh-edge"}
    status, second, _ = await rig.globex.call("POST", "/v1/deployments", {"model": "shared", "origins": ["hangzhou"]})
    assert status == 201
    assert [r["site"] for r in second["replicas"]] == ["nj-edge"]
    assert second["coverage"] == {"hangzhou": ["nanjing"]}
    [uncovered] = second["uncovered"]
    assert uncovered["origin"] == "hangzhou" and "1 of 2 cities" in uncovered["reason"]
    assert any("hz-edge" in n and "another deployment" in n for n in second["notes"])
    # Nor on a site that offers the model itself (nj-edge preloads site-m as "local").
    status, third, _ = await rig.acme.call("POST", "/v1/deployments", {"model": "site-m", "origins": ["nanjing"],
                                                                      "min_cities": 1})
    assert status == 201 and [r["site"] for r in third["replicas"]] != ["nj-edge"]
    await until_http(rig.globex, f"/v1/deployments/{second['id']}", lambda b: b["state"] != "pending", 10, "settled")


async def test_two_tenants_deploying_one_model_never_use_each_others_replicas(rig: Rig) -> None:
    status, mine, _ = await rig.acme.call("POST", "/v1/deployments", {"model": "shared", "origins": ["hangzhou"]})
    assert status == 201 and {r["site"] for r in mine["replicas"]} == {"hz-edge", "sh-edge"}
    status, theirs, _ = await rig.globex.call("POST", "/v1/deployments", {"model": "shared", "origins": ["nanjing"],
                                                                          "min_cities": 1})
    assert status == 201 and [r["site"] for r in theirs["replicas"]] == ["nj-edge"]
    for client, dep in ((rig.acme, mine), (rig.globex, theirs)):
        await until_http(client, f"/v1/deployments/{dep['id']}", lambda b: b["state"] == "ready", 10, "ready")
    # From Nanjing the nearest replica is globex's; acme is still served by its own.
    for _ in range(10):
        status, body, _ = await rig.acme.call("POST", "/v1/infer", {"model": "shared", "input": "hi"},
                                              headers={"X-CPN-Origin": "nanjing"})
        assert status == 200 and body["site"] in {"hz-edge", "sh-edge"}, body
        status, body, _ = await rig.globex.call("POST", "/v1/infer", {"model": "shared", "input": "hi"},
                                                headers={"X-CPN-Origin": "hangzhou"})
        assert status == 200 and body["site"] == "nj-edge", body
    # Once globex deletes its deployment it cannot call the model at all (acme's replicas are not its).
    assert (await rig.globex.call("DELETE", f"/v1/deployments/{theirs['id']}"))[0] == 200
    status, err, _ = await rig.globex.call("POST", "/v1/infer", {"model": "shared", "input": "hi"})
    assert status == 404 and err["error"]["code"] == "model_not_found", err


async def test_a_card_quota_bounds_replicas_and_training_together(tmp_path: Path, nats_server: NatsServer) -> None:
    async with running_hub(hub_config(tmp_path, nats_server.url)) as hub:
        key = hub.create_tenant("acme", default_origin="hangzhou", quota_cards=2)
        agents = {s: Agent(agent_config(s, nats_server.url, tmp_path)) for s in SITES}
        await asyncio.gather(*(a.start() for a in agents.values()))
        try:
            await until(lambda: all((v := hub.registry.get(s)) is not None and v.heartbeats > 0 for s in SITES), 10,
                        "agents heard")
            async with aiohttp.ClientSession() as session:
                acme = Client(session, f"http://127.0.0.1:{hub.http_port}", key)
                # Two replicas of 0.75 cards fit in 2 cards; the third model's replicas do not.
                status, first, _ = await acme.call("POST", "/v1/deployments", {
                    "model": "a", "origins": ["hangzhou"], "cards_per_replica": 0.75})
                assert status == 201 and len(first["replicas"]) == 2
                status, second, _ = await acme.call("POST", "/v1/deployments", {
                    "model": "b", "origins": ["hangzhou"], "cards_per_replica": 0.75})
                assert status == 201 and second["replicas"] == [] and second["state"] == "pending"
                assert any("card quota: tenant acme holds 1.5 of 2 cards" in n for n in second["notes"]), second
                assert all("card quota" in u["reason"] for u in second["uncovered"]), second
                # Training sees what is left: 2 - 1.5 held by deployments = 0 whole cards.
                job = {"name": "t", "cards": 1, "accelerators": ["H20", "910B", "L20"], "est_hours": 0.1}
                status, sub, _ = await acme.call("POST", "/v1/jobs", job)
                assert status == 201, sub
                view = await until_http(acme, f"/v1/jobs/{sub['id']}", lambda b: "quota" in b.get("reason", ""), 5,
                                        "the job held back by the quota")
                assert view["state"] == "queued" and "deployments hold 1.5" in view["reason"], view
                # Deleting the first deployment frees its cards: the second gets its replicas.
                assert (await acme.call("DELETE", f"/v1/deployments/{first['id']}"))[0] == 200
                await until_http(acme, f"/v1/deployments/{second['id']}", lambda b: len(b["replicas"]) == 2, 10,
                                 "second deployment placed")
        finally:
            await asyncio.gather(*(a.stop() for a in agents.values()), return_exceptions=True)


async def test_a_replica_goes_on_the_accelerator_the_hub_planned(tmp_path: Path, nats_server: NatsServer) -> None:
    # A mixed site (more H20 free than 910B): a deployment that accepts only 910B must get 910B,
    # not the type the agent would pick by itself.
    async with running_hub(hub_config(tmp_path, nats_server.url)) as hub:
        key = hub.create_tenant("acme", default_origin="hangzhou")
        hub.sites.declare("hz-edge", {"accelerators": {"H20": 4, "910B": 2}})  # the operator vouches for the mix
        cfg = agent_config("hz-edge", nats_server.url, tmp_path)
        cfg = AgentConfig(**{**{f: getattr(cfg, f) for f in cfg.__struct_fields__}, "accelerators": {"H20": 4, "910B": 2}})
        agent = Agent(cfg)
        await agent.start()
        try:
            await until(lambda: (v := hub.registry.get("hz-edge")) is not None and v.heartbeats > 0, 10, "agent heard")
            async with aiohttp.ClientSession() as session:
                acme = Client(session, f"http://127.0.0.1:{hub.http_port}", key)
                status, dep, _ = await acme.call("POST", "/v1/deployments", {
                    "model": "ascend-llm", "origins": ["hangzhou"], "min_cities": 1, "accelerators": ["910B"],
                    "cards_per_replica": 1.5})
                assert status == 201 and [(r["site"], r["accelerator"]) for r in dep["replicas"]] == [("hz-edge", "910B")]
                await until_http(acme, f"/v1/deployments/{dep['id']}", lambda b: b["state"] == "ready", 10, "ready")
            [replica] = [r for r in agent.inventory.replicas.values() if r.model == "ascend-llm"]
            assert (replica.accelerator, replica.cards) == ("910B", 1.5)
            assert agent.inventory.free_cards() == {"H20": 4.0, "910B": 0.5}
        finally:
            await agent.stop()


def deployments_of(hub: Hub) -> service_mod.DeploymentService:
    return services_of(hub).deployments


async def test_the_demo_deployment_is_created_once_and_survives_restarts(tmp_path: Path, nats_server: NatsServer) -> None:
    config = hub_config(tmp_path, nats_server.url)
    async with running_hub(config) as hub:
        hub.create_tenant("demo", default_origin="shanghai")
        first = await deployments_of(hub).deploy_demo("demo", "demo-chat")
        assert first and await deployments_of(hub).deploy_demo("demo", "demo-chat") == first
        assert await deployments_of(hub).deploy_demo("nobody", "demo-chat") == ""
        dep = store.get(hub.db, first)
        assert dep is not None and dep.tenant == "demo"
        assert dep.spec["cards_per_replica"] == 0.25 and dep.spec["budget_ms"] == 10
        assert set(dep.spec["origins"]) == {"shanghai", "hangzhou", "nanjing"}
    async with running_hub(config) as hub:
        assert await deployments_of(hub).deploy_demo("demo", "demo-chat") == first
        assert [d.id for d in store.list_for_tenant(hub.db, "demo")] == [first]
        assert deployments_of(hub).models_for_tenant("demo") == ["demo-chat"]
        assert deployments_of(hub).models_for_tenant("someone") == []


async def test_a_hub_restart_resumes_without_moving_replicas(tmp_path: Path, nats_server: NatsServer) -> None:
    config = hub_config(tmp_path, nats_server.url)
    agents = {s: Agent(agent_config(s, nats_server.url, tmp_path)) for s in SITES}
    try:
        async with running_hub(config) as hub:
            hub.create_tenant("acme")
            await asyncio.gather(*(a.start() for a in agents.values()))
            await until(lambda: sum(1 for v in hub.registry if v.heartbeats) == 3, 10, "agents heard")
            dep_id = await deployments_of(hub).deploy_demo("acme", "qwen")
            await until(lambda: store.get(hub.db, dep_id).state == "ready", 10, "ready")  # type: ignore[union-attr]
            before = {(r.site, r.state) for r in store.replicas_of(hub.db, dep_id)}
        loaded = {s: agent_models(a) for s, a in agents.items()}
        async with running_hub(config) as hub:
            service = deployments_of(hub)
            await until(lambda: sum(1 for v in hub.registry if v.registered) == 3, 10, "re-registered")
            # Past the start-up grace period the plan runs again and keeps every replica.
            await until(lambda: service.counters["plans"] >= 1, 10, "re-planned")
            assert {(r.site, r.state) for r in store.replicas_of(hub.db, dep_id)} == before
            assert store.get(hub.db, dep_id).state == "ready"  # type: ignore[union-attr]
            assert {s: agent_models(a) for s, a in agents.items()} == loaded
            assert service.counters["loads_sent"] == 0 and service.counters["unloads_sent"] == 0
            assert service.counters["loads_queued"] == 0 and service.counters["unloads_queued"] == 0
    finally:
        await asyncio.gather(*(a.stop() for a in agents.values()), return_exceptions=True)


def _view(site: str, free: dict[str, float], replicas: list[wire.ReplicaStatus], state: str = "up") -> SiteView:
    return SiteView(id=site, city=SITES[site][0], accelerators=dict(SITES[site][1]), free_cards=free,
                    replicas={r.model: r for r in replicas}, state=state)


def test_free_cards_subtract_only_what_heartbeats_do_not_show_yet() -> None:
    layout: topo_layout.Layout = loader.load(Path(loader.default_path()).parent / "demo-3.toml")
    views = {
        # hz-edge reports one 0.5-card replica of a (already inside its free cards) ...
        "hz-edge": _view("hz-edge", {"910B": 3.5}, [wire.ReplicaStatus(model="a", deployment="d1", cards=0.5)]),
        "sh-edge": _view("sh-edge", {"H20": 4.0}, [], state="lost"),
    }
    holding = [
        core_deployments.Holding("d1", "a", "hz-edge", "910B", 0.5),    # shown: not subtracted again
        core_deployments.Holding("d2", "b", "hz-edge", "910B", 0.25),   # placed, not shown yet: subtracted
        core_deployments.Holding("d3", "a", "hz-edge", "910B", 0.125),  # same model, other deployment: not shown
        core_deployments.Holding("d2", "b", "nj-edge", "L20", 1.0),     # site never heard: layout total minus it
    ]
    cands = {c.id: c for c in core_deployments.planning_candidates(layout.sites, views, holding)}
    assert cands["hz-edge"].free_cards == {"910B": 3.125} and cands["hz-edge"].healthy
    assert cands["sh-edge"].free_cards == {"H20": 4.0} and not cands["sh-edge"].healthy
    assert cands["nj-edge"].free_cards == {"L20": 3.0} and not cands["nj-edge"].healthy
    assert cands["sh-hub"].tier == "hub"


async def test_a_replica_the_agent_forgot_is_loaded_again(rig: Rig, tmp_path: Path) -> None:
    status, dep, _ = await rig.acme.call("POST", "/v1/deployments", {"model": "qwen", "origins": ["hangzhou"]})
    assert status == 201
    await until_http(rig.acme, f"/v1/deployments/{dep['id']}", lambda b: b["state"] == "ready", 10, "ready")
    # hz-edge restarts faster than loss detection: the hub never sees it lost, the new agent has no replicas.
    await rig.agents["hz-edge"].stop()
    rig.agents["hz-edge"] = Agent(agent_config("hz-edge", rig.hub.config.nats_url, tmp_path / "again"))
    await rig.agents["hz-edge"].start()
    await until(lambda: ("qwen", dep["id"]) in agent_models(rig.agents["hz-edge"]), 10, "loaded again")
    assert rig.hub.registry.get("hz-edge").state == "up"  # type: ignore[union-attr]
    body = await until_http(rig.acme, f"/v1/deployments/{dep['id']}",
                            lambda b: {r["state"] for r in b["replicas"]} == {"ready"}, 10, "ready again")
    assert {r["site"] for r in body["replicas"]} == {"hz-edge", "sh-edge"}


async def test_loads_are_committed_with_the_plan_in_the_outbox_and_a_restarted_hub_sends_them(
        tmp_path: Path, nats_server: NatsServer) -> None:
    from controlplane.core.replicas import DeploymentSpec
    from controlplane.store import outbox as store_outbox

    config = hub_config(tmp_path, nats_server.url)

    def loads(hub: Hub, dep_id: str) -> list[store_outbox.OutboxRow]:
        return [r for r in store_outbox.for_job(hub.db, dep_id) if r.kind == "load_model"]

    async with running_hub(config) as hub:
        hub.create_tenant("acme")
        now = hub.clock.time()
        for site, (city, cards) in SITES.items():  # up in the registry, but no agent answers yet
            hub.registry.register(wire.Register(site=site, tier="edge", city=city, accelerators=cards), now)
        view, _ = deployments_of(hub).create("acme", DeploymentSpec(model="qwen", origins=["hangzhou"]))
        dep_id = view["id"]
        # The plan and its LoadModels are committed together: every placed replica has its pending load.
        placed = {r.site for r in store.replicas_of(hub.db, dep_id) if r.state == "placed"}
        assert placed == {"hz-edge", "sh-edge"}
        assert {(r.site, r.state) for r in loads(hub, dep_id)} == {(s, "pending") for s in placed}
        cmd = wire.command_decoder.decode(loads(hub, dep_id)[0].body)
        assert isinstance(cmd, wire.LoadModel) and cmd.deployment == dep_id and cmd.model == "qwen"
        await until(lambda: all(r.tries >= 1 for r in loads(hub, dep_id)), 5, "undeliverable loads retried")
        assert {r.state for r in loads(hub, dep_id)} == {"pending"}  # kept for later, not lost
    agents = {s: Agent(agent_config(s, nats_server.url, tmp_path)) for s in SITES}
    try:
        async with running_hub(config) as hub:
            await asyncio.gather(*(a.start() for a in agents.values()))
            await until(lambda: store.get(hub.db, dep_id).state == "ready", 15, "ready")  # type: ignore[union-attr]
            # The loads written before the restart were delivered; none was issued twice.
            assert sorted((r.site, r.state) for r in loads(hub, dep_id)) == [("hz-edge", "sent"), ("sh-edge", "sent")]
            assert {m for s in placed for m, _ in agent_models(agents[s])} == {"qwen"}
    finally:
        await asyncio.gather(*(a.stop() for a in agents.values()), return_exceptions=True)


async def test_a_refused_load_removes_the_replica_and_keeps_the_deployment_off_the_site(
        tmp_path: Path, nats_server: NatsServer) -> None:
    from controlplane.core.replicas import DeploymentSpec
    from controlplane.store import outbox as store_outbox
    from tests.support.rawsite import RawSite

    raw = RawSite(nats_server.url)  # hz-edge, refusing every LoadModel for lack of cards
    raw.answer = lambda cmd: wire.ErrorReply(code="no_capacity", message="no room")
    agents = {s: Agent(agent_config(s, nats_server.url, tmp_path)) for s in SITES if s != "hz-edge"}
    try:
        async with running_hub(hub_config(tmp_path, nats_server.url)) as hub:
            hub.create_tenant("acme")
            await raw.start()
            await raw.serve_commands()
            await asyncio.gather(*(a.start() for a in agents.values()))
            await until(lambda: all((v := hub.registry.get(s)) is not None and v.heartbeats > 0 for s in SITES), 10,
                        "sites heard")
            service = deployments_of(hub)
            view, _ = service.create("acme", DeploymentSpec(model="qwen", origins=["hangzhou"]))
            assert "hz-edge" in {r["site"] for r in view["replicas"]}
            await until(lambda: service.counters["loads_refused"] == 1, 5, "the load refused")
            (row,) = [r for r in store_outbox.for_job(hub.db, view["id"]) if r.site == "hz-edge"]
            assert row.state == "dropped" and row.detail.startswith("refused: no_capacity")
            await until(lambda: any("hz-edge not used for now" in n
                                    for n in service.view("acme", view["id"])["notes"]), 5, "re-planned without it")
            states = {r.site: r.state for r in store.replicas_of(hub.db, view["id"], include_removed=True)}
            assert states["hz-edge"] == "removed"
            for _ in range(3):  # three more passes, still within the 30 s cool-down
                ticks = service.counters["ticks"]
                service.poke()
                await until(lambda: service.counters["ticks"] > ticks, 5, "another reconcile")
            assert [type(c).__name__ for c in raw.commands] == ["LoadModel"]  # not asked again while cooling
            assert service.counters["illegal_transitions"] == 0
    finally:
        await asyncio.gather(*(a.stop() for a in agents.values()), return_exceptions=True)
        if raw.nc is not None:
            await raw.close()


async def test_a_reconcile_pass_that_changes_nothing_opens_no_transaction(rig: Rig) -> None:
    """Once a deployment is ready, the passes that each heartbeat starts (the registry's version
    moves) decide nothing new and open no transaction: on the replicated record each one was a
    read barrier that held the controller's loop."""
    status, dep, _ = await rig.acme.call("POST", "/v1/deployments", {"model": "qwen", "origins": ["hangzhou"]})
    assert status == 201, dep
    await until_http(rig.acme, f"/v1/deployments/{dep['id']}", lambda b: b["state"] == "ready", 10, "ready")
    service = deployments_of(rig.hub)
    db = rig.hub.db
    begins: list[str] = []
    passes = service.counters["ticks"]
    db.conn.set_trace_callback(lambda sql: begins.append(sql) if sql.startswith("BEGIN") else None)
    try:
        for _ in range(3):  # what the loop does for each heartbeat: a pass over everything, synchronously
            service._decide(service.clock.time())
    finally:
        db.conn.set_trace_callback(None)
    assert begins == [] and service.counters["ticks"] == passes
    view = service.view("acme", dep["id"])
    assert view["state"] == "ready"


@pytest.mark.parametrize("counts", [True, False])
async def test_replicas_are_planned_for_the_networks_share_of_the_budget_as_the_sim_does(
        tmp_path: Path, nats_server: NatsServer, counts: bool) -> None:
    """When the router counts cpn's own time in a budget (``budget_counts_overhead``), the leader
    places replicas for the budget less that time, as ``cpn sim`` does with its
    ``inference.overhead_ms``: otherwise an origin just within budget by RTT would be planned as
    covered and then refused by the router. Off, the plan sees the tenant's budget as given."""
    config = hub_config(tmp_path, nats_server.url, budget_counts_overhead=counts)
    async with running_hub(config) as hub:
        svc = services_of(hub).deployments
        hub.create_tenant("acme", default_origin="shanghai")
        spec = core_replicas.DeploymentSpec(model="m-1", origins=["shanghai"], budget_ms=10.0)
        view, _ = await svc.create_async("acme", spec)
        planned = svc._snapshot(hub.clock.time(), None)  # what the core is asked to plan
        [dep] = [d for d in planned.deployments if d.id == view["id"]]
        assert dep.spec.budget_ms == (9.0 if counts else 10.0)
        assert svc.view("acme", view["id"])["spec"]["budget_ms"] == 10.0  # the tenant's own budget, as given
