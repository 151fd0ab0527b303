"""OpenAI-compatible request and response shapes, and conversions to and from the wire. Pure.

What it holds: the request bodies of ``POST /v1/chat/completions`` and ``POST /v1/completions`` as
msgspec Structs carrying every field OpenAI's API defines (checked against openai-python's
``completion_create_params`` types), the response, chunk, model-list and error bodies, and the
conversions ``request -> wire.InferRequest`` and ``wire.InferResult -> response``.

Promises:

- Rule 1: a body an official OpenAI client sends decodes; a field OpenAI does not define is a 422
  naming it (``forbid_unknown_fields``), and cpn-internal fields (``tenant``, ``origin``, ...) get a
  message saying where they come from instead (API key, ``X-CPN-*`` headers).
- Rule 2: a field OpenAI defines but cpn cannot honour (``n`` > 1, tools, logprobs, audio, JSON
  mode, token-id prompts, ...) is a 400 ``unsupported_parameter``/``unsupported_value`` naming it,
  never silently ignored when ignoring would change the answer.  Sampling hints (``temperature``,
  ``top_p``, penalties, ``seed``, ``stop``, ``logit_bias``) and bookkeeping fields (``user``,
  ``metadata``, ``store``, ``service_tier`` ...) are range-checked and accepted; ``wire.InferRequest``
  has no fields for them yet, so backends do not see them (docs/inference.md).
- Rule 3: responses carry exactly OpenAI's keys (``id``, ``object``, ``created``, ``model``,
  ``choices``, ``usage``); cpn facts (site, RTT, route) travel in ``X-CPN-*`` headers, not bodies.
- Rule 4: nothing here reads the clock: ``created`` (epoch seconds) is an argument.

Public API::

    req = decode_chat_request(body) / decode_completion_request(body)   # RequestError on bad input
    infer = to_infer_request(req, request_id=..., tenant=..., deadline_ms=...)
    body = encode(response("chat", result, created=now_s))
    s = SseStream("chat" | "completion", request_id, model, created, include_usage=...)
    s.start(); s.delta(text); s.finish(result); s.error(message, type, code)   # each -> bytes
    encode(models_list(model_ids, created))
    error_body(message, type, code, param) / error_for(exc: RequestError) -> (status, body dict)
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from controlplane.core import bodies
from controlplane.core.errors import RequestError, Unprocessable
from edge_agent import wire

CHAT_DEFAULT_MAX_TOKENS = 512
"""OpenAI's chat API has no default cap (the context length bounds it); an agent needs a finite one."""
COMPLETION_DEFAULT_MAX_TOKENS = 16
"""OpenAI's documented default for ``/v1/completions``."""
MAX_TOKENS_LIMIT = 1_000_000


Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
Tokens = Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS_LIMIT)]
Stop = str | Annotated[list[str], msgspec.Meta(max_length=4)] | None
LogitBias = dict[str, Annotated[float, msgspec.Meta(ge=-100, le=100)]]
Seed = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
"""A 64-bit seed (it goes on the wire, which carries 64-bit integers)."""
TokenId = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]



# --------------------------------------------------------------------------- requests


class StreamOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None
    """Accepted; cpn never adds obfuscation padding."""


class ContentPart(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One part of a message's content; only ``text`` (and ``refusal`` in assistant turns) is served."""

    type: str
    text: str | None = None
    refusal: str | None = None
    image_url: Any = None
    input_audio: Any = None
    file: Any = None
    prompt_cache_breakpoint: Any = None
    """A caching hint; accepted and ignored."""


class ChatMessageIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    role: Literal["developer", "system", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    function_call: Any = None
    audio: Any = None


class ChatCompletionRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/chat/completions`` (every field of OpenAI's create params)."""

    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    messages: Annotated[list[ChatMessageIn], msgspec.Meta(min_length=1)]
    audio: Any = None
    frequency_penalty: Penalty | None = None
    function_call: Any = None
    functions: list[Any] | None = None
    logit_bias: LogitBias | None = None
    logprobs: bool | None = None
    max_completion_tokens: Tokens | None = None
    max_tokens: Tokens | None = None
    metadata: dict[str, str] | None = None
    modalities: list[str] | None = None
    moderation: Any = None
    n: Annotated[int, msgspec.Meta(ge=1, le=128)] | None = None
    parallel_tool_calls: bool | None = None
    prediction: Any = None
    presence_penalty: Penalty | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: Any = None
    prompt_cache_retention: str | None = None
    reasoning_effort: str | None = None
    response_format: Any = None
    safety_identifier: str | None = None
    seed: Seed | None = None
    service_tier: str | None = None
    stop: Stop = None
    store: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] | None = None
    tool_choice: Any = None
    tools: list[Any] | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    user: str | None = None
    verbosity: str | None = None
    web_search_options: Any = None


class CompletionRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/completions`` (every field of OpenAI's legacy create params)."""

    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    prompt: str | list[str | TokenId | list[TokenId]] | None
    best_of: Annotated[int, msgspec.Meta(ge=1, le=20)] | None = None
    echo: bool | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: LogitBias | None = None
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=5)] | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKENS_LIMIT)] | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=128)] | None = None
    presence_penalty: Penalty | None = None
    seed: Seed | None = None
    stop: Stop = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    user: str | None = None


def _unsupported(field: str, message: str, *, value: bool = False) -> RequestError:
    return RequestError(
        f"{field}: {message}", field=field, status=400, code="unsupported_value" if value else "unsupported_parameter"
    )


def _check_common(req: ChatCompletionRequest | CompletionRequest) -> None:
    if req.n not in (None, 1):
        raise _unsupported("n", f"only n=1 is supported (got {req.n}); send separate requests", value=True)
    if req.stream_options is not None and not req.stream:
        raise RequestError(
            "stream_options: only allowed when stream is true", field="stream_options", status=400
        )


def check_chat_supported(req: ChatCompletionRequest) -> None:
    """Raise a 400 naming the first field cpn cannot honour in ``req`` (Rule 2)."""
    _check_common(req)
    if req.tools:
        raise _unsupported("tools", "tool calling is not supported")
    if req.functions:
        raise _unsupported("functions", "function calling is not supported")
    if req.tool_choice not in (None, "none"):
        raise _unsupported("tool_choice", "tool calling is not supported", value=True)
    if req.function_call not in (None, "none"):
        raise _unsupported("function_call", "function calling is not supported", value=True)
    if req.logprobs:
        raise _unsupported("logprobs", "log probabilities are not returned", value=True)
    if req.top_logprobs:
        raise _unsupported("top_logprobs", "log probabilities are not returned", value=True)
    if req.audio is not None:
        raise _unsupported("audio", "audio output is not supported")
    if req.modalities is not None and any(m != "text" for m in req.modalities):
        raise _unsupported("modalities", "only text output is supported", value=True)
    if req.prediction is not None:
        raise _unsupported("prediction", "predicted outputs are not supported")
    if req.moderation is not None:
        raise _unsupported("moderation", "moderated completions are not supported")
    if req.web_search_options is not None:
        raise _unsupported("web_search_options", "web search is not supported")
    if req.response_format is not None:
        kind = req.response_format.get("type") if isinstance(req.response_format, dict) else None
        if kind != "text":
            raise _unsupported(
                "response_format", f"only {{\"type\": \"text\"}} is supported (got {kind!r}); JSON mode is not enforced", value=True
            )
    if (
        req.max_tokens is not None
        and req.max_completion_tokens is not None
        and req.max_tokens != req.max_completion_tokens
    ):
        raise RequestError(
            "max_tokens: conflicts with max_completion_tokens; send only max_completion_tokens",
            field="max_tokens",
            status=400,
        )
    for i, msg in enumerate(req.messages):
        where = f"messages[{i}]"
        if msg.role in ("tool", "function"):
            raise _unsupported(f"{where}.role", f"role {msg.role!r} needs tool calling, which is not supported", value=True)
        if msg.tool_calls:
            raise _unsupported(f"{where}.tool_calls", "tool calling is not supported")
        if msg.function_call is not None:
            raise _unsupported(f"{where}.function_call", "function calling is not supported")
        if msg.audio is not None:
            raise _unsupported(f"{where}.audio", "audio is not supported")
        if msg.content is None:
            raise RequestError(f"{where}.content: required", field=f"{where}.content", status=400)
        if isinstance(msg.content, list):
            for j, part in enumerate(msg.content):
                if part.type not in ("text", "refusal"):
                    raise _unsupported(
                        f"{where}.content[{j}].type", f"content part {part.type!r} is not supported (text only)", value=True
                    )


def check_completion_supported(req: CompletionRequest) -> None:
    """Raise a 400 naming the first field cpn cannot honour in ``req`` (Rule 2)."""
    _check_common(req)
    if req.best_of not in (None, 1):
        raise _unsupported("best_of", "only best_of=1 is supported", value=True)
    if req.echo:
        raise _unsupported("echo", "echoing the prompt is not supported", value=True)
    if req.logprobs is not None:
        raise _unsupported("logprobs", "log probabilities are not returned")
    if req.suffix:
        raise _unsupported("suffix", "insertion (suffix) is not supported")
    if isinstance(req.prompt, list):
        if len(req.prompt) != 1:
            raise _unsupported("prompt", f"one prompt per request is supported (got {len(req.prompt)})", value=True)
        if not isinstance(req.prompt[0], str):
            raise _unsupported("prompt", "token-id prompts are not supported; send text", value=True)


_chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
_completion_decoder = msgspec.json.Decoder(CompletionRequest)

def _decode(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
    return bodies.decode(body, decoder)


def decode_chat_request(body: bytes) -> ChatCompletionRequest:
    """Decode and check a chat completions body.

    Raises:
        Unprocessable: (422) unknown or cpn-internal field (``field`` names it).
        RequestError: (400) malformed JSON, a missing or out-of-range field, or a field cpn cannot
            honour (``unsupported_*``).
    """
    req: ChatCompletionRequest = _decode(_chat_decoder, body)
    check_chat_supported(req)
    return req


def decode_completion_request(body: bytes) -> CompletionRequest:
    """Decode and check a completions body (errors as :func:`decode_chat_request`)."""
    req: CompletionRequest = _decode(_completion_decoder, body)
    check_completion_supported(req)
    return req


def _text_of(content: str | list[ContentPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(p.text or p.refusal or "" for p in content)


def to_infer_request(
    req: ChatCompletionRequest | CompletionRequest,
    *,
    request_id: str,
    tenant: str = "",
    deadline_ms: float = 0.0,
    default_max_tokens: int | None = None,
) -> wire.InferRequest:
    """The wire request an agent serves for ``req`` (prompt or messages, max tokens, stream).

    ``default_max_tokens`` applies when the body sets none (defaults:
    :data:`CHAT_DEFAULT_MAX_TOKENS`, :data:`COMPLETION_DEFAULT_MAX_TOKENS`).
    """
    stream = bool(req.stream)
    sampling = sampling_of(req)
    if isinstance(req, ChatCompletionRequest):
        max_tokens = req.max_completion_tokens or req.max_tokens or default_max_tokens or CHAT_DEFAULT_MAX_TOKENS
        messages = [wire.ChatMessage(role=m.role, content=_text_of(m.content)) for m in req.messages]
        return wire.InferRequest(
            request_id=request_id, model=req.model, messages=messages, max_tokens=max_tokens,
            stream=stream, tenant=tenant, deadline_ms=deadline_ms, sampling=sampling,
        )
    prompt = req.prompt[0] if isinstance(req.prompt, list) else (req.prompt or "")
    assert isinstance(prompt, str)  # check_completion_supported rejected token ids
    if req.max_tokens is not None:
        max_tokens = req.max_tokens
    else:
        max_tokens = default_max_tokens or COMPLETION_DEFAULT_MAX_TOKENS
    return wire.InferRequest(
        request_id=request_id, model=req.model, prompt=prompt, max_tokens=max_tokens,
        stream=stream, tenant=tenant, deadline_ms=deadline_ms, sampling=sampling,
    )


def sampling_of(req: ChatCompletionRequest | CompletionRequest) -> wire.Sampling | None:
    """The sampling parameters ``req`` sets, for the wire (None when it sets none)."""
    if (req.temperature is None and req.top_p is None and req.seed is None and req.stop is None
            and req.presence_penalty is None and req.frequency_penalty is None and not req.logit_bias):
        return None  # the usual request: nothing built and compared
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    sampling = wire.Sampling(
        temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=stop or None,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        logit_bias={str(k): float(v) for k, v in req.logit_bias.items()} if req.logit_bias else None,
    )
    return None if sampling == _NO_SAMPLING else sampling


_NO_SAMPLING = wire.Sampling()


def include_usage(req: ChatCompletionRequest | CompletionRequest) -> bool:
    """Whether a streamed answer ends with a usage chunk (``stream_options.include_usage``)."""
    return bool(req.stream and req.stream_options is not None and req.stream_options.include_usage)


# --------------------------------------------------------------------------- responses


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(msgspec.Struct, kw_only=True):
    role: str = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionChoice(msgspec.Struct, kw_only=True):
    text: str
    index: int
    logprobs: None = None
    finish_reason: str | None


class Completion(msgspec.Struct, kw_only=True):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class Delta(msgspec.Struct, kw_only=True, omit_defaults=True):
    # omit_defaults: OpenAI's deltas carry only what changed ({"content": "x"}; {} at the end).
    role: str | None = None
    content: str | None = None


class ChunkChoice(msgspec.Struct, kw_only=True):
    index: int
    delta: Delta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    system_fingerprint: str | None = None
    usage: Usage | None | msgspec.UnsetType = msgspec.UNSET
    """Absent unless ``include_usage``; then null on every chunk but the last (OpenAI's rule)."""


class CompletionChunk(msgspec.Struct, kw_only=True):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
    usage: Usage | None | msgspec.UnsetType = msgspec.UNSET


class Model(msgspec.Struct, kw_only=True):
    id: str
    object: str = "model"
    created: int
    owned_by: str


class ModelList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[Model]


_encoder = msgspec.json.Encoder()


def encode(obj: object) -> bytes:
    """JSON bytes of any body built here (responses, chunks, model list, error dicts)."""
    return _encoder.encode(obj)


_FINISH = {"stop": "stop", "length": "length", "content_filter": "content_filter", "max_tokens": "length"}


def finish_reason(reason: str) -> str:
    """OpenAI's finish reason for a wire one (``stop``/``length``/``content_filter``; others -> stop)."""
    return _FINISH.get(reason, "stop")


def chat_id(request_id: str) -> str:
    return f"chatcmpl-{request_id}"


def completion_id(request_id: str) -> str:
    return f"cmpl-{request_id}"


def usage_of(result: wire.InferResult) -> Usage:
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
    )


Kind = Literal["chat", "completion"]


def response(kind: Kind, result: wire.InferResult, *, created: float, model: str | None = None) -> ChatCompletion | Completion:
    """The answer body for an agent's result: ``chat.completion`` (``kind`` "chat") or
    ``text_completion`` (``model`` defaults to the result's)."""
    finish = finish_reason(result.finish_reason)
    if kind == "chat":
        return ChatCompletion(id=chat_id(result.request_id), created=int(created), model=model or result.model,
                              choices=[ChatChoice(index=0, message=AssistantMessage(content=result.output),
                                                  finish_reason=finish)], usage=usage_of(result))
    return Completion(id=completion_id(result.request_id), created=int(created), model=model or result.model,
                      choices=[CompletionChoice(text=result.output, index=0, finish_reason=finish)],
                      usage=usage_of(result))


DONE = b"data: [DONE]\n\n"


def sse(payload: bytes) -> bytes:
    """One Server-Sent Events frame holding a JSON payload."""
    return b"data: " + payload + b"\n\n"


class SseStream:
    """The frames of one streamed answer, in OpenAI's order. Pure: the caller writes the bytes.

    Chat: ``start()`` (role chunk), ``delta(text)``*, ``finish(result)`` (a chunk with the finish
    reason, a usage chunk with empty ``choices`` when ``include_usage``, then ``data: [DONE]``).
    Completions: the same calls; ``start()`` is empty because legacy streams have no role chunk.
    ``error(...)`` is the frame to send instead of ``finish`` when the answer fails mid-stream
    (openai-python raises ``APIError`` on it); the caller then closes the stream.
    """

    def __init__(
        self,
        kind: Kind,
        *,
        request_id: str,
        model: str,
        created: float,
        include_usage: bool = False,
    ) -> None:
        self.kind = kind
        self.id = chat_id(request_id) if kind == "chat" else completion_id(request_id)
        self.model = model
        self.created = int(created)
        self.include_usage = include_usage
        self.frames = 0
        self.finished = False

    def __repr__(self) -> str:
        return f"<SseStream {self.kind} id={self.id} frames={self.frames} finished={self.finished}>"

    def _frame(self, choices: list[ChunkChoice] | list[CompletionChoice], usage: Usage | None | msgspec.UnsetType) -> bytes:
        chunk: ChatCompletionChunk | CompletionChunk
        if self.kind == "chat":
            chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                        choices=choices, usage=usage)  # type: ignore[arg-type]
        else:
            chunk = CompletionChunk(id=self.id, created=self.created, model=self.model,
                                    choices=choices, usage=usage)  # type: ignore[arg-type]
        self.frames += 1
        return sse(_encoder.encode(chunk))

    def _chunk(self, text: str | None, *, role: bool = False, finish: str | None = None) -> bytes:
        usage: Usage | None | msgspec.UnsetType = None if self.include_usage else msgspec.UNSET
        if self.kind == "chat":
            delta = Delta(role="assistant" if role else None, content=text)
            return self._frame([ChunkChoice(index=0, delta=delta, finish_reason=finish)], usage)
        return self._frame([CompletionChoice(text=text or "", index=0, finish_reason=finish)], usage)

    def start(self) -> bytes:
        """The opening frame (chat: ``delta {"role": "assistant", "content": ""}``; completions: none)."""
        if self.kind != "chat":
            return b""
        return self._chunk("", role=True)

    def delta(self, text: str) -> bytes:
        """A frame carrying the next piece of generated text."""
        return self._chunk(text)

    def finish(self, result: wire.InferResult) -> bytes:
        """The closing frames: finish reason, optional usage chunk, ``data: [DONE]``."""
        out = self._chunk(None, finish=finish_reason(result.finish_reason))
        if self.include_usage:
            out += self._frame([], usage_of(result))
        self.finished = True
        self.frames += 1
        return out + DONE

    def error(self, message: str, type: str = "server_error", code: str | None = None) -> bytes:
        """An error frame (``data: {"error": {...}}``) for a failure after the headers were sent."""
        self.finished = True
        self.frames += 1
        return sse(_encoder.encode(error_body(message, type, code)))


def models_list(model_ids: list[str] | set[str], created: float, owned_by: str = "cpn") -> ModelList:
    """The ``GET /v1/models`` body, ids sorted."""
    return ModelList(data=[Model(id=m, created=int(created), owned_by=owned_by) for m in sorted(model_ids)])


# --------------------------------------------------------------------------- errors


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_type_for_status(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_for(exc: RequestError) -> tuple[int, dict[str, Any]]:
    """``(status, body)`` for a caller error, in OpenAI's shape (for the gateway's middleware)."""
    return exc.status, error_body(exc.message, error_type_for_status(exc.status), exc.code, exc.field)
