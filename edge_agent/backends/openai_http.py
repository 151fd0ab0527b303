"""The ``openai-http`` backend: forwards to a site-local OpenAI-compatible server (vLLM, SGLang).

``/v1/chat/completions`` when the request has messages, else ``/v1/completions``; streaming reads
the server's SSE ``data:`` lines and hands each delta on as it arrives. cpn model names map to the
local server's names through ``models`` (identity when missing).

Errors become :class:`~edge_agent.errors.BackendError` whose code and message name no URL, host or
text of the local server (those go to ``detail``, for the site's log): a refused or broken
connection is ``backend_unavailable`` (retryable), an HTTP error status is ``backend_error`` with
the status only (retryable for 5xx and 429, since another site may serve it), a timeout is
``timeout`` (retryable), an unreadable answer is ``backend_error``.

:meth:`OpenAIHttpBackend.probe` checks that the server answers (``GET probe_path``); the agent
calls it every ``probe_s`` (:mod:`edge_agent.backend_health`).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import msgspec

from edge_agent import wire
from edge_agent.backends import Completion, OnText, prompt_words
from edge_agent.config import OpenAIHttpConfig
from edge_agent.errors import BackendError


class OpenAIHttpBackend:
    """An aiohttp client session to one local server; created lazily inside the running loop."""

    name = "openai-http"

    def __init__(self, config: OpenAIHttpConfig) -> None:
        self._config = config
        self._base = config.url.rstrip("/")
        self.default_slots = config.slots
        self.load_time_s = config.load_time_s
        self.probe_s = config.probe_s
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"<OpenAIHttpBackend {self._base}>"

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"Bearer {self._config.api_key}"} if self._config.api_key else {}
            self._session = aiohttp.ClientSession(headers=headers)
        return self._session

    def _body(self, request: wire.InferRequest) -> tuple[str, dict[str, Any]]:
        model = self._config.models.get(request.model, request.model)
        body: dict[str, Any] = {"model": model, "max_tokens": request.max_tokens, "stream": request.stream}
        if request.stream:
            body["stream_options"] = {"include_usage": True}
        if request.sampling is not None:  # only what the tenant set: the server's defaults otherwise
            body.update(msgspec.to_builtins(request.sampling))
        if request.messages:
            body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
            return "/v1/chat/completions", body
        body["prompt"] = request.prompt
        return "/v1/completions", body

    def generate_now(self, request: wire.InferRequest) -> Completion | None:
        return None  # every answer is an HTTP round trip

    async def generate(self, request: wire.InferRequest, on_text: OnText | None) -> Completion:
        path, body = self._body(request)
        url = self._base + path
        timeout_s = self._config.timeout_s
        if request.stream:
            # A stream may run long; bound the gaps between pieces rather than the whole answer.
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
        else:
            timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with self._client().post(url, json=body, timeout=timeout) as resp:
                if resp.status >= 400:
                    text = (await resp.text())[:300].strip()
                    raise BackendError(
                        "backend_error",
                        f"the model server answered HTTP {resp.status}",
                        retryable=resp.status >= 500 or resp.status == 429,
                        detail=f"{url} answered HTTP {resp.status}: {text or resp.reason}",
                    )
                if request.stream:
                    return await self._read_stream(resp, request, on_text)
                data = await resp.json(content_type=None)
                return self._completion(data, request)
        except BackendError:
            raise
        except asyncio.TimeoutError:
            raise BackendError("timeout", f"the model server gave no answer within {timeout_s:g} s", retryable=True,
                               detail=f"{url}: no answer within {timeout_s:g} s") from None
        except aiohttp.ClientConnectionError as exc:
            raise BackendError("backend_unavailable", "the model server is unavailable", retryable=True,
                               detail=f"{url}: {exc}") from None
        except (aiohttp.ClientError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise BackendError("backend_error", "the model server's answer was unreadable",
                               detail=f"{url}: unreadable answer: {exc!r}") from None

    async def probe(self) -> str:
        """Check the server once: ``""`` when ``GET probe_path`` answers 2xx within
        ``probe_timeout_s``, else what went wrong (for the site's log; it names the URL)."""
        url = self._base + "/" + self._config.probe_path.lstrip("/")
        try:
            async with self._client().get(url, timeout=aiohttp.ClientTimeout(total=self._config.probe_timeout_s)) as resp:
                await resp.read()
                return "" if 200 <= resp.status < 300 else f"{url} answered HTTP {resp.status}"
        except asyncio.TimeoutError:
            return f"{url}: no answer within {self._config.probe_timeout_s:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            return f"{url}: {exc!r}"

    @staticmethod
    def _completion(data: dict[str, Any], request: wire.InferRequest) -> Completion:
        choice = data["choices"][0]
        if request.messages:
            text = (choice.get("message") or {}).get("content") or ""
        else:
            text = choice.get("text") or ""
        usage = data.get("usage") or {}
        return Completion(
            output=text,
            prompt_tokens=int(usage.get("prompt_tokens", prompt_words(request))),
            completion_tokens=int(usage.get("completion_tokens", len(text.split()))),
            finish_reason=choice.get("finish_reason") or "stop",
        )

    async def _read_stream(
        self, resp: aiohttp.ClientResponse, request: wire.InferRequest, on_text: OnText | None
    ) -> Completion:
        pieces: list[str] = []
        usage: dict[str, Any] = {}
        finish_reason = "stop"
        deltas = 0
        async for raw in resp.content:
            line = raw.decode("utf-8", errors="replace").strip()
            if not line.startswith("data:"):
                continue  # blank separators, comments, "event:" lines
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            event = json.loads(payload)
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or []:
                if request.messages:
                    text = (choice.get("delta") or {}).get("content") or ""
                else:
                    text = choice.get("text") or ""
                if choice.get("finish_reason"):
                    finish_reason = choice["finish_reason"]
                if text:
                    deltas += 1
                    pieces.append(text)
                    if on_text is not None:
                        await on_text(text)
        return Completion(
            output="".join(pieces),
            prompt_tokens=int(usage.get("prompt_tokens", prompt_words(request))),
            completion_tokens=int(usage.get("completion_tokens", deltas)),
            finish_reason=finish_reason,
        )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()
