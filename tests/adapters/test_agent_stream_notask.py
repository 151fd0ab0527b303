"""A streamed request to an ``openai-http`` backend is served with no asyncio task
(``edge_agent/stream_now.py``): the NATS callback sends it on an idle kept-alive connection, the
connection's callbacks publish each piece as it comes and the answer at the end. What the task's
way promised still holds (chunks in order, the first with the site's time, usage, the first chunk
standing for the acknowledgement, cancellation, deadline, errors, a broken link told to the hub);
each test also proves that no task served the stream."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from controlplane.nats.natsserver import NatsServer
from edge_agent import wire
from tests.adapters.test_agent_notask import _chat, _config, infer_tasks
from tests.support.fakehub import FakeHub, running, wait_for
from tests.support.localllm import LocalServer, local_llm  # noqa: F401  (fixture)
from tests.support.waiting import until

Reply = wire.InferChunk | wire.InferResult | wire.ErrorReply | wire.InferAccepted


@asynccontextmanager
async def warmed(nats_url: str, llm: LocalServer) -> AsyncIterator[tuple[FakeHub, Any]]:
    """A hub and an agent whose backend holds one kept-alive connection (opened by a first request,
    served the usual way)."""
    async with FakeHub(nats_url) as hub, running(_config(nats_url, llm.url)) as agent:
        assert isinstance(await hub.infer("edge-a", _chat("w0")), wire.InferResult)
        yield hub, agent


@asynccontextmanager
async def replies(hub: FakeHub, request: wire.InferRequest) -> AsyncIterator[asyncio.Queue[Reply]]:
    """Send ``request``; its replies arrive on the queue as they come."""
    nc = hub._client()
    inbox = nc.new_inbox()
    queue: asyncio.Queue[Reply] = asyncio.Queue()

    async def collect(msg: Any) -> None:
        queue.put_nowait(wire.infer_reply_decoder.decode(msg.data))

    sub = await nc.subscribe(inbox, cb=collect)
    try:
        await nc.publish(wire.infer_subject("edge-a"), wire.encode(request), reply=inbox)
        yield queue
    finally:
        await sub.unsubscribe()


async def test_a_stream_is_relayed_piece_by_piece_with_no_task(nats_server: NatsServer,
                                                              local_llm: LocalServer) -> None:  # noqa: F811
    async with warmed(nats_server.url, local_llm) as (hub, agent):
        with infer_tasks() as tasks:
            got = await hub.infer_stream("edge-a", _chat("s1", "one two three", stream=True, ack=True,
                                                         ack_after_ms=50.0))
        assert tasks == []
        msgs = [m for _, m in got]
        chunks = [m for m in msgs if isinstance(m, wire.InferChunk)]
        assert [c.index for c in chunks] == [0, 1, 2] and [c.text for c in chunks] == ["one!", " two!", " three!"]
        assert chunks[0].site_ms is not None and chunks[0].site_ms >= 0 and chunks[1].site_ms is None
        assert not any(isinstance(m, wire.InferAccepted) for m in msgs)  # the first chunk stood for it
        end = msgs[-1]
        assert isinstance(end, wire.InferResult) and end.output == "one! two! three!" and end.tail == ""
        assert end.prompt_tokens == 11 and end.completion_tokens == 3 and end.finish_reason == "length"
        assert agent.inventory.inflight() == 0 and agent.counters["infer_ok"] == 2
        assert agent.backend._pool.opened == 1  # type: ignore[attr-defined]  # the same connection, kept

        # A slow first chunk: acknowledged at its time, then the chunks.
        local_llm.delay_s = 0.2
        with infer_tasks() as tasks:
            slow = await hub.infer_stream("edge-a", _chat("s2", "four five", stream=True, ack=True, ack_after_ms=50.0))
        assert tasks == []
        assert [type(m) for _, m in slow] == [wire.InferAccepted, wire.InferChunk, wire.InferChunk, wire.InferResult]
        assert agent.backend._pool.opened == 1  # type: ignore[attr-defined]


async def test_a_stream_served_with_no_task_is_cancelled_mid_answer(nats_server: NatsServer,
                                                                    local_llm: LocalServer) -> None:  # noqa: F811
    async with warmed(nats_server.url, local_llm) as (hub, agent):
        with infer_tasks() as tasks:
            long = _chat("long", " ".join(f"w{i}" for i in range(60)), stream=True, max_tokens=60)
            async with replies(hub, long) as queue:
                first = await asyncio.wait_for(queue.get(), 5)
                assert isinstance(first, wire.InferChunk) and first.index == 0
                ack = await hub.command("edge-a", wire.CancelInfer(request_id="long"))
                assert isinstance(ack, wire.Ack) and ack.detail == "cancelled"
                while isinstance(msg := await asyncio.wait_for(queue.get(), 5), wire.InferChunk):
                    pass
                assert isinstance(msg, wire.ErrorReply) and msg.code == "cancelled"
        assert tasks == []
        assert agent.inventory.inflight() == 0 and agent.counters["infer_cancelled"] == 1
        # The agent stops mid-stream: answered shutting_down (retryable). (The cancelled call's
        # connection was closed: a plain request opens another first.)
        assert isinstance(await hub.infer("edge-a", _chat("w1")), wire.InferResult)
        with infer_tasks() as tasks:
            async with replies(hub, _chat("cut", " ".join(f"w{i}" for i in range(60)), stream=True,
                                          max_tokens=60)) as queue:
                assert isinstance(await asyncio.wait_for(queue.get(), 5), wire.InferChunk)
                await agent.stop()
                while isinstance(msg := await asyncio.wait_for(queue.get(), 5), wire.InferChunk):
                    pass
                assert isinstance(msg, wire.ErrorReply) and msg.code == "shutting_down" and msg.retryable
        assert tasks == []


async def test_a_stream_past_its_deadline_or_refused_by_the_server_ends_in_an_error(
        nats_server: NatsServer, local_llm: LocalServer) -> None:  # noqa: F811
    async with warmed(nats_server.url, local_llm) as (hub, agent):
        with infer_tasks() as tasks:
            got = await hub.infer_stream("edge-a", _chat("late", " ".join(f"w{i}" for i in range(60)), stream=True,
                                                         max_tokens=60, deadline_ms=200.0))
        assert tasks == []
        *chunks, end = [m for _, m in got]
        assert chunks and all(isinstance(c, wire.InferChunk) for c in chunks)
        assert isinstance(end, wire.ErrorReply) and end.code == "timeout" and "0.2 s" in end.message
        assert agent.inventory.inflight() == 0 and agent.counters["infer_errors"] == 1

        assert isinstance(await hub.infer("edge-a", _chat("w1")), wire.InferResult)  # a kept-alive connection again
        local_llm.fail_status = 503
        with infer_tasks() as tasks:
            refused = await hub.infer_stream("edge-a", _chat("r", stream=True))
        assert tasks == []
        (_, error), = refused
        assert isinstance(error, wire.ErrorReply) and error.code == "backend_error" and error.retryable
        assert "503" in error.message and local_llm.url.split("//")[1] not in error.message
        await until(lambda: agent.inventory.inflight() == 0)


async def test_a_chunk_the_link_cannot_take_ends_the_stream_and_the_hub_is_told(
        nats_server: NatsServer, local_llm: LocalServer) -> None:  # noqa: F811
    async with warmed(nats_server.url, local_llm) as (hub, agent):
        bus = agent.inference.bus
        publish_nowait = bus.publish_nowait
        refused: list[bytes] = []

        def link_down_after_one(subject: str, data: bytes) -> bool:
            if wire.infer_reply_decoder.decode(data).__class__ is wire.InferChunk and b'"index":1' in data:
                refused.append(data)
                return False  # the link went down (nats-py reconnecting)
            return publish_nowait(subject, data)

        bus.publish_nowait = link_down_after_one
        try:
            with infer_tasks() as tasks:
                got = await hub.infer_stream("edge-a", _chat("b", "one two three", stream=True))
        finally:
            bus.publish_nowait = publish_nowait
        assert tasks == []
        msgs = [m for _, m in got]
        assert isinstance(msgs[0], wire.InferChunk) and msgs[0].index == 0
        assert isinstance(msgs[-1], wire.ErrorReply) and msgs[-1].code == "stream_broken" and len(msgs) == 2
        assert len(refused) == 1 and agent.counters["reply_failures"] == 1
        await wait_for(lambda: agent.counters.get("streams_broken_told") == 1, 3, "the telling to be counted")
        assert agent.inventory.inflight() == 0
        # The call was given up (its connection closed, not kept): the next request opens another.
        assert isinstance(await hub.infer("edge-a", _chat("after")), wire.InferResult)
        assert agent.backend._pool.opened == 2  # type: ignore[attr-defined]


async def test_a_stream_that_comes_whole_goes_as_its_result(nats_server: NatsServer) -> None:
    # A server that writes the whole stream at once (a short answer): with ``tail_ok`` its text
    # rides in the result (one message); without, one chunk then the result. An unreadable one is
    # a backend_error naming nothing of the server.
    events = [{"choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]} for w in ("a", " b")]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 5, "completion_tokens": 2}})
    sse = b"".join(b"data: %s\n\n" % json.dumps(e).encode() for e in events) + b"data: [DONE]\n\n"
    whole = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n%s" % (len(sse), sse)
    garbled = b"data: {not json\n\n"
    bad = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n%s" % (len(garbled), garbled)

    plain = b'{"choices":[{"message":{"content":"ok"}}]}'
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(plain), plain)

    go = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length"))
            body = await reader.readexactly(length)
            if b"split" in body:  # a good first piece, then (once the hub has it) an unreadable one
                first = b"data: %s\n\n" % json.dumps(events[0]).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(first), first))
                await go.wait()
                writer.write(b"%x\r\n%s\r\n" % (len(garbled), garbled))
                continue
            writer.write(answer if b'"stream":true' not in body else bad if b"garble" in body else whole)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with FakeHub(nats_server.url) as hub, running(_config(nats_server.url, url)) as agent:
            assert isinstance(await hub.infer("edge-a", _chat("w")), wire.InferResult)
            with infer_tasks() as tasks:
                tailed = [m for _, m in await hub.infer_stream("edge-a", _chat("t", stream=True, tail_ok=True))]
                plain = [m for _, m in await hub.infer_stream("edge-a", _chat("p", stream=True))]
            assert tasks == []
            (result,) = tailed
            assert isinstance(result, wire.InferResult) and result.tail == "a b" and result.output == "a b"
            assert result.prompt_tokens == 5 and result.completion_tokens == 2 and result.finish_reason == "stop"
            chunk, end = plain
            assert isinstance(chunk, wire.InferChunk) and chunk.text == "a b" and chunk.index == 0
            assert chunk.site_ms is not None
            assert isinstance(end, wire.InferResult) and end.tail == "" and end.output == "a b"
            assert agent.backend._pool.opened == 1  # type: ignore[attr-defined]
            with infer_tasks() as tasks:
                (_, unreadable), = await hub.infer_stream("edge-a", _chat("g", "garble", stream=True))
            assert tasks == []
            assert isinstance(unreadable, wire.ErrorReply) and unreadable.code == "backend_error"
            assert "unreadable" in unreadable.message and "127.0.0.1" not in unreadable.message
            assert agent.inventory.inflight() == 0
            assert isinstance(await hub.infer("edge-a", _chat("w2")), wire.InferResult)  # a connection again
            with infer_tasks() as tasks:
                async with replies(hub, _chat("m", "split", stream=True)) as queue:
                    first = await asyncio.wait_for(queue.get(), 5)
                    assert isinstance(first, wire.InferChunk) and first.text == "a"
                    go.set()
                    broken = await asyncio.wait_for(queue.get(), 5)
            assert tasks == []
            assert isinstance(broken, wire.ErrorReply) and broken.code == "backend_error"
            assert "unreadable" in broken.message
            await until(lambda: agent.inventory.inflight() == 0)
    finally:
        server.close()
        await server.wait_closed()


async def test_a_finished_or_cancelled_stream_leaves_no_cycle_for_the_collector(
        nats_server: NatsServer, local_llm: LocalServer) -> None:  # noqa: F811
    # The call holds its exchange's callbacks and the exchange holds the call: once the stream is
    # over the call lets go, so both go at once by reference counting. Left to the cyclic collector
    # they were half a dozen objects a stream, and its passes cost CPU and stalled the loop.
    from edge_agent.backends.openai_http import StreamCall
    from edge_agent.stream_now import StreamExchange

    def alive() -> int:
        return sum(isinstance(o, (StreamCall, StreamExchange)) for o in gc.get_objects())

    async with warmed(nats_server.url, local_llm) as (hub, agent):
        gc.collect()
        gc.disable()  # what a cycle would keep stays visible
        try:
            with infer_tasks() as tasks:
                for i in range(3):
                    got = await hub.infer_stream("edge-a", _chat(f"s{i}", "one two", stream=True))
                    assert isinstance(got[-1][1], wire.InferResult)
                async with replies(hub, _chat("long", " ".join(f"w{i}" for i in range(60)), stream=True,
                                              max_tokens=60)) as queue:
                    assert isinstance(await asyncio.wait_for(queue.get(), 5), wire.InferChunk)
                    ack = await hub.command("edge-a", wire.CancelInfer(request_id="long"))
                    assert isinstance(ack, wire.Ack) and ack.detail == "cancelled"
                    while isinstance(await asyncio.wait_for(queue.get(), 5), wire.InferChunk):
                        pass
            assert tasks == [] and agent.inventory.inflight() == 0
            assert alive() == 0
        finally:
            gc.enable()
