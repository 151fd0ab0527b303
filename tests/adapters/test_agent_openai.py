"""The ``openai-http`` backend against a small OpenAI-compatible aiohttp server on port 0,
both directly and through an agent on a real nats-server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from controlplane.natsserver import NatsServer
from edge_agent import wire
from edge_agent.backends.openai_http import OpenAIHttpBackend
from edge_agent.config import OpenAIHttpConfig
from edge_agent.errors import BackendError
from tests.support.fakehub import FakeHub, agent_config, running


@dataclass
class LocalServer:
    url: str
    requests: list[tuple[str, dict[str, Any], str]] = field(default_factory=list)
    fail_status: int = 0
    delay_s: float = 0.0


@pytest.fixture
async def local_llm() -> AsyncIterator[LocalServer]:
    """A vLLM look-alike: echoes the last user message word by word; streams as SSE with 30 ms gaps."""
    state = LocalServer(url="")

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        state.requests.append((request.path, body, request.headers.get("Authorization", "")))
        if state.delay_s:
            await asyncio.sleep(state.delay_s)
        if state.fail_status:
            return web.json_response({"error": {"message": "CUDA out of memory"}}, status=state.fail_status)
        chat = request.path.endswith("/chat/completions")
        source = body["messages"][-1]["content"] if chat else body["prompt"]
        words = [f"{w}!" for w in source.split()][: body.get("max_tokens", 16)]
        if not body.get("stream"):
            text = " ".join(words)
            choice = {"index": 0, "finish_reason": "stop",
                      **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
            return web.json_response({"id": "x", "model": body["model"], "choices": [choice],
                                      "usage": {"prompt_tokens": 11, "completion_tokens": len(words)}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            choice = {"index": 0, "finish_reason": None,
                      **({"delta": {"content": piece}} if chat else {"text": piece})}
            await resp.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            await asyncio.sleep(0.03)
        await resp.write(b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}\n\n')
        usage = {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": len(words)}}
        await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    app.router.add_post("/v1/completions", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state.url = f"http://127.0.0.1:{port}"
    try:
        yield state
    finally:
        await runner.cleanup()


async def test_non_streaming_chat_and_completions(local_llm: LocalServer) -> None:
    backend = OpenAIHttpBackend(OpenAIHttpConfig(url=local_llm.url, api_key="sk-local",
                                                 models={"qwen": "Qwen/Qwen2-7B-Instruct"}))
    try:
        chat = await backend.generate(wire.InferRequest(
            request_id="c1", model="qwen", max_tokens=8,
            messages=[wire.ChatMessage(role="user", content="hello there")]), None)
        assert chat.output == "hello! there!" and chat.completion_tokens == 2 and chat.prompt_tokens == 11
        plain = await backend.generate(wire.InferRequest(request_id="c2", model="other", prompt="a b c",
                                                         max_tokens=2, sampling=wire.Sampling(temperature=0.0, seed=5, stop=["."])), None)
        assert plain.output == "a! b!"
    finally:
        await backend.close()
    (path1, body1, auth1), (path2, body2, _) = local_llm.requests
    assert path1 == "/v1/chat/completions" and body1["model"] == "Qwen/Qwen2-7B-Instruct"
    assert auth1 == "Bearer sk-local"
    assert path2 == "/v1/completions" and body2["model"] == "other" and body2["max_tokens"] == 2
    # Only what the tenant set is passed on: the server's own defaults stand for the rest.
    assert (body2["temperature"], body2["seed"], body2["stop"]) == (0.0, 5, ["."]) and "top_p" not in body2
    assert "temperature" not in body1


async def test_streaming_relays_deltas_as_they_arrive(local_llm: LocalServer) -> None:
    backend = OpenAIHttpBackend(OpenAIHttpConfig(url=local_llm.url))
    loop = asyncio.get_running_loop()
    seen: list[tuple[float, str]] = []

    async def on_text(text: str) -> None:
        seen.append((loop.time(), text))

    try:
        done = await backend.generate(wire.InferRequest(
            request_id="s", model="m", stream=True, messages=[wire.ChatMessage(role="user", content="one two three")]),
            on_text)
    finally:
        await backend.close()
    finished = loop.time()
    assert [t for _, t in seen] == ["one!", " two!", " three!"]
    assert done.output == "one! two! three!" and done.finish_reason == "length" and done.completion_tokens == 3
    assert finished - seen[0][0] >= 0.05  # the first delta was handed on before the stream ended
    assert local_llm.requests[0][1]["stream_options"] == {"include_usage": True}


async def test_http_errors_and_timeouts_become_clear_backend_errors(local_llm: LocalServer) -> None:
    backend = OpenAIHttpBackend(OpenAIHttpConfig(url=local_llm.url, timeout_s=0.2))
    req = wire.InferRequest(request_id="e", model="m", prompt="x")
    try:
        local_llm.fail_status = 500
        with pytest.raises(BackendError) as err:
            await backend.generate(req, None)
        assert err.value.code == "backend" and err.value.retryable and "HTTP 500" in err.value.message
        assert "CUDA out of memory" in err.value.message
        local_llm.fail_status = 400
        with pytest.raises(BackendError) as err:
            await backend.generate(req, None)
        assert err.value.code == "backend" and not err.value.retryable
        local_llm.fail_status, local_llm.delay_s = 0, 1.0
        with pytest.raises(BackendError) as err:
            await backend.generate(req, None)
        assert err.value.code == "timeout" and err.value.retryable
    finally:
        await backend.close()
    refused = OpenAIHttpBackend(OpenAIHttpConfig(url="http://127.0.0.1:9"))
    try:
        with pytest.raises(BackendError) as err:
            await refused.generate(req, None)
        assert err.value.code == "backend" and err.value.retryable
    finally:
        await refused.close()


async def test_agent_serves_through_openai_http(nats_server: NatsServer, local_llm: LocalServer) -> None:
    cfg = agent_config(nats_server.url, backend={"kind": "openai-http", "openai-http": {"url": local_llm.url}})
    async with FakeHub(nats_server.url) as hub:
        async with running(cfg) as agent:
            req = wire.InferRequest(request_id="a1", model="qwen", stream=True,
                                    messages=[wire.ChatMessage(role="user", content="red green blue")])
            got = await hub.infer_stream("edge-a", req)
            assert [m.text for _, m in got[:-1]] == ["red!", " green!", " blue!"]  # type: ignore[union-attr]
            final = got[-1][1]
            assert isinstance(final, wire.InferResult) and final.output == "red! green! blue!" and final.site == "edge-a"
            local_llm.fail_status = 503
            err = await hub.infer("edge-a", wire.InferRequest(request_id="a2", model="qwen", prompt="x"))
            assert isinstance(err, wire.ErrorReply) and err.code == "backend" and err.retryable
            assert agent.counters["infer_errors"] == 1
            await asyncio.wait_for(agent.registered.wait(), 5)
            assert hub.registrations_of("edge-a")[-1].backends == ["openai-http"]
