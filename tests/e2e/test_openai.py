"""OpenAI-compatible endpoints end to end: real hub, real agent, real SSE."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import openai
import pytest

from controlplane.nats.natsserver import NatsServer
from edge_agent.agent import Agent
from edge_agent.config import AgentConfig, BackendConfig, ModelConfig, SimBackendConfig
from tests.support.waiting import until
from tests.support.hubrig import hub_config, running_hub


@pytest.fixture
async def served(tmp_path: Path, nats_server: NatsServer):  # type: ignore[no-untyped-def]
    async with running_hub(hub_config(tmp_path, nats_server.url)) as hub:
        key = hub.create_tenant("acme", default_origin="hangzhou")
        agent = Agent(AgentConfig(
            site="hz-edge", nats=nats_server.url, city="hangzhou", accelerators={"910B": 4},
            models=[ModelConfig(name="chat", cards=1.0, slots=4)],
            backend=BackendConfig(sim=SimBackendConfig(ttft_ms=10, per_token_ms=60, slots=4)),
        ))
        await agent.start()
        await until(lambda: (v := hub.registry.get("hz-edge")) is not None and v.slots_free("chat") > 0, 10, "ready")
        async with aiohttp.ClientSession() as session:
            yield hub, agent, session, f"http://127.0.0.1:{hub.http_port}/v1", {"Authorization": f"Bearer {key}"}
        await agent.stop()


async def test_chat_completion_has_the_openai_shape(served) -> None:  # type: ignore[no-untyped-def]
    _, _, session, base, auth = served
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    async with session.post(f"{base}/chat/completions", json=body, headers=auth) as resp:
        data = await resp.json()
        assert resp.status == 200 and resp.headers["X-CPN-Site"] == "hz-edge"
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    choice = data["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"].startswith("hz-edge:")
    assert data["usage"]["completion_tokens"] == 3 and data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + 3
    async with session.get(f"{base}/models", headers=auth) as resp:
        assert "chat" in [m["id"] for m in (await resp.json())["data"]]


async def test_streaming_relays_chunks_as_they_come_and_ends_with_done(served) -> None:  # type: ignore[no-untyped-def]
    _, _, session, base, auth = served
    body = {"model": "chat", "stream": True, "max_tokens": 6, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "count"}]}
    arrivals: list[tuple[float, str]] = []
    started = time.monotonic()
    async with session.post(f"{base}/chat/completions", json=body, headers=auth) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line:
                arrivals.append((time.monotonic() - started, line))
    lines = [line for _, line in arrivals]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.startswith("hz-edge:") and len(text.split()) == 7
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    first_content = next(t for t, line in arrivals if '"content":"hz-edge' in line)
    done = arrivals[-1][0]
    assert done - first_content > 0.2, "the first token was held back until the end"


async def test_a_client_leaving_mid_stream_stops_the_site(served) -> None:  # type: ignore[no-untyped-def]
    _, agent, session, base, auth = served
    body = {"model": "chat", "stream": True, "max_tokens": 200, "messages": [{"role": "user", "content": "long"}]}
    async with session.post(f"{base}/chat/completions", json=body, headers=auth) as resp:
        assert resp.status == 200
        await resp.content.readline()
        await resp.content.readline()
        resp.close()  # the tenant goes away
    await until(lambda: agent.counters["infer_cancelled"] >= 1, 5, "site told to stop")
    await until(lambda: all(r.busy == 0 for r in agent.heartbeat_message().models), 5, "slot freed")


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "nope"),
        ({"model": "chat", "messages": "not a list"}, 400, "messages"),
        ({"model": "chat", "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
    ],
)
async def test_bad_openai_input_is_a_clear_4xx_in_openai_error_shape(served, body, status: int, needle: str) -> None:  # type: ignore[no-untyped-def]
    _, _, session, base, auth = served
    async with session.post(f"{base}/chat/completions", json=body, headers=auth) as resp:
        data = await resp.json()
        assert resp.status == status, data
    assert needle in data["error"]["message"] or data["error"]["param"] == needle
    assert set(data["error"]) >= {"message", "type", "code"}


async def test_unknown_origin_and_negative_budget_headers(served) -> None:  # type: ignore[no-untyped-def]
    _, _, session, base, auth = served
    body = {"model": "chat", "messages": [{"role": "user", "content": "x"}]}
    async with session.post(f"{base}/chat/completions", json=body, headers={**auth, "X-CPN-Origin": "atlantis"}) as resp:
        assert resp.status == 400 and "atlantis" in (await resp.json())["error"]["message"]
    async with session.post(f"{base}/chat/completions", json=body, headers={**auth, "X-CPN-Budget-Ms": "-3"}) as resp:
        assert resp.status == 400 and (await resp.json())["error"]["param"] == "X-CPN-Budget-Ms"


async def test_the_official_openai_client_works_unchanged(served) -> None:  # type: ignore[no-untyped-def]
    """The `openai` package, as a tenant would use it: no cpn headers, only base_url and the key."""
    _, _, _, base, auth = served
    client = openai.AsyncOpenAI(base_url=base, api_key=auth["Authorization"].removeprefix("Bearer "), max_retries=0)
    try:
        chat = await client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
            temperature=0.0, seed=7, stop=["\n"], top_p=0.5, presence_penalty=0.1, frequency_penalty=0.1)
        assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
        assert chat.choices[0].message.content and chat.choices[0].message.content.startswith("hz-edge:")
        assert chat.choices[0].finish_reason == "length" and chat.usage is not None
        assert chat.usage.completion_tokens == 3
        assert chat.usage.total_tokens == chat.usage.prompt_tokens + 3

        raw = await client.chat.completions.with_raw_response.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        assert raw.headers["X-CPN-Site"] == "hz-edge" and raw.headers["X-CPN-Route"] == "nearest"

        stream = await client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "count"}], max_tokens=4, stream=True,
            stream_options={"include_usage": True})
        pieces, usage = [], None
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            if chunk.usage is not None:
                usage = chunk.usage
        assert "".join(pieces).startswith("hz-edge:") and usage is not None and usage.completion_tokens == 4

        comp = await client.completions.create(model="chat", prompt="once upon", max_tokens=2)
        assert comp.object == "text_completion" and comp.choices[0].text.startswith("hz-edge:")
        text = ""
        async for part in await client.completions.create(model="chat", prompt="x", max_tokens=2, stream=True):
            text += part.choices[0].text if part.choices else ""
        assert text.startswith("hz-edge:")

        assert "chat" in [m.id async for m in client.models.list()]

        # Errors arrive as the client's own exception types, with cpn's message.
        with pytest.raises(openai.NotFoundError, match="nope"):
            await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}], n=3)
        assert bad.value.param == "n" or "n" in str(bad.value)
        wrong = openai.AsyncOpenAI(base_url=base, api_key="cpn_wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await wrong.models.list()
        await wrong.close()
    finally:
        await client.close()
