"""A small OpenAI-compatible server (a vLLM look-alike) on port 0 that tests can stop and start
again on the same port, as a site's local model server crashes and comes back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web


@dataclass
class LocalServer:
    url: str
    requests: list[tuple[str, dict[str, Any], str]] = field(default_factory=list)
    fail_status: int = 0
    delay_s: float = 0.0
    probes: int = 0
    app: web.Application | None = None
    runner: web.AppRunner | None = None
    port: int = 0

    async def start(self) -> None:
        """Listen (again) on the same port (0 the first time: any free one)."""
        assert self.app is not None and self.runner is None
        self.runner = web.AppRunner(self.app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        """Go away as a crashed server does: connections refused from now on."""
        if self.runner is not None:
            runner, self.runner = self.runner, None
            await runner.cleanup()


@pytest.fixture
async def local_llm() -> AsyncIterator[LocalServer]:
    """A vLLM look-alike: echoes the last user message word by word; streams as SSE with 30 ms gaps;
    ``GET /v1/models`` lists one model (what the agent's probe asks)."""
    state = LocalServer(url="")

    async def models(request: web.Request) -> web.Response:
        state.probes += 1
        return web.json_response({"object": "list", "data": [{"id": "qwen", "object": "model"}]})

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        state.requests.append((request.path, body, request.headers.get("Authorization", "")))
        if state.delay_s:
            await asyncio.sleep(state.delay_s)  # the behaviour: a model that takes its time
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
            await asyncio.sleep(0.03)  # the behaviour: tokens stream out over time
        await resp.write(b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}\n\n')
        usage = {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": len(words)}}
        await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    app.router.add_post("/v1/completions", handle)
    app.router.add_get("/v1/models", models)
    state.app = app
    await state.start()
    try:
        yield state
    finally:
        await state.stop()
