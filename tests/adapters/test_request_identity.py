"""Request identity cannot be borrowed: a tenant cannot cancel or disturb another's requests.

Real hub, real agent (sim backend with a service time), real NATS and HTTP. The attack of the
issue: tenant A reads ``X-Request-Id`` from its own answers, works out the ids tenant B's requests
get (or learns B's ids outright), sends streams carrying them as its own ``X-Request-Id`` and hangs
up, so the hub tells the site to cancel those ids.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controlplane.nats.natsserver import NatsServer
from controlplane.services.inference import RequestIds
from edge_agent import wire
from edge_agent.agent import Agent
from edge_agent.config import AgentConfig, BackendConfig, ModelConfig, SimBackendConfig
from tests.support.hubrig import hub_config, running_hub
from tests.support.waiting import until


@pytest.fixture
async def two_tenants(tmp_path: Path, nats_server: NatsServer):  # type: ignore[no-untyped-def]
    async with running_hub(hub_config(tmp_path, nats_server.url)) as hub:
        a = hub.create_tenant("tenant-a", default_origin="hangzhou")
        b = hub.create_tenant("tenant-b", default_origin="hangzhou")
        agent = Agent(AgentConfig(
            site="hz-edge", nats=nats_server.url, city="hangzhou", accelerators={"910B": 4},
            models=[ModelConfig(name="chat", cards=1.0, slots=64)],
            backend=BackendConfig(sim=SimBackendConfig(ttft_ms=5, per_token_ms=25, slots=64)),
        ))
        await agent.start()
        await until(lambda: (v := hub.registry.get("hz-edge")) is not None and v.slots_free("chat") > 0, 10, "ready")
        async with aiohttp.ClientSession() as session:
            yield hub, agent, session, f"http://127.0.0.1:{hub.http_port}", a, b
        await agent.stop()


def chat(tokens: int, *, stream: bool = False) -> dict[str, Any]:
    return {"model": "chat", "max_tokens": tokens, "stream": stream, "messages": [{"role": "user", "content": "x"}]}


def neighbours(sample: str) -> list[str]:
    """What an attacker would try: ids next to one it has seen (a counter's neighbours), if it looks
    like ``<prefix><hex counter>``; always the sample itself too."""
    m = re.fullmatch(r"(r[0-9a-f]{8})([0-9a-f]+)", sample)
    if m is None:
        return [sample]
    n = int(m.group(2), 16)
    return [f"{m.group(1)}{k:x}" for k in range(n - 2, n + 12)]


async def test_a_tenant_cannot_cancel_anothers_requests_by_their_request_ids(two_tenants) -> None:  # type: ignore[no-untyped-def]
    hub, agent, session, base, key_a, key_b = two_tenants
    auth_a, auth_b = {"Authorization": f"Bearer {key_a}"}, {"Authorization": f"Bearer {key_b}"}

    # A samples the ids the gateway hands out.
    async with session.get(f"{base}/v1/models", headers=auth_a) as resp:
        sample = resp.headers["X-Request-Id"]

    # B: four slow requests in flight (about 1 s each at the site).
    async def b_request(i: int) -> tuple[int, Any, str]:
        async with session.post(f"{base}/v1/chat/completions", json=chat(40), headers=auth_b) as resp:
            return resp.status, await resp.json(), resp.headers["X-Request-Id"]

    b_tasks = [asyncio.create_task(b_request(i)) for i in range(4)]
    await until(lambda: sum(map(len, agent.inference._running.values())) >= 4, 5, "B's requests at the site")

    # A: a stream under each id it guesses for B, hanging up after the first chunk.
    async def a_hangs_up(rid: str) -> tuple[str, str, str]:
        """(the id A sent, the id echoed, the wire id of A's request)."""
        async with session.post(f"{base}/v1/chat/completions", json=chat(200, stream=True),
                                headers={**auth_a, "X-Request-Id": rid}) as resp:
            assert resp.status == 200
            first = await resp.content.readline()
            assert first.startswith(b"data: ")
            resp.close()
            return rid, resp.headers["X-Request-Id"], json.loads(first[6:])["id"].removeprefix("chatcmpl-")

    cancelled_before = agent.counters["infer_cancelled"]
    guesses = neighbours(sample)
    seen = await asyncio.gather(*(a_hangs_up(rid) for rid in guesses))
    # A's hang-ups did reach the site as cancellations (of A's own requests).
    await until(lambda: agent.counters["infer_cancelled"] - cancelled_before >= len(guesses), 10, "A's cancels")

    results = await asyncio.gather(*b_tasks)
    assert [status for status, _, _ in results] == [200] * 4, results
    assert all(body["usage"]["completion_tokens"] == 40 for _, body, _ in results)
    # A client's id is echoed, but never put on the wire.
    assert all(echoed == sent and wire_id != sent and wire.is_valid_id(wire_id) for sent, echoed, wire_id in seen)

    # Knowing B's ids outright (from B's own answers) does not help either.
    b_task = asyncio.create_task(b_request(9))
    await until(lambda: sum(map(len, agent.inference._running.values())) >= 1, 5, "B's request at the site")
    await asyncio.gather(*(a_hangs_up(rid) for _, body, rid in results))
    await asyncio.gather(*(a_hangs_up(body["id"].removeprefix("chatcmpl-")) for _, body, _ in results))
    status, body, _ = await b_task
    assert status == 200 and body["usage"]["completion_tokens"] == 40, body


async def test_hub_request_ids_are_128_random_bits_and_a_clients_id_is_only_echoed(two_tenants) -> None:  # type: ignore[no-untyped-def]
    hub, _, session, base, key_a, _ = two_tenants
    request_ids = RequestIds()
    ids = [request_ids.next() for _ in range(1000)]
    assert len(set(ids)) == 1000 and all(wire.is_valid_id(i) and re.fullmatch(r"r[0-9a-f]{32}", i) for i in ids)
    # No shared prefix an attacker could learn from one id and extend.
    assert len({i[:9] for i in ids}) > 900
    auth = {"Authorization": f"Bearer {key_a}"}
    async with session.post(f"{base}/v1/infer", json={"model": "chat", "input": "hi", "max_tokens": 2},
                            headers={**auth, "X-Request-Id": "trace-123"}) as resp:
        body = await resp.json()
        assert resp.status == 200 and resp.headers["X-Request-Id"] == "trace-123"
        assert re.fullmatch(r"r[0-9a-f]{32}", body["id"])  # the wire id is the hub's
    async with session.post(f"{base}/v1/infer", json={"model": "chat", "input": "hi", "max_tokens": 2},
                            headers=auth) as resp:
        body = await resp.json()
        assert resp.status == 200 and resp.headers["X-Request-Id"] == body["id"]  # no client id: the hub's is echoed
