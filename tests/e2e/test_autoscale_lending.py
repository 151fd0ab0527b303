"""End to end, against real agents: with tidal lending on, replicas take the cards inference keeps
first (issue #15 items 1 and 3; ``[lending] inference_first``).

demo-3 layout, a real nats-server, the hub with ``[lending] enabled``, ``inference_first = ["H20"]``
and a short autoscaler cool-down; two sim agents (Hangzhou, Nanjing) each with 8 lendable L20 and
4 H20. A deployment that accepts any type is placed on the Hangzhou pool's H20 and, under a burst
from Hangzhou, gains a replica on the Nanjing pool's H20: the agents load them there (``LoadModel``
names the type), so the L20, which training may borrow at night, stay free. Without the preference
both would go on L20, the type with more free cards.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controlplane.config import LendingConfig
from controlplane.hub import Hub
from controlplane.nats.natsserver import NatsServer
from tests.e2e.test_deployments import until_state
from tests.support.capacityrig import autoscaling
from tests.support.hubrig import DEMO3, Client
from tests.support.waiting import until

SITES = {"hz-edge": "hangzhou", "nj-edge": "nanjing"}
CARDS = {"L20": 8, "H20": 4}


def layout(tmp: Path) -> Path:
    """demo-3 with its Hangzhou and Nanjing pools declared as ``CARDS``."""
    text = DEMO3.read_text()
    for old in ("accelerators = { 910B = 4 }", "accelerators = { L20 = 4 }"):
        assert old in text
        text = text.replace(old, "accelerators = { L20 = 8, H20 = 4 }")
    path = tmp / "layout.toml"
    path.write_text(text)
    return path


@pytest.fixture
async def network(tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[tuple[Hub, Client]]:
    sites = {site: (city, CARDS) for site, city in SITES.items()}
    async with autoscaling(tmp_path, nats_server.url, sites, layout=str(layout(tmp_path)),
                           lending=LendingConfig(enabled=True, inference_first=("H20",))) as rig:
        yield rig


def on(dep: dict[str, object]) -> dict[str, str]:
    """Live replicas: site -> accelerator."""
    return {r["site"]: r["accelerator"] for r in dep["replicas"]  # type: ignore[attr-defined]
            if r["state"] in ("placed", "loading", "ready")}  # type: ignore[index]


def loaded_on(hub: Hub, site: str) -> str | None:
    view = hub.registry.get(site)
    status = None if view is None else view.replicas.get("qwen")
    return None if status is None or status.state != "ready" else status.accelerator


async def test_placed_and_scaled_out_replicas_take_inference_first_cards(network) -> None:  # type: ignore[no-untyped-def]
    hub, tenant = network
    status, dep, _ = await tenant.call("POST", "/v1/deployments", {
        "model": "qwen", "origins": ["hangzhou"], "budget_ms": 10, "cards_per_replica": 1, "min_cities": 1,
        "slots_per_replica": 2, "min_replicas": 1, "max_replicas": 2,
    })
    assert status == 201, dep
    dep, _ = await until_state(tenant, dep["id"], lambda d: d["state"] == "ready", 10, "ready")
    assert on(dep) == {"hz-edge": "H20"}, dep  # placement: H20, not the 8 free L20
    await until(lambda: loaded_on(hub, "hz-edge") == "H20", timeout_s=10, what="the agent runs it on H20")

    stop = asyncio.Event()

    async def client_loop() -> None:
        while not stop.is_set():
            await tenant.call("POST", "/v1/infer", {"model": "qwen", "input": "hello", "max_tokens": 4})

    loops = [asyncio.create_task(client_loop()) for _ in range(3)]
    try:
        dep, _ = await until_state(tenant, dep["id"], lambda d: len(on(d)) == 2, 20, "a second replica under the burst")
    finally:
        stop.set()
        await asyncio.gather(*loops)
    assert on(dep) == {"hz-edge": "H20", "nj-edge": "H20"}, dep  # the autoscaler's add: H20 too
    assert any(why.startswith("+nj-edge: origin hangzhou") for why in dep["scaling"]["scale_out"]), dep["scaling"]
    await until(lambda: loaded_on(hub, "nj-edge") == "H20", timeout_s=10, what="the agent runs it on H20")
