"""The ``openai-http`` backend: forwards to a site-local OpenAI-compatible server (vLLM, SGLang).

``/v1/chat/completions`` when the request has messages, else ``/v1/completions``; streaming reads
the server's SSE ``data:`` lines and hands each delta on as it arrives (deltas that arrive together,
in one read from the socket, are handed on as one: the same text in fewer messages). cpn model names map to the
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

from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec

from edge_agent import wire
from edge_agent.backends import Completion, OnText, prompt_words
from edge_agent.backends.http1 import BadResponse, Disconnected, Http1Pool, Response
from edge_agent.config import OpenAIHttpConfig
from edge_agent.errors import BackendError


_FAILURES = (OSError, BadResponse, msgspec.DecodeError, msgspec.ValidationError, ValueError, KeyError, TypeError,
             IndexError)
"""What a call to the model server may fail with besides a :class:`BackendError` (:func:`_failure`)."""


def _failure(exc: BaseException, url: str, timeout_s: float) -> BackendError:
    """The :class:`BackendError` a failed call to the model server at ``url`` answers."""
    if isinstance(exc, TimeoutError):  # before OSError: it is one
        return BackendError("timeout", f"the model server gave no answer within {timeout_s:g} s", retryable=True,
                            detail=f"{url}: no answer within {timeout_s:g} s")
    if isinstance(exc, OSError):  # refused, reset, closed mid-answer, TLS
        return BackendError("backend_unavailable", "the model server is unavailable", retryable=True,
                            detail=f"{url}: {exc!r}")
    return BackendError("backend_error", "the model server's answer was unreadable",
                        detail=f"{url}: unreadable answer: {exc!r}")


class _Message(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    message: _Message | None = None
    delta: _Message | None = None
    text: str | None = None
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _Answer(msgspec.Struct):
    """What is read of an answer or of one streamed event (unknown fields are skipped)."""

    choices: list[_Choice] | None = None
    usage: _Usage | None = None


_answer = msgspec.json.Decoder(_Answer)


class _SseReader:
    """What a streamed answer said so far, fed the bytes as they come (pure, no I/O)."""

    __slots__ = ("chat", "texts", "usage", "finish_reason", "deltas", "rest", "done")

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.texts: list[str] = []
        self.usage = _Usage()
        self.finish_reason = "stop"
        self.deltas = 0
        self.rest = b""
        self.done = False

    def feed(self, piece: bytes) -> str:
        """Read the complete ``data:`` lines of ``piece`` (an unfinished line waits for the next);
        returns their text joined ("" when none carried text)."""
        lines = (self.rest + piece).split(b"\n")
        self.rest = lines.pop()
        batch: list[str] = []
        for raw in lines:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, "event:" lines
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                break
            event = _answer.decode(payload)
            if event.usage is not None:
                self.usage = event.usage
            for choice in event.choices or ():
                if self.chat:
                    text = (choice.delta.content if choice.delta is not None else None) or ""
                else:
                    text = choice.text or ""
                if choice.finish_reason:
                    self.finish_reason = choice.finish_reason
                if text:
                    self.deltas += 1
                    batch.append(text)
        self.texts += batch
        return batch[0] if len(batch) == 1 else "".join(batch)


_encode = msgspec.json.Encoder().encode


def _no_text(text: str) -> bool:
    return False


def _no_end(call: StreamCall) -> None:
    return None


class StreamCall:
    """A streamed request sent with no coroutine (:meth:`OpenAIHttpBackend.stream_now`): the
    connection calls :meth:`piece` as the answer comes (each text handed to ``on_text`` at once,
    as :meth:`OpenAIHttpBackend.generate` would), then ``on_done(call)`` at its end, which reads
    the rest with :meth:`finish`.

    ``on_text`` returns False when the text could not be sent on (the stream is broken): the
    caller has then given the call up (:meth:`abort`).

    The two callbacks are the caller's bound methods, and the caller holds the call: a cycle. Once
    the call is over (:meth:`finish`, :meth:`abort`) both are dropped, so the call and its caller are
    freed by reference counting at once, not left to the cyclic garbage collector (whose passes,
    with a stream's half a dozen objects each, cost about 5% of an agent's CPU per stream and
    stalled its loop for tens of milliseconds at a time)."""

    __slots__ = ("backend", "request", "on_text", "on_done", "sse", "conn", "tail", "rest", "deadline", "ended")

    def __init__(self, backend: OpenAIHttpBackend, request: wire.InferRequest, on_text: Callable[[str], bool],
                 on_done: Callable[[StreamCall], None], deadline: float) -> None:
        self.backend = backend
        self.request = request
        self.on_text = on_text
        self.on_done = on_done
        self.sse = _SseReader(bool(request.messages))
        self.conn: Any = None
        self.tail = ""
        self.rest = ""
        """Text that came with the end and is not in ``tail`` (the request is not ``tail_ok``): the
        caller sends it on before the result."""
        self.deadline = deadline
        """Loop time the whole answer is due by (each piece is also due within the server's timeout)."""
        self.ended = False

    def piece(self, conn: Any) -> None:
        """More of the answer came (the connection's callback)."""
        if conn.status >= 400:
            return  # an error's body: read whole at the end
        pieces = conn.pieces
        data = pieces.popleft() if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        try:
            text = self.sse.feed(data)
        except _FAILURES as exc:
            Http1Pool.fail_now(conn, exc)  # on_done: finish() raises it
            return
        if text:
            if self.sse.done and self.request.tail_ok:
                self.tail = text
            elif not self.on_text(text):
                return  # given up
        Http1Pool.rearm(conn, self.backend.timeout_s, self.deadline)

    def done(self, conn: Any) -> None:
        self.on_done(self)

    def finish(self) -> Completion | None:
        """The completion (errors as :meth:`OpenAIHttpBackend.generate` raises them); None when it
        should be sent again the usual way (the kept-alive connection had been closed by the server
        before it answered anything)."""
        backend = self.backend
        pool = backend._pool
        assert pool is not None
        self.ended = True
        self.on_text, self.on_done = _no_text, _no_end  # the cycle through the caller broken (see the class)
        exchange = self.conn
        url = backend._base
        try:
            status, data = pool.finish_now(exchange)
            if status >= 400:
                raise _http_error(url, status, data, exchange.reason)
            text = self.sse.feed(data) if data else ""
        except BackendError:
            raise
        except Disconnected as exc:
            if not exchange.got_bytes:
                return None
            raise _failure(exc, url, backend.timeout_s) from None
        except _FAILURES as exc:
            raise _failure(exc, url, backend.timeout_s) from None
        if text:
            if self.sse.done and self.request.tail_ok:
                self.tail = text  # the end came with it: it rides in the result, one message fewer
            else:
                self.rest = text
        return _stream_completion(self.sse, self.request, self.tail)

    def abort(self) -> None:
        """Give the call up (deadline, cancellation, a broken stream, shutdown)."""
        self.on_text, self.on_done = _no_text, _no_end
        if not self.ended and self.backend._pool is not None:
            self.ended = True
            self.backend._pool.abort(self.conn)


def _http_error(url: str, status: int, data: bytes, reason: str) -> BackendError:
    text = data[:300].decode("utf-8", errors="replace").strip()
    return BackendError("backend_error", f"the model server answered HTTP {status}",
                        retryable=status >= 500 or status == 429,
                        detail=f"{url} answered HTTP {status}: {text or reason}")


def _stream_completion(sse: _SseReader, request: wire.InferRequest, tail: str) -> Completion:
    usage = sse.usage
    return Completion(
        output="".join(sse.texts),
        prompt_tokens=usage.prompt_tokens if usage.prompt_tokens is not None else prompt_words(request),
        completion_tokens=usage.completion_tokens if usage.completion_tokens is not None else sse.deltas,
        finish_reason=sse.finish_reason,
        tail=tail,
    )


class OpenAIHttpBackend:
    """Kept-alive connections to one local server (:class:`Http1Pool`), opened on first use."""

    name = "openai-http"
    answers_now = False
    """:meth:`generate_now` never answers: the agent does not try it (see ``InferenceService.answer_now``)."""

    def __init__(self, config: OpenAIHttpConfig) -> None:
        self._config = config
        self._base = config.url.rstrip("/")
        self.default_slots = config.slots
        self.load_time_s = config.load_time_s
        self.probe_s = config.probe_s
        self._pool: Http1Pool | None = None

    def __repr__(self) -> str:
        return f"<OpenAIHttpBackend {self._base}>"

    def _client(self) -> Http1Pool:
        if self._pool is None:
            headers = {"Authorization": f"Bearer {self._config.api_key}"} if self._config.api_key else {}
            # Idle connections kept: as many as requests may run at once (the site's slots).
            self._pool = Http1Pool(self._base, headers, max_idle=max(self._config.slots, 8))
        return self._pool

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

    @property
    def timeout_s(self) -> float:
        """How long an answer may take (the server's)."""
        return self._config.timeout_s

    def start_now(self, request: wire.InferRequest, on_done: Callable[[Any], None], deadline_s: float) -> Any:
        """Send a plain (not streamed) request on an idle kept-alive connection, with no coroutine;
        ``on_done(exchange)`` is called when its answer ended: read it with :meth:`finish_now`.
        None, having sent nothing, when no connection is idle (then :meth:`generate`)."""
        pool = self._pool
        if pool is None or request.stream:
            return None
        path, body = self._body(request)
        return pool.send_now("POST", path, _encode(body), on_done, timeout_s=min(self._config.timeout_s, deadline_s))

    def finish_now(self, exchange: Any, request: wire.InferRequest) -> Completion | None:
        """The completion of an exchange :meth:`start_now` sent (errors as :meth:`generate` raises
        them); None when it should be sent again the usual way (the kept-alive connection had been
        closed by the server before it answered anything)."""
        pool = self._pool
        assert pool is not None
        url = self._base
        timeout_s = self._config.timeout_s
        try:
            status, data = pool.finish_now(exchange)
            if status >= 400:
                raise _http_error(url, status, data, exchange.reason)
            return self._completion(_answer.decode(data), request)
        except BackendError:
            raise
        except Disconnected as exc:
            if not exchange.got_bytes:
                return None
            raise _failure(exc, url, timeout_s) from None
        except _FAILURES as exc:
            raise _failure(exc, url, timeout_s) from None

    def abort_now(self, exchange: Any) -> None:
        """Give up an exchange :meth:`start_now` or :meth:`stream_now` sent (deadline, cancellation,
        shutdown)."""
        if isinstance(exchange, StreamCall):
            exchange.abort()
        elif self._pool is not None:
            self._pool.abort(exchange)

    def stream_now(self, request: wire.InferRequest, on_text: Callable[[str], bool],
                   on_done: Callable[[StreamCall], None], deadline_s: float) -> StreamCall | None:
        """Send a streamed request on an idle kept-alive connection, with no coroutine (see
        :class:`StreamCall`); ``deadline_s`` bounds the whole answer, the server's timeout each wait
        for more of it. None, having sent nothing, when no connection is idle (then :meth:`generate`)."""
        pool = self._pool
        if pool is None or not request.stream:
            return None
        path, body = self._body(request)
        call = StreamCall(self, request, on_text, on_done, pool.deadline(deadline_s))
        conn = pool.send_now("POST", path, _encode(body), call.done, timeout_s=min(self._config.timeout_s, deadline_s),
                             on_piece=call.piece)
        if conn is None:
            return None
        call.conn = conn
        return call

    async def generate(self, request: wire.InferRequest, on_text: OnText | None) -> Completion:
        path, body = self._body(request)
        url = self._base + path
        timeout_s = self._config.timeout_s
        response = None
        try:
            # A stream may run long: bound the gaps between pieces rather than the whole answer.
            response = await self._client().request("POST", path, _encode(body), timeout_s=timeout_s,
                                                    total=not request.stream)
            if response.status >= 400:
                raise _http_error(url, response.status, await response.read(), response.reason)
            if request.stream:
                return await self._read_stream(response, request, on_text)
            return self._completion(_answer.decode(await response.read()), request)
        except BackendError:
            raise
        except _FAILURES as exc:
            raise _failure(exc, url, timeout_s) from None
        finally:
            if response is not None:
                response.close()  # a no-op once read to the end (the connection went back to the pool)

    async def probe(self) -> str:
        """Check the server once: ``""`` when ``GET probe_path`` answers 2xx within
        ``probe_timeout_s``, else what went wrong (for the site's log; it names the URL)."""
        path = "/" + self._config.probe_path.lstrip("/")
        url = self._base + path
        try:
            response = await self._client().request("GET", path, timeout_s=self._config.probe_timeout_s)
            try:
                await response.read()
            finally:
                response.close()
            return "" if 200 <= response.status < 300 else f"{url} answered HTTP {response.status}"
        except TimeoutError:
            return f"{url}: no answer within {self._config.probe_timeout_s:g} s"
        except (OSError, BadResponse) as exc:
            return f"{url}: {exc!r}"

    @staticmethod
    def _completion(data: _Answer, request: wire.InferRequest) -> Completion:
        if not data.choices:
            raise IndexError("no choices")
        choice = data.choices[0]
        if request.messages:
            text = (choice.message.content if choice.message is not None else None) or ""
        else:
            text = choice.text or ""
        usage = data.usage or _Usage()
        return Completion(
            output=text,
            prompt_tokens=usage.prompt_tokens if usage.prompt_tokens is not None else prompt_words(request),
            completion_tokens=usage.completion_tokens if usage.completion_tokens is not None else len(text.split()),
            finish_reason=choice.finish_reason or "stop",
        )

    @staticmethod
    async def _read_stream(response: Response, request: wire.InferRequest, on_text: OnText | None) -> Completion:
        sse = _SseReader(bool(request.messages))
        tail = ""
        if response.whole:  # the whole stream came at once (a short answer): no async generator to run
            text = sse.feed(await response.read())
            if text:
                if sse.done and request.tail_ok:
                    tail = text  # the end came with it: it rides in the result, one message fewer
                elif on_text is not None:
                    await on_text(text)
        else:
            async for piece in response.pieces():
                text = sse.feed(piece)  # deltas that arrived together go on as one (one message, one write)
                if text:
                    if sse.done and request.tail_ok:
                        tail = text
                    elif on_text is not None:
                        await on_text(text)
                if sse.done:
                    break
        return _stream_completion(sse, request, tail)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
