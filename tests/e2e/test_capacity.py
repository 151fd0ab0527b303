"""End to end, against real agents: capacity follows demand (issue #15 items 1 and 2).

demo-3 layout (edge pools in Shanghai, Hangzhou and Nanjing), a real nats-server, the hub with a
short autoscaler cool-down (``[autoscale]``: decide every 0.3 s, scale in after 2 s idle, demand
meter 1 s / 3 s), three sim agents that preload nothing.

- A deployment with ``min_replicas`` 1 and ``max_replicas`` 2 serving Hangzhou gets one replica;
  a burst of requests from Hangzhou makes it gain a second on an idle pool, its status saying why;
  after the burst it drops back to one, the replica coverage placed kept.
- A request with a time-to-first-token SLO (``X-CPN-SLO-TTFT-Ms``, alias ``x-slo-ttft-ms``) is
  admitted with its prediction while the only replica is idle, refused with 429 and
  ``Retry-After`` at once while it is saturated, and admitted again after.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controlplane.hub import Hub
from controlplane.nats.natsserver import NatsServer
from tests.e2e.test_deployments import until_state
from tests.support.capacityrig import autoscaling
from tests.support.hubrig import Client, services_of
from tests.support.waiting import until

SITES = {"sh-edge": ("shanghai", {"H20": 4}), "hz-edge": ("hangzhou", {"910B": 4}), "nj-edge": ("nanjing", {"L20": 4})}


@pytest.fixture
async def network(tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[tuple[Hub, Client]]:
    async with autoscaling(tmp_path, nats_server.url, SITES) as rig:
        yield rig


def live(dep: dict[str, object]) -> dict[str, str]:
    return {r["site"]: r["state"] for r in dep["replicas"]  # type: ignore[attr-defined]
            if r["state"] in ("placed", "loading", "ready")}  # type: ignore[index]


INFER = {"model": "qwen", "input": "hello", "max_tokens": 4}


async def test_a_burst_from_one_city_gains_a_replica_on_an_idle_pool_and_drops_it_after(network) -> None:  # type: ignore[no-untyped-def]
    hub, tenant = network
    status, dep, _ = await tenant.call("POST", "/v1/deployments", {
        "model": "qwen", "origins": ["hangzhou"], "budget_ms": 10, "cards_per_replica": 0.25, "min_cities": 1,
        "slots_per_replica": 2, "min_replicas": 1, "max_replicas": 2,
    })
    assert status == 201, dep
    assert dep["spec"]["max_replicas"] == 2
    dep, _ = await until_state(tenant, dep["id"], lambda d: d["state"] == "ready", 10, "ready")
    assert live(dep) == {"hz-edge": "ready"}
    # Quiet: no scale-out without demand.
    await asyncio.sleep(1.0)
    status, dep, _ = await tenant.call("GET", f"/v1/deployments/{dep['id']}")
    assert live(dep) == {"hz-edge": "ready"}, dep

    stop = asyncio.Event()
    codes: list[int] = []

    async def client_loop() -> None:
        while not stop.is_set():
            status, _, _ = await tenant.call("POST", "/v1/infer", INFER)
            codes.append(status)

    loops = [asyncio.create_task(client_loop()) for _ in range(3)]
    try:
        dep, grew_s = await until_state(
            tenant, dep["id"], lambda d: len(live(d)) == 2 and all(s == "ready" for s in live(d).values()), 20,
            "a second replica under the burst")
    finally:
        stop.set()
        await asyncio.gather(*loops)
    added = set(live(dep)) - {"hz-edge"}
    assert added <= {"sh-edge", "nj-edge"} and len(added) == 1
    said = dep["scaling"]["scale_out"]
    assert any(why.startswith(f"+{next(iter(added))}: origin hangzhou") for why in said), dep["scaling"]
    assert codes.count(200) > 10, codes

    # After the burst, idle: the added replica goes, the one coverage placed stays.
    dep, shrank_s = await until_state(tenant, dep["id"], lambda d: set(live(d)) == {"hz-edge"}, 30,
                                      "back to one replica after the burst")
    assert any(why.startswith(f"-{next(iter(added))}: a replica idle") for why in dep["scaling"]["scale_in"]), \
        dep["scaling"]
    await until(lambda: all(hub.registry.get(s).replicas.get("qwen") is None for s in added),  # type: ignore[union-attr]
                timeout_s=10, what="the added replica unloaded at its site")


async def test_replica_bounds_are_checked_and_name_the_field(network) -> None:  # type: ignore[no-untyped-def]
    _, tenant = network
    base = {"model": "qwen", "origins": ["hangzhou"], "budget_ms": 10, "cards_per_replica": 0.25}
    for extra, field in (({"replicas": 2, "max_replicas": 3}, "max_replicas"),
                         ({"replicas": 2, "min_replicas": 1}, "min_replicas"),
                         ({"min_replicas": 3, "max_replicas": 2}, "max_replicas"),
                         ({"max_replicas": 0}, "max_replicas"),
                         ({"min_replicas": -1}, "min_replicas")):
        status, body, _ = await tenant.call("POST", "/v1/deployments", {**base, **extra})
        assert status == 400, (extra, body)
        assert body["error"]["param"] == field, (extra, body)
    # A fixed replica count (min = max) does not scale and has no scaling status.
    status, dep, _ = await tenant.call("POST", "/v1/deployments", {**base, "replicas": 1, "min_cities": 1})
    assert status == 201 and "scaling" not in dep, dep


async def test_an_slo_request_is_refused_with_429_when_every_site_is_saturated(network) -> None:  # type: ignore[no-untyped-def]
    hub, tenant = network
    status, dep, _ = await tenant.call("POST", "/v1/deployments", {
        "model": "qwen", "origins": ["hangzhou"], "budget_ms": 10, "cards_per_replica": 0.25, "min_cities": 1,
        "slots_per_replica": 1,
    })
    assert status == 201, dep
    dep, _ = await until_state(tenant, dep["id"], lambda d: d["state"] == "ready", 10, "ready")
    assert live(dep) == {"hz-edge": "ready"}
    long = {**INFER, "max_tokens": 120}  # 40 + 120 x 5 ms: about 0.64 s of service
    status, body, _ = await tenant.call("POST", "/v1/infer", long)
    assert status == 200, body
    await until(lambda: hub.registry.get("hz-edge").service_ms_p50 > 300, timeout_s=10,  # type: ignore[union-attr]
                what="the site's measured service time in its heartbeat")
    # The agent's heartbeat says which card the replica runs on (the prefill profile's key).
    assert hub.registry.get("hz-edge").replicas["qwen"].accelerator == "910B"  # type: ignore[union-attr]
    # The hub learnt the model's own service time at the site from the answer (the queue term).
    assert services_of(hub).inference.service_ms[("hz-edge", "qwen")] > 300

    # Idle: admitted, with its prediction (RTT + no queue + prefill).
    status, body, headers = await tenant.call("POST", "/v1/infer", INFER, headers={"X-CPN-SLO-TTFT-Ms": "300"})
    assert status == 200 and headers["X-CPN-Site"] == "hz-edge", body
    assert 0 < float(headers["X-CPN-Predicted-TTFT-Ms"]) < 300

    # Saturated: the one slot is taken; the prediction (a whole service time of queue) misses the SLO.
    busy = asyncio.create_task(tenant.call("POST", "/v1/infer", long))
    await until(lambda: hub.registry.get("hz-edge").sent > 0, timeout_s=5, what="the long request in flight")  # type: ignore[union-attr]
    started = time.monotonic()
    status, body, headers = await tenant.call("POST", "/v1/infer", INFER, headers={"X-CPN-SLO-TTFT-Ms": "300"})
    refused_in = time.monotonic() - started
    assert status == 429, body
    assert body["error"]["code"] == "ttft_slo_unmeetable" and "exceeds the SLO of 300 ms" in body["error"]["message"]
    assert int(headers["Retry-After"]) >= 1
    assert refused_in < 0.25  # at once, not after waiting for the site
    status, body, headers = await tenant.call(
        "POST", "/v1/chat/completions", {"model": "qwen", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        headers={"x-slo-ttft-ms": "300"})
    assert status == 429 and "Retry-After" in headers, body
    status, body, _ = await tenant.call("POST", "/v1/infer", INFER, headers={"X-CPN-SLO-TTFT-Ms": "soon"})
    assert status == 400 and body["error"]["param"] == "X-CPN-SLO-TTFT-Ms", body
    assert (await busy)[0] == 200

    # Free again: admitted.
    def free() -> bool:
        view = hub.registry.get("hz-edge")
        return view is not None and view.sent == 0 and view.queue_depth == 0 and view.replicas["qwen"].busy == 0

    # The long request answered and a heartbeat since says the slot is free (on a loaded machine
    # that heartbeat can come later than one period: wait for it, not for a fixed time).
    await until(free, timeout_s=10, what="the long request answered and the site's heartbeat saying so")
    status, body, headers = await tenant.call("POST", "/v1/infer", INFER, headers={"X-CPN-SLO-TTFT-Ms": "300"})
    assert status == 200, body
    async with tenant.session.post(tenant.base + "/v1/chat/completions", json={
            "model": "qwen", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True},
            headers=tenant.headers({"x-slo-ttft-ms": "300"})) as resp:
        raw = (await resp.read()).decode()
        assert resp.status == 200 and raw.rstrip().endswith("data: [DONE]"), raw
        assert resp.headers["X-CPN-Route"] == "slo" and "X-CPN-Predicted-TTFT-Ms" in resp.headers
    status, text, _ = await tenant.call("GET", "/metrics")
    assert status == 200
    text = text if isinstance(text, str) else str(text)
    assert 'cpn_ttft_slo_admission_total{model="qwen",outcome="refused"} 2.0' in text, text[:2000]
    assert 'cpn_ttft_prediction_error_seconds_bucket{kind="stream",le="+Inf",model="qwen"} 1.0' in text, text[:2000]
    assert 'cpn_ttft_prediction_error_seconds_bucket{kind="answer",le="+Inf",model="qwen"} 2.0' in text
