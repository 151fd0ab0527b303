"""The hot inference routes answered below aiohttp (``controlplane/gateway/hotpath.py``).

Real parts: nats-server on port 0, a hub on a SQLite file with its gateway on port 0, a real agent
(sim backend), and raw sockets speaking HTTP/1.1, so what goes over one connection is the test's
to choose (keep-alive, pipelining, malformed heads, chunked bodies, a client that leaves).

What it proves: a hot request is served below aiohttp (counted in ``HotRoutes.served``) with the
same answer as aiohttp's handler; any other request on the same connection hands it to aiohttp for
good (``handed``) and is answered as before, bytes already read included; a malformed head, a
body over the limit, a chunked body or ``Expect: 100-continue`` get aiohttp's answers; a client
that leaves mid-stream frees the site's slot at once (under aiohttp it stayed taken until the
site's next chunk, seconds later here); a stopping gateway finishes the answer under way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import msgspec
import pytest

from controlplane.gateway import hotpath
from controlplane.gateway.hotpath import HotRoutes
from controlplane.hub import Hub
from controlplane.nats.natsserver import NatsServer
from tests.support.fakehub import agent_config, running
from tests.support.hubrig import hub_config, running_hub
from tests.support.waiting import until

CHAT = b'{"model":"qwen","max_tokens":4,"messages":[{"role":"user","content":"hi"}]}'
MAX_BODY = 4096


def post(path: str, key: str, body: bytes, *extra: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: test", f"Authorization: Bearer {key}",
            "Content-Type: application/json", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def get(path: str, key: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\n\r\n".encode()


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 answer: status, headers (lower-case names), body (de-chunked)."""
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode()
    lines = head.split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    body = b""
    while True:
        size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)).strip(), 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return status, headers, body
        body += chunk[:-2]


HEAD = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
        b"Content-Length: 2\r\n")


@pytest.mark.parametrize("extra, served", [
    (b"", True),
    (b"Connection: keep-alive\r\n", True),
    (b"Connection: close\r\n", True),
    (b"X-Long: " + b"v" * 2000 + b"\r\n", True),
    (b"no colon\r\n", False),
    (b"Bad Name: x\r\n", False),
    (b"Name : x\r\n", False),
    (b"Trailing: blank \r\n", False),
    (b"Folded: a\r\n b\r\n", False),
    (b"Ctl: a\x01b\r\n", False),
    (b"Content-Length: 2\r\n", False),  # two lengths
    (b"Transfer-Encoding: chunked\r\n", False),
    (b"Expect: 100-continue\r\n", False),
    (b"Upgrade: h2c\r\nConnection: upgrade\r\n", False),
    (b"Connection: upgrade\r\n", False),
])
def test_only_a_plainly_well_formed_head_is_served_here(extra: bytes, served: bool) -> None:
    lines = {b"POST /v1/chat/completions HTTP/1.1": cast(Any, "chat")}
    head = hotpath.parse(HEAD + extra + b"\r\n{}", lines, MAX_BODY)
    assert isinstance(head, hotpath.Head) == served, head
    if served:
        assert isinstance(head, hotpath.Head) and head.length == 2 and head.headers["Authorization"] == "Bearer k"
        assert head.close == (b"close" in extra)


@pytest.mark.parametrize("buf, expect", [
    (HEAD, hotpath.INCOMPLETE),  # the head's end still to come
    (b"POST /v1/chat/comp", hotpath.INCOMPLETE),
    (b"GET /v1/jobs HTTP/1.1\r\nHost", None),  # another route: aiohttp's at once
    (b"POST /v1/chat/completions?x=1 HTTP/1.1\r\n\r\n", None),
    (b"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}", None),
    (b"POST /v1/chat/completions HTTP/1.1\nHost: x\n\n", None),  # bare line feeds
    (HEAD.replace(b"Content-Length: 2", b"Content-Length: 99999") + b"\r\n", None),  # over the limit
    (HEAD.replace(b"Content-Length: 2", b"Content-Length: -2") + b"\r\n", None),
    (HEAD + b"X: " + b"v" * hotpath.MAX_HEAD_BYTES, None),  # a head too long
])
def test_heads_not_served_here_or_not_complete(buf: bytes, expect: object) -> None:
    lines = {b"POST /v1/chat/completions HTTP/1.1": cast(Any, "chat")}
    assert hotpath.parse(buf, lines, MAX_BODY) == expect


def test_an_answer_head_never_carries_a_line_break_from_a_value() -> None:
    head = hotpath.head_bytes(200, {"X-CPN-Site": "sh-edge"}, 2, True)
    assert head.startswith(b"HTTP/1.1 200 OK\r\nX-CPN-Site: sh-edge\r\nContent-Length: 2\r\n")
    assert head.endswith(b"Connection: close\r\n\r\n")
    with pytest.raises(ValueError):
        hotpath.head_bytes(200, {"X-CPN-Site": "a\r\nSet-Cookie: x"}, 2, False)


def hot_of(hub: Hub) -> HotRoutes:
    hot = hub.gateway.guard.hot  # type: ignore[union-attr]
    assert isinstance(hot, HotRoutes)
    return hot


@pytest.fixture
async def rig(tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[tuple[Hub, str, Any]]:
    config = hub_config(tmp_path / "hub", nats_server.url, max_body_bytes=MAX_BODY)
    (tmp_path / "hub").mkdir()
    async with running_hub(config) as hub:
        key = hub.create_tenant("acme", default_origin="shanghai")
        cfg = agent_config(nats_server.url, site="sh-edge", data_dir=str(tmp_path / "agent"),
                           backend={"sim": {"ttft_ms": 0.0, "per_token_ms": 0.0, "slots": 2}})
        async with running(cfg) as agent:
            await until(lambda: (v := hub.registry.get("sh-edge")) is not None and v.routable, 10, "the site routable")
            yield hub, key, agent


async def connect(hub: Hub) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", hub.http_port)


async def test_a_keep_alive_connection_serves_an_inference_here_then_hands_a_jobs_request_to_aiohttp(
        rig: tuple[Hub, str, Any]) -> None:
    hub, key, _ = rig
    hot = hot_of(hub)
    reader, writer = await connect(hub)
    try:
        writer.write(post("/v1/chat/completions", key, CHAT))
        status, headers, body = await read_answer(reader)
        assert status == 200, body
        assert headers["x-cpn-site"] == "sh-edge" and headers["content-type"] == "application/json"
        assert headers["x-request-id"] and "x-cpn-rtt-ms" in headers and "date" in headers
        answer = msgspec.json.decode(body)
        assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"]
        assert (hot.served, hot.handed) == (1, 0)
        writer.write(get("/v1/jobs", key))  # same connection: handed to aiohttp, answered as before
        status, _, body = await read_answer(reader)
        assert status == 200, body
        assert msgspec.json.decode(body) == {"object": "list", "data": []}
        assert hot.handed == 1
        writer.write(post("/v1/chat/completions", key, CHAT))  # aiohttp's for good now: still answered
        status, headers, _ = await read_answer(reader)
        assert status == 200 and headers["x-cpn-site"] == "sh-edge"
        assert (hot.served, hot.handed) == (1, 1)
    finally:
        writer.close()

    # Pipelined: two inferences and a jobs request in one write, answered in order.
    reader, writer = await connect(hub)
    try:
        writer.write(post("/v1/chat/completions", key, CHAT) + post("/v1/completions", key,
                     b'{"model":"qwen","prompt":"hi","max_tokens":2}') + get("/v1/jobs", key))
        kinds = []
        for _ in range(3):
            status, _, body = await read_answer(reader)
            assert status == 200, body
            kinds.append(msgspec.json.decode(body)["object"])
        assert kinds == ["chat.completion", "text_completion", "list"]
        assert (hot.served, hot.handed) == (3, 2)
    finally:
        writer.close()


async def test_errors_on_the_hot_path_have_the_handlers_shape(rig: tuple[Hub, str, Any]) -> None:
    hub, key, _ = rig
    hot = hot_of(hub)
    reader, writer = await connect(hub)
    try:
        writer.write(post("/v1/chat/completions", "nope", CHAT))
        status, headers, body = await read_answer(reader)
        assert status == 401 and headers["content-type"] == "application/json"
        assert msgspec.json.decode(body)["error"]["type"] == "authentication_error"
        writer.write(post("/v1/chat/completions", key, b'{"model":"qwen","messages":[],"bogus":1}'))
        status, _, body = await read_answer(reader)
        assert status in (400, 422) and msgspec.json.decode(body)["error"]["param"]
        writer.write(post("/v1/chat/completions", key, CHAT, "X-CPN-Budget-Ms: lots"))
        status, _, body = await read_answer(reader)
        assert status == 400 and msgspec.json.decode(body)["error"]["param"] == "X-CPN-Budget-Ms"
        assert (hot.served, hot.handed) == (3, 0)
    finally:
        writer.close()


async def test_a_malformed_head_after_a_hot_request_gets_aiohttps_400(rig: tuple[Hub, str, Any]) -> None:
    hub, key, _ = rig
    hot = hot_of(hub)
    reader, writer = await connect(hub)
    try:
        writer.write(post("/v1/chat/completions", key, CHAT))
        assert (await read_answer(reader))[0] == 200
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nno colon here\r\nContent-Length: 2\r\n\r\n{}")
        status, _, _ = await read_answer(reader)
        assert status == 400
        assert (hot.served, hot.handed) == (1, 1)
    finally:
        writer.close()


@pytest.mark.parametrize("how", ["too_large", "chunked", "expect_continue", "body_in_pieces"])
async def test_bodies_the_hot_path_does_not_take_are_aiohttps(rig: tuple[Hub, str, Any], how: str) -> None:
    hub, key, _ = rig
    hot = hot_of(hub)
    reader, writer = await connect(hub)
    try:
        if how == "too_large":
            writer.write(post("/v1/chat/completions", key, b"x" * (MAX_BODY + 1)))
        elif how == "chunked":
            head = post("/v1/chat/completions", key, b"").replace(b"Content-Length: 0", b"Transfer-Encoding: chunked")
            writer.write(head + b"%x\r\n%b\r\n0\r\n\r\n" % (len(CHAT), CHAT))
        elif how == "expect_continue":
            writer.write(post("/v1/chat/completions", key, b"", "Expect: 100-continue").replace(
                b"Content-Length: 0", f"Content-Length: {len(CHAT)}".encode()))
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 100")
            writer.write(CHAT)
        else:  # the head first, the body in a later write: aiohttp reads the rest (its body timeout)
            whole = post("/v1/chat/completions", key, CHAT)
            writer.write(whole[:-10])
            await writer.drain()
            await until(lambda: hot.handed == 1, 5, "the connection handed over")
            writer.write(whole[-10:])
        status, headers, body = await read_answer(reader)
        if how == "too_large":
            assert status == 413
            assert msgspec.json.decode(body)["error"]["code"] == "body_too_large"
        else:
            assert status == 200, body
            assert headers["x-cpn-site"] == "sh-edge"
        assert (hot.served, hot.handed) == (0, 1)
    finally:
        writer.close()


async def test_a_client_gone_mid_stream_frees_the_sites_slot_at_once(tmp_path: Path, nats_server: NatsServer) -> None:
    (tmp_path / "hub").mkdir()
    async with running_hub(hub_config(tmp_path / "hub", nats_server.url)) as hub:
        key = hub.create_tenant("acme", default_origin="shanghai")
        # A token every 5 s: under aiohttp the relay noticed the client gone only at its next write.
        cfg = agent_config(nats_server.url, site="sh-edge", data_dir=str(tmp_path / "agent"),
                           backend={"sim": {"ttft_ms": 0.0, "per_token_ms": 5000.0, "slots": 2}})
        async with running(cfg) as agent:
            await until(lambda: (v := hub.registry.get("sh-edge")) is not None and v.routable, 10, "the site routable")
            reader, writer = await connect(hub)
            body = b'{"model":"qwen","stream":true,"max_tokens":50,"messages":[{"role":"user","content":"hi"}]}'
            writer.write(post("/v1/chat/completions", key, body))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower()
            await asyncio.wait_for(reader.readuntil(b"data:"), 10)  # the first frame is here
            assert agent.inventory.inflight() == 1
            writer.close()
            gone = time.monotonic()
            await until(lambda: agent.inventory.inflight() == 0, 10, "the site's slot freed")
            assert time.monotonic() - gone < 2.5  # not at the site's next token (5 s)
            assert hot_of(hub).served == 1


async def test_a_stopping_gateway_finishes_the_answer_under_way(tmp_path: Path, nats_server: NatsServer) -> None:
    (tmp_path / "hub").mkdir()
    hub_cm = running_hub(hub_config(tmp_path / "hub", nats_server.url))
    hub = await hub_cm.__aenter__()
    try:
        key = hub.create_tenant("acme", default_origin="shanghai")
        cfg = agent_config(nats_server.url, site="sh-edge", data_dir=str(tmp_path / "agent"),
                           backend={"sim": {"ttft_ms": 500.0, "per_token_ms": 0.0, "slots": 2}})
        async with running(cfg) as agent:
            await until(lambda: (v := hub.registry.get("sh-edge")) is not None and v.routable, 10, "the site routable")
            busy_r, busy_w = await connect(hub)
            idle_r, idle_w = await connect(hub)
            busy_w.write(post("/v1/chat/completions", key, CHAT))
            await until(lambda: agent.inventory.inflight() == 1, 5, "the request at the site")
            assert hub.gateway is not None
            stopping = asyncio.create_task(hub.gateway.stop())
            status, _, body = await read_answer(busy_r)
            assert status == 200, body
            assert await asyncio.wait_for(busy_r.read(), 5) == b""  # then closed
            assert await asyncio.wait_for(idle_r.read(), 5) == b""  # an idle one closed at once
            await asyncio.wait_for(stopping, 10)
            hub.gateway = None
            busy_w.close()
            idle_w.close()
    finally:
        await hub_cm.__aexit__(None, None, None)


async def test_the_keep_alive_timeout_and_header_deadline_hold_on_hot_connections(
        tmp_path: Path, nats_server: NatsServer) -> None:
    (tmp_path / "hub").mkdir()
    config = hub_config(tmp_path / "hub", nats_server.url, keepalive_timeout_s=1.0, header_timeout_s=1.0)
    async with running_hub(config) as hub:
        key = hub.create_tenant("acme", default_origin="shanghai")
        cfg = agent_config(nats_server.url, site="sh-edge", data_dir=str(tmp_path / "agent"))
        async with running(cfg):
            await until(lambda: (v := hub.registry.get("sh-edge")) is not None and v.routable, 10, "the site routable")
            idle_r, idle_w = await connect(hub)
            slow_r, slow_w = await connect(hub)
            for w in (idle_w, slow_w):
                w.write(post("/v1/chat/completions", key, CHAT))
            assert (await read_answer(idle_r))[0] == 200
            assert (await read_answer(slow_r))[0] == 200
            slow_w.write(post("/v1/chat/completions", key, CHAT)[:20])  # a next head, never finished
            started = time.monotonic()
            assert await asyncio.wait_for(idle_r.read(), 5) == b""  # idle: closed at the keep-alive timeout
            assert 0.5 < time.monotonic() - started < 3
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                data = await asyncio.wait_for(slow_r.read(), 5)  # aborted at the header deadline
                if data == b"":
                    raise asyncio.IncompleteReadError(b"", None)
            assert hub.gateway is not None and hub.gateway.guard.slow_aborted == 1  # type: ignore[attr-defined]
            assert hot_of(hub).handed == 0
            idle_w.close()
            slow_w.close()
