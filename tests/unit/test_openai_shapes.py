"""OpenAI-compatible bodies (controlplane/gateway/openai_shapes.py): decoding, refusals, responses, SSE frames."""

from __future__ import annotations

import json

import msgspec
import pytest

from controlplane.gateway import openai_shapes as oa
from controlplane.core.errors import RequestError, Unprocessable
from edge_agent import wire

# Field names of openai-python's chat and legacy completion create params
# (src/openai/types/chat/completion_create_params.py, src/openai/types/completion_create_params.py).
OPENAI_CHAT_FIELDS = {
    "messages", "model", "audio", "frequency_penalty", "function_call", "functions", "logit_bias",
    "logprobs", "max_completion_tokens", "max_tokens", "metadata", "modalities", "n",
    "parallel_tool_calls", "prediction", "presence_penalty", "prompt_cache_key", "prompt_cache_retention",
    "reasoning_effort", "response_format", "safety_identifier", "seed", "service_tier", "stop", "store",
    "stream", "stream_options", "temperature", "tool_choice", "tools", "top_logprobs", "top_p", "user",
    "verbosity", "web_search_options", "moderation", "prompt_cache_options",
}
OPENAI_COMPLETION_FIELDS = {
    "model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n",
    "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix", "temperature", "top_p", "user",
}

CHAT = {"model": "qwen2-7b", "messages": [{"role": "user", "content": "hi"}]}


def body(base: dict[str, object], **extra: object) -> bytes:
    return json.dumps({**base, **extra}).encode()


def test_every_openai_field_is_known() -> None:
    assert set(oa.ChatCompletionRequest.__struct_fields__) == OPENAI_CHAT_FIELDS
    assert set(oa.CompletionRequest.__struct_fields__) == OPENAI_COMPLETION_FIELDS


def test_a_full_client_body_decodes() -> None:
    # What a client sends with every honoured or harmless option set.
    req = oa.decode_chat_request(body(
        CHAT,
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b", "prompt_cache_breakpoint": {"mode": "explicit"}}], "name": "x"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello", "refusal": None},
        ],
        frequency_penalty=0.5, presence_penalty=-0.5, logit_bias={"50256": -100}, logprobs=False,
        max_completion_tokens=64, metadata={"k": "v"}, modalities=["text"], n=1, parallel_tool_calls=True,
        prompt_cache_key="k", prompt_cache_options={"mode": "implicit"}, reasoning_effort="low", response_format={"type": "text"}, safety_identifier="u1",
        seed=7, service_tier="auto", stop=["\n", "END"], store=False, stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False}, temperature=0.2, tool_choice="none",
        tools=[], top_logprobs=0, top_p=0.9, user="alice", verbosity="low", functions=[], function_call="none",
    ))
    assert req.stream and oa.include_usage(req)
    infer = oa.to_infer_request(req, request_id="r1", tenant="acme", deadline_ms=8.0)
    assert infer == wire.InferRequest(
        request_id="r1", model="qwen2-7b", max_tokens=64, stream=True, tenant="acme", deadline_ms=8.0,
        messages=[
            wire.ChatMessage(role="developer", content="be brief"),
            wire.ChatMessage(role="system", content="a\nb"),
            wire.ChatMessage(role="user", content="hi"),
            wire.ChatMessage(role="assistant", content="hello"),
        ],
        sampling=wire.Sampling(temperature=0.2, top_p=0.9, seed=7, stop=["\n", "END"], presence_penalty=-0.5,
                               frequency_penalty=0.5, logit_bias={"50256": -100.0}),
    )


def test_max_tokens_defaults_and_aliases() -> None:
    chat = oa.decode_chat_request(body(CHAT))
    assert oa.to_infer_request(chat, request_id="r").max_tokens == oa.CHAT_DEFAULT_MAX_TOKENS
    assert oa.to_infer_request(chat, request_id="r", default_max_tokens=40).max_tokens == 40
    chat = oa.decode_chat_request(body(CHAT, max_tokens=33))
    assert oa.to_infer_request(chat, request_id="r").max_tokens == 33
    comp = oa.decode_completion_request(b'{"model": "m", "prompt": ["once upon"]}')
    infer = oa.to_infer_request(comp, request_id="r")
    assert (infer.prompt, infer.messages, infer.max_tokens, infer.stream) == ("once upon", None, 16, False)


def test_sampling_goes_on_the_wire_only_when_set() -> None:
    assert oa.to_infer_request(oa.decode_chat_request(body(CHAT)), request_id="r").sampling is None
    comp = oa.decode_completion_request(b'{"model": "m", "prompt": "x", "stop": "END", "seed": 3, "temperature": 0}')
    assert oa.to_infer_request(comp, request_id="r").sampling == wire.Sampling(stop=["END"], seed=3, temperature=0.0)


@pytest.mark.parametrize(
    ("extra", "sampling"),
    [
        ({}, None),
        ({"stop": []}, None),
        ({"logit_bias": {}}, None),
        ({"stop": ""}, wire.Sampling(stop=[""])),
        ({"top_p": 1.0}, wire.Sampling(top_p=1.0)),
        ({"presence_penalty": 0.0}, wire.Sampling(presence_penalty=0.0)),
        ({"frequency_penalty": -1.0}, wire.Sampling(frequency_penalty=-1.0)),
        ({"logit_bias": {"5": 2}}, wire.Sampling(logit_bias={"5": 2.0})),
    ],
)
def test_each_sampling_field_alone_goes_on_the_wire_and_empty_ones_do_not(
    extra: dict[str, object], sampling: wire.Sampling | None,
) -> None:
    """The request that sets no sampling field skips building one (the usual case); any one field
    set, even to a falsy value, still goes on the wire."""
    assert oa.to_infer_request(oa.decode_chat_request(body(CHAT, **extra)), request_id="r").sampling == sampling


@pytest.mark.parametrize(
    ("extra", "field", "status", "code"),
    [
        ({"temprature": 0.2}, "temprature", 422, "unknown_field"),
        ({"tenant": "other"}, "tenant", 422, "forbidden_field"),
        ({"origin": "hz"}, "origin", 422, "forbidden_field"),
        ({"messages": [{"role": "user", "content": "x", "tenant": "t"}]}, "messages[0].tenant", 422, "unknown_field"),
        ({"stream_options": {"include_usage": True, "extra": 1}}, "stream_options.extra", 422, "unknown_field"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", 400, "invalid_field"),
        ({"temperature": 2.5}, "temperature", 400, "invalid_field"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", 400, "invalid_field"),
        ({"max_tokens": 0}, "max_tokens", 400, "invalid_field"),
        ({"messages": []}, "messages", 400, "invalid_field"),
    ],
)
def test_bad_fields_name_the_field_unknown_ones_422_bad_values_400(
    extra: dict[str, object], field: str, status: int, code: str
) -> None:
    with pytest.raises(RequestError) as info:
        oa.decode_chat_request(body(CHAT, **extra))
    assert (info.value.status, info.value.field, info.value.code) == (status, field, code)
    assert info.value.message.startswith(f"{field}: ")


def test_internal_field_says_where_it_comes_from() -> None:
    with pytest.raises(Unprocessable) as info:
        oa.decode_chat_request(body(CHAT, budget_ms=5))
    assert "X-CPN-Budget-Ms" in info.value.message


def test_missing_field_and_bad_json() -> None:
    with pytest.raises(RequestError) as info:
        oa.decode_completion_request(b'{"model": "m"}')
    assert (info.value.status, info.value.field, info.value.message) == (400, "prompt", "prompt: required field missing")
    with pytest.raises(RequestError) as bad:
        oa.decode_chat_request(b'{"model": ')
    assert (bad.value.status, bad.value.code) == (400, "malformed_json")


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"moderation": {"model": "omni-moderation-latest"}}, "moderation"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"max_tokens": 10, "max_completion_tokens": 20}, "max_tokens"),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "c"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
         "messages[0].content[0].type"),
        ({"messages": [{"role": "assistant", "content": None}]}, "messages[0].content"),
    ],
)
def test_unsupported_chat_features_are_400_naming_the_field(extra: dict[str, object], field: str) -> None:
    with pytest.raises(RequestError) as info:
        oa.decode_chat_request(body(CHAT, **extra))
    assert not isinstance(info.value, Unprocessable)
    assert (info.value.status, info.value.field) == (400, field)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"echo": True}, "echo"),
        ({"best_of": 3}, "best_of"),
        ({"logprobs": 2}, "logprobs"),
        ({"suffix": "end"}, "suffix"),
        ({"n": 4}, "n"),
    ],
)
def test_unsupported_completion_features(extra: dict[str, object], field: str) -> None:
    with pytest.raises(RequestError) as info:
        oa.decode_completion_request(body({"model": "m", "prompt": "p"}, **extra))
    assert (info.value.status, info.value.field) == (400, field)
    assert info.value.code in ("unsupported_parameter", "unsupported_value")


RESULT = wire.InferResult(
    request_id="abc123", site="hz-edge", model="qwen2-7b", output="Hello there", prompt_tokens=5,
    completion_tokens=2, finish_reason="length",
)


def test_chat_response_shape() -> None:
    got = json.loads(oa.encode(oa.response("chat", RESULT, created=1_700_000_000.7)))
    assert got == {
        "id": "chatcmpl-abc123",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "qwen2-7b",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hello there", "refusal": None},
             "logprobs": None, "finish_reason": "length"}
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
        "system_fingerprint": None,
    }


def test_completion_response_shape() -> None:
    result = msgspec.structs.replace(RESULT, finish_reason="something-new")
    got = json.loads(oa.encode(oa.response("completion", result, created=5, model="alias")))
    assert got == {
        "id": "cmpl-abc123", "object": "text_completion", "created": 5, "model": "alias",
        "choices": [{"text": "Hello there", "index": 0, "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
        "system_fingerprint": None,
    }


def frames(data: bytes) -> list[object]:
    """Split an SSE byte stream the way a client does: events end at a blank line."""
    assert data.endswith(b"\n\n")
    out: list[object] = []
    for event in data.split(b"\n\n")[:-1]:
        assert event.startswith(b"data: ")
        payload = event[len(b"data: "):]
        out.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return out


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream_frames(include_usage: bool) -> None:
    s = oa.SseStream("chat", request_id="abc123", model="qwen2-7b", created=9, include_usage=include_usage)
    data = s.start() + s.delta("Hello") + s.delta(" there") + s.finish(RESULT)
    got = frames(data)
    assert got[-1] == "[DONE]"
    chunks = [c for c in got[:-1] if isinstance(c, dict)]
    assert all(c["id"] == "chatcmpl-abc123" and c["object"] == "chat.completion.chunk" and c["created"] == 9 for c in chunks)
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Hello there"
    final = chunks[3]
    assert final["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    if include_usage:
        assert len(chunks) == 5
        assert all(c["usage"] is None for c in chunks[:4])
        assert chunks[4]["choices"] == []
        assert chunks[4]["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    else:
        assert len(chunks) == 4
        assert all("usage" not in c for c in chunks)
    assert s.finished and s.frames == len(got)


def test_completion_stream_frames() -> None:
    s = oa.SseStream("completion", request_id="abc123", model="m", created=9, include_usage=True)
    assert s.start() == b""
    got = frames(s.delta("Hel") + s.delta("lo") + s.finish(RESULT))
    assert [c["choices"] for c in got[:3]] == [  # type: ignore[index]
        [{"text": "Hel", "index": 0, "logprobs": None, "finish_reason": None}],
        [{"text": "lo", "index": 0, "logprobs": None, "finish_reason": None}],
        [{"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}],
    ]
    assert got[3]["object"] == "text_completion" and got[3]["usage"]["total_tokens"] == 7  # type: ignore[index]
    assert got[4] == "[DONE]"


def test_stream_error_frame() -> None:
    s = oa.SseStream("chat", request_id="r", model="m", created=1)
    assert frames(s.error("site lost mid-answer", "server_error", "site_unreachable")) == [
        {"error": {"message": "site lost mid-answer", "type": "server_error", "param": None, "code": "site_unreachable"}}
    ]


def test_models_list() -> None:
    assert json.loads(oa.encode(oa.models_list({"b", "a"}, created=3.9))) == {
        "object": "list",
        "data": [
            {"id": "a", "object": "model", "created": 3, "owned_by": "cpn"},
            {"id": "b", "object": "model", "created": 3, "owned_by": "cpn"},
        ],
    }


@pytest.mark.parametrize(
    ("status", "type_"),
    [(400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
     (404, "invalid_request_error"), (422, "invalid_request_error"), (429, "rate_limit_error"), (503, "server_error")],
)
def test_error_types(status: int, type_: str) -> None:
    assert oa.error_type_for_status(status) == type_


def test_error_for_a_request_error() -> None:
    with pytest.raises(RequestError) as info:
        oa.decode_chat_request(body(CHAT, n=3))
    assert oa.error_for(info.value) == (
        400,
        {"error": {"message": "n: only n=1 is supported (got 3); send separate requests",
                   "type": "invalid_request_error", "param": "n", "code": "unsupported_value"}},
    )
