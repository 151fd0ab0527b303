"""The ``openai-http`` backend against a small OpenAI-compatible aiohttp server on port 0,
both directly and through an agent on a real nats-server."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.nats.natsserver import NatsServer
from edge_agent import wire
from edge_agent.backends.openai_http import OpenAIHttpBackend
from edge_agent.config import OpenAIHttpConfig
from edge_agent.errors import BackendError
from tests.support.fakehub import FakeHub, agent_config, running, wait_for
from tests.support.waiting import until
from tests.support.localllm import LocalServer, local_llm  # noqa: F401  (the fixture)


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


def _no_address(text: str, url: str) -> None:
    host_port = url.split("://", 1)[1]
    assert host_port not in text and "127.0.0.1" not in text and "localhost" not in text, text


async def test_http_errors_and_timeouts_become_clear_backend_errors(local_llm: LocalServer) -> None:
    # Code and message go to the hub (and may reach a tenant): the status at most, never the
    # server's address or its own text; both stay in ``detail`` for the site's log.
    backend = OpenAIHttpBackend(OpenAIHttpConfig(url=local_llm.url, timeout_s=0.2))
    req = wire.InferRequest(request_id="e", model="m", prompt="x")
    try:
        local_llm.fail_status = 500
        with pytest.raises(BackendError) as err:
            await backend.generate(req, None)
        assert err.value.code == "backend_error" and err.value.retryable and "HTTP 500" in err.value.message
        assert "CUDA out of memory" not in err.value.message and "CUDA out of memory" in err.value.detail
        assert local_llm.url in err.value.detail
        _no_address(str(err.value), local_llm.url)
        local_llm.fail_status = 400
        with pytest.raises(BackendError) as err:
            await backend.generate(req, None)
        assert err.value.code == "backend_error" and not err.value.retryable
        local_llm.fail_status, local_llm.delay_s = 0, 1.0
        with pytest.raises(BackendError) as err:
            await backend.generate(req, None)
        assert err.value.code == "timeout" and err.value.retryable
        _no_address(str(err.value), local_llm.url)
    finally:
        await backend.close()
    refused = OpenAIHttpBackend(OpenAIHttpConfig(url="http://127.0.0.1:9"))
    try:
        with pytest.raises(BackendError) as err:
            await refused.generate(req, None)
        assert err.value.code == "backend_unavailable" and err.value.retryable
        _no_address(str(err.value), "http://127.0.0.1:9")
        assert "127.0.0.1:9" in err.value.detail
    finally:
        await refused.close()


async def test_probe_says_whether_the_server_answers(local_llm: LocalServer) -> None:
    backend = OpenAIHttpBackend(OpenAIHttpConfig(url=local_llm.url, probe_timeout_s=0.5))
    try:
        assert await backend.probe() == "" and local_llm.probes == 1
        await local_llm.stop()
        down = await backend.probe()
        assert down and local_llm.url in down  # the detail is for the site's log
        await local_llm.start()
        assert await backend.probe() == ""
        local_llm.fail_status = 0
        slow = OpenAIHttpBackend(OpenAIHttpConfig(url=local_llm.url, probe_path="/nowhere"))
        try:
            assert "HTTP 404" in await slow.probe()
        finally:
            await slow.close()
    finally:
        await backend.close()


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
            assert isinstance(err, wire.ErrorReply) and err.code == "backend_error" and err.retryable
            assert "CUDA" not in err.message and str(local_llm.port) not in err.message
            assert agent.counters["infer_errors"] == 1
            await asyncio.wait_for(agent.registered.wait(), 5)
            assert hub.registrations_of("edge-a")[-1].backends == ["openai-http"]


def _states(hb: wire.Heartbeat) -> list[str]:
    return [m.state for m in hb.models]


async def test_a_dead_local_server_makes_the_replica_not_ready_until_it_answers(
        nats_server: NatsServer, local_llm: LocalServer) -> None:
    cfg = agent_config(nats_server.url, backend={"kind": "openai-http", "openai-http": {
        "url": local_llm.url, "probe_s": 0.2, "probe_timeout_s": 0.5}})
    async with FakeHub(nats_server.url, heartbeat_s=0.1) as hub:
        async with running(cfg) as agent:
            await hub.wait_heartbeat("edge-a", lambda hb: _states(hb) == ["ready"], what="the replica ready")
            assert local_llm.probes >= 1

            await local_llm.stop()
            loop = asyncio.get_running_loop()
            stopped = loop.time()
            await hub.wait_heartbeat("edge-a", lambda hb: _states(hb) == ["loading"], timeout_s=3,
                                     what="the replica reported not ready")
            took = loop.time() - stopped
            assert took < 0.2 + 0.5 + 0.5, f"noticed after {took:.2f} s"  # a probe interval and its timeout, plus a beat
            err = await hub.infer("edge-a", wire.InferRequest(request_id="d1", model="qwen", prompt="x"))
            assert isinstance(err, wire.ErrorReply) and err.code == "backend_unavailable" and err.retryable
            assert "127.0.0.1" not in err.message and str(local_llm.port) not in err.message
            assert agent.counters["backend_unavailable"] == 1 and agent.health.downs == 1

            await local_llm.start()  # the same port: the server came back
            await hub.wait_heartbeat("edge-a", lambda hb: _states(hb) == ["ready"], timeout_s=3,
                                     what="the replica ready again")
            ok = await hub.infer("edge-a", wire.InferRequest(request_id="d2", model="qwen", prompt="back again"))
            assert isinstance(ok, wire.InferResult) and ok.output == "back! again!"


async def test_a_request_that_cannot_connect_marks_the_backend_down_at_once(
        nats_server: NatsServer, local_llm: LocalServer) -> None:
    # Probes every 60 s: only the failed request can have told the agent.
    cfg = agent_config(nats_server.url, backend={"kind": "openai-http", "openai-http": {
        "url": local_llm.url, "probe_s": 60}})
    async with FakeHub(nats_server.url, heartbeat_s=0.1) as hub:
        async with running(cfg) as agent:
            await hub.wait_heartbeat("edge-a", lambda hb: _states(hb) == ["ready"], what="the replica ready")
            await wait_for(lambda: agent.health.probes == 1, 5, "the first probe")
            await local_llm.stop()
            err = await hub.infer("edge-a", wire.InferRequest(request_id="c1", model="qwen", prompt="x"))
            assert isinstance(err, wire.ErrorReply) and err.code == "backend_unavailable"
            assert "127.0.0.1" not in err.message and str(local_llm.port) not in err.message
            await hub.wait_heartbeat("edge-a", lambda hb: _states(hb) == ["loading"], timeout_s=1,
                                     what="the replica reported not ready")
            assert agent.health.probes == 1
            await local_llm.start()
            assert await agent.health.check()  # the next probe finds it again
            await hub.wait_heartbeat("edge-a", lambda hb: _states(hb) == ["ready"], timeout_s=1,
                                     what="the replica ready again")


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One HTTP/1.1 request as the raw servers below read it: its head and its body (by Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length")), 0)
    return head, await reader.readexactly(length)


async def test_deltas_that_arrive_together_go_on_as_one_and_connections_are_kept_alive() -> None:
    # A raw HTTP/1.1 server: the whole stream in one chunked write, then (next request) a stream
    # split in the middle of a line; plain answers with Content-Length. One connection for all.
    frames = b"".join(b'data: {"choices":[{"delta":{"content":"%s"}}]}\n\n' % w for w in (b"a", b"b", b"c"))
    frames += b'data: {"choices":[{"delta":{},"finish_reason":"length"}],"usage":{"completion_tokens":3}}\n\ndata: [DONE]\n\n'
    plain = b'{"choices":[{"message":{"content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1}}'
    connections = 0
    finished = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        n = 0
        while True:
            try:
                _, body = await read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):  # the client closed its connection
                writer.close()
                await writer.wait_closed()
                finished.set()
                return
            n += 1
            if b'"stream":true' not in body:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(plain), plain))
            elif n % 2 == 1:
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(frames), frames))
            else:
                cut = frames.index(b"\n\n") + 12  # after the first frame, inside the second
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (cut, frames[:cut]))
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(frames) - cut, frames[cut:]))
            await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    backend = OpenAIHttpBackend(OpenAIHttpConfig(url=f"http://127.0.0.1:{port}"))
    seen: list[str] = []

    async def on_text(text: str) -> None:
        seen.append(text)

    req = wire.InferRequest(request_id="t", model="m", stream=True, messages=[wire.ChatMessage(role="user", content="x")])
    try:
        done = await backend.generate(req, on_text)
        assert seen == ["abc"] and done.output == "abc" and done.finish_reason == "length" and done.completion_tokens == 3
        seen.clear()
        split = await backend.generate(req, on_text)
        assert seen == ["a", "bc"] and split.output == "abc"  # the line cut in two is read whole
        assert done.tail == split.tail == ""  # not asked for: every piece went as a chunk
        # With tail_ok, the text that came together with the end rides in the result instead.
        seen.clear()
        tailed = wire.InferRequest(request_id="t2", model="m", stream=True, tail_ok=True, messages=req.messages)
        whole = await backend.generate(tailed, on_text)
        assert seen == [] and whole.tail == "abc" and whole.output == "abc"
        split = await backend.generate(tailed, on_text)
        assert seen == ["a"] and split.tail == "bc" and split.output == "abc"
        for i in range(3):
            answer = await backend.generate(wire.InferRequest(request_id=f"p{i}", model="m", messages=req.messages), None)
            assert answer.output == "hi" and answer.prompt_tokens == 1
        assert connections == 1  # kept alive and reused (seven requests)
    finally:
        await backend.close()
        await asyncio.wait_for(finished.wait(), 5)
        server.close()
        await server.wait_closed()


async def test_a_kept_alive_connection_the_server_dropped_is_retried_once_but_a_broken_answer_is_not() -> None:
    # Connection 1 answers one request, then closes when the next arrives without answering it (a
    # server's keep-alive timeout racing the request): that request goes again on a new connection.
    # Connection 2 answers one, then on the next request sends half an answer and closes: that is
    # the server failing mid-answer, reported as unavailable, not sent twice.
    plain = b'{"choices":[{"text":"ok"}]}'
    requests: list[int] = []
    closed: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = max(requests, default=0) + 1
        for n in range(2):
            try:
                await read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            requests.append(conn)
            if n == 0:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(plain), plain))
                await writer.drain()
            elif conn == 2:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"choi")
                await writer.drain()
        writer.close()
        await writer.wait_closed()
        closed.append(conn)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    backend = OpenAIHttpBackend(OpenAIHttpConfig(url=f"http://127.0.0.1:{port}"))
    req = wire.InferRequest(request_id="r", model="m", prompt="x")
    try:
        assert (await backend.generate(req, None)).output == "ok"
        assert (await backend.generate(req, None)).output == "ok"  # retried on a new connection
        assert requests == [1, 1, 2]
        with pytest.raises(BackendError) as err:
            await backend.generate(req, None)
        assert err.value.code == "backend_unavailable" and err.value.retryable
        assert requests == [1, 1, 2, 2]  # not sent again
        await until(lambda: sorted(closed) == [1, 2])
    finally:
        await backend.close()
        server.close()
        await server.wait_closed()


async def test_an_agent_sends_a_stream_that_came_whole_as_one_result_with_its_tail(nats_server: NatsServer) -> None:
    # The local server sends the whole stream in one write (an HTTP chunk per event): asked for
    # tails, the agent answers with one message (the result, its text as the tail); not asked, with
    # a chunk and the result.
    frames = (b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
              b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head, _ = await read_request(reader)
                if head.startswith(b"GET"):  # the agent's probe
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                else:  # one HTTP chunk per event, all in one write (as the benchmarks' mock does)
                    events = [e + b"\n\n" for e in frames.split(b"\n\n") if e]
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):  # the agent closed its connection
            writer.close()
            await writer.wait_closed()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        cfg = agent_config(nats_server.url, backend={"kind": "openai-http", "openai-http": {"url": url, "probe_s": 0}})
        async with FakeHub(nats_server.url) as hub:
            async with running(cfg):
                msgs = [wire.ChatMessage(role="user", content="x")]
                whole = await hub.infer_stream("edge-a", wire.InferRequest(request_id="w1", model="qwen", stream=True,
                                                                           tail_ok=True, messages=msgs))
                assert [type(m).__name__ for _, m in whole] == ["InferResult"]
                assert whole[0][1].tail == "hi" and whole[0][1].output == "hi"  # type: ignore[union-attr]
                plain = await hub.infer_stream("edge-a", wire.InferRequest(request_id="w2", model="qwen", stream=True,
                                                                           messages=msgs))
                assert [type(m).__name__ for _, m in plain] == ["InferChunk", "InferResult"]
                assert plain[-1][1].tail == ""  # type: ignore[union-attr]
    finally:
        server.close()
        await server.wait_closed()


async def test_the_client_reads_interim_answers_bodies_ended_by_close_and_refuses_what_is_not_http() -> None:
    # Answers the parser (llhttp) must read as the old hand-written one did: a 100 Continue before
    # the real head, a body with neither length nor chunks that ends when the server closes (the
    # connection is then not reused), a head that never ends, and bytes that are not HTTP.
    from edge_agent.backends.http1 import BadResponse, Http1Pool

    answers = [
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end",
        b"HTTP/1.1 200 OK\r\n" + b"X-Long: " + b"a" * (70 * 1024),
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    ]
    served: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await read_request(reader)
                n = len(served)
                served.append(n)
                writer.write(answers[n])
                await writer.drain()
                if n >= 1:
                    break  # the answer ends with the connection (or is refused by the client)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    pool = Http1Pool(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        first = await pool.request("POST", "/x", b"{}", timeout_s=5)
        assert first.status == 200 and await first.read() == b"ok"
        second = await pool.request("POST", "/x", b"{}", timeout_s=5)
        assert second.status == 200 and await second.read() == b"until the end"
        assert pool.opened == 1
        for _ in range(2):
            with pytest.raises(BadResponse):
                response = await pool.request("POST", "/x", b"{}", timeout_s=5)
                await response.read()
        assert pool.opened == 3 and served == [0, 1, 2, 3]
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


async def test_a_large_answer_that_comes_with_its_head_in_one_read_is_read_whole() -> None:
    # Only the head is bounded (64 KiB): a body of 256 KiB written together with it is not refused.
    from edge_agent.backends.http1 import Http1Pool

    body = b"x" * (256 * 1024)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    pool = Http1Pool(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        for _ in range(3):
            response = await pool.request("POST", "/x", b"{}", timeout_s=5)
            assert response.status == 200 and await response.read() == body
        assert pool.opened == 1
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


async def test_a_kept_alive_connection_keeps_one_timer_across_requests_and_a_stall_still_times_out() -> None:
    # Each wait for the answer is bounded, but by the connection's one timer, not a timer per wait:
    # five requests on one connection arm it once. A stalled answer still times out on time, both
    # when its bound is earlier than the timer's (re-armed earlier) and when the timer fires first
    # for an earlier wait (re-armed for this one, not fired early).
    from edge_agent.backends.http1 import Http1Pool

    plain = b'{"choices":[{"message":{"content":"hi"}}]}'

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                _, body = await read_request(reader)
                if b"stall" not in body:  # a stalled request is never answered
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(plain), plain))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    pool = Http1Pool(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    loop = asyncio.get_running_loop()
    try:
        timers = []
        for _ in range(5):
            response = await pool.request("POST", "/x", b"{}", timeout_s=30.0)
            assert await response.read() == plain
            timers.append(pool._idle[-1].timer)
        assert pool.opened == 1 and timers[0] is not None and all(t is timers[0] for t in timers)
        started = loop.time()
        with pytest.raises(TimeoutError):  # due before the armed timer: re-armed earlier
            await pool.request("POST", "/x", b'"stall"', timeout_s=0.3)
        assert 0.28 <= loop.time() - started < 5.0
        response = await pool.request("POST", "/x", b"{}", timeout_s=0.4)  # arms the timer at +0.4
        assert await response.read() == plain
        await asyncio.sleep(0.2)
        started = loop.time()
        with pytest.raises(TimeoutError):  # the timer fires while this wait has 0.2 s to go: re-armed
            await pool.request("POST", "/x", b'"stall"', timeout_s=0.4)
        assert 0.38 <= loop.time() - started < 5.0
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


async def test_serving_requests_does_not_look_up_the_running_loop_each_time(
        nats_server: NatsServer, local_llm: LocalServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # On Python 3.11 ``asyncio.get_running_loop()`` costs a getpid system call: the agent's
    # inference path (its task spawner, the service, the HTTP client) keeps the loop instead.
    import sys

    lookups: list[str] = []
    real = asyncio.get_running_loop

    def counting() -> asyncio.AbstractEventLoop:
        module = sys._getframe(1).f_globals.get("__name__", "")
        if module in ("edge_agent.agent", "edge_agent.inference", "edge_agent.backends.http1"):
            lookups.append(module)
        return real()

    cfg = agent_config(nats_server.url, backend={"kind": "openai-http", "openai-http": {"url": local_llm.url}})
    async with FakeHub(nats_server.url) as hub:
        async with running(cfg):
            req = wire.InferRequest(request_id="w0", model="qwen", messages=[wire.ChatMessage(role="user", content="a")])
            assert isinstance(await hub.infer("edge-a", req), wire.InferResult)  # the first one may look
            monkeypatch.setattr(asyncio, "get_running_loop", counting)
            for i in range(5):
                got = await hub.infer("edge-a", wire.InferRequest(request_id=f"w{i + 1}", model="qwen",
                                                                  messages=req.messages))
                assert isinstance(got, wire.InferResult)
            monkeypatch.setattr(asyncio, "get_running_loop", real)
    assert lookups == []
