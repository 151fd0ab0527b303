"""A plain request to an ``openai-http`` backend is served with no asyncio task: the NATS callback
sends it on an idle kept-alive connection and the connection's completion callback answers. What a
task did for it (deadline, acknowledgement, cancellation, retry on a dropped connection, errors,
shutdown, slots) still holds; each test also proves that no task served the request."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from controlplane.nats.natsserver import NatsServer
from edge_agent import wire
from tests.support.fakehub import FakeHub, agent_config, running, wait_for
from tests.support.localllm import LocalServer, local_llm  # noqa: F401  (fixture)
from tests.support.timers import timers_armed
from tests.support.waiting import until


@contextmanager
def infer_tasks() -> Iterator[list[str]]:
    """The request-serving tasks (``InferenceService.handle``) created on this loop meanwhile."""
    loop = asyncio.get_running_loop()
    seen: list[str] = []
    previous = loop.get_task_factory()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        name = getattr(coro, "__qualname__", "")
        if name == "InferenceService.handle":
            seen.append(name)
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(factory)
    try:
        yield seen
    finally:
        loop.set_task_factory(previous)


def _chat(request_id: str, text: str = "red green", **kw: Any) -> wire.InferRequest:
    return wire.InferRequest(request_id=request_id, model="qwen", messages=[wire.ChatMessage(role="user", content=text)],
                             **kw)


def _config(url: str, llm_url: str, **backend: Any) -> Any:
    return agent_config(url, backend={"kind": "openai-http", "openai-http": {"url": llm_url, "probe_s": 0, **backend}})


async def test_plain_requests_on_a_kept_alive_connection_are_served_with_no_task(
        nats_server: NatsServer, local_llm: LocalServer) -> None:  # noqa: F811
    async with FakeHub(nats_server.url) as hub, running(_config(nats_server.url, local_llm.url)) as agent:
        first = await hub.infer("edge-a", _chat("w0"))  # opens the connection (the usual way)
        assert isinstance(first, wire.InferResult)
        with infer_tasks() as tasks:
            for i in range(5):
                got = await hub.infer("edge-a", _chat(f"p{i}", f"w{i} x", ack=True, ack_after_ms=200.0))
                assert isinstance(got, wire.InferResult)
                assert got.output == f"w{i}! x!" and got.completion_tokens == 2 and got.site == "edge-a"
        assert tasks == []
        assert agent.inventory.inflight() == 0 and agent.counters["infer_ok"] == 6
        assert agent.backend._pool.opened == 1  # type: ignore[attr-defined]
        # A stream takes none either (tests/adapters/test_agent_stream_notask.py).
        with infer_tasks() as tasks:
            got_stream = await hub.infer_stream("edge-a", _chat("s", stream=True))
        assert isinstance(got_stream[-1][1], wire.InferResult) and tasks == []


async def test_a_slow_answer_is_acknowledged_then_times_out_at_its_deadline_and_frees_its_slot(
        nats_server: NatsServer, local_llm: LocalServer) -> None:  # noqa: F811
    async with FakeHub(nats_server.url) as hub, running(_config(nats_server.url, local_llm.url)) as agent:
        assert isinstance(await hub.infer("edge-a", _chat("w0")), wire.InferResult)
        local_llm.delay_s = 2.0
        loop = asyncio.get_running_loop()
        with infer_tasks() as tasks:
            sent = loop.time()
            got = await hub.infer_stream("edge-a", _chat("slow", ack=True, ack_after_ms=50.0, deadline_ms=300.0))
        assert tasks == []
        (acked_at, ack), (ended_at, end) = got
        assert isinstance(ack, wire.InferAccepted) and ack.request_id == "slow"
        assert isinstance(end, wire.ErrorReply) and end.code == "timeout" and end.retryable
        assert "0.3 s" in end.message
        assert 0.04 <= acked_at - sent < 0.3 and 0.28 <= ended_at - sent < 1.5
        assert agent.inventory.inflight() == 0 and agent.counters["infer_errors"] == 1
        # An answer faster than the acknowledgement's time goes alone (two messages, not three).
        local_llm.delay_s = 0.0
        assert isinstance(await hub.infer("edge-a", _chat("w1")), wire.InferResult)  # a new connection (the
        # one that timed out was closed: its answer may still come)
        with infer_tasks() as tasks:
            fast = await hub.infer_stream("edge-a", _chat("fast", ack=True, ack_after_ms=500.0))
        assert tasks == [] and [type(m) for _, m in fast] == [wire.InferResult]


async def test_a_request_served_with_no_task_can_be_cancelled_and_is_answered_when_the_agent_stops(
        nats_server: NatsServer, local_llm: LocalServer) -> None:  # noqa: F811
    async with FakeHub(nats_server.url) as hub, running(_config(nats_server.url, local_llm.url)) as agent:
        local_llm.delay_s = 0.2  # two at once: two kept-alive connections
        warm = await asyncio.gather(hub.infer("edge-a", _chat("w0")), hub.infer("edge-a", _chat("w1")))
        assert all(isinstance(got, wire.InferResult) for got in warm)
        assert agent.backend._pool.opened == 2  # type: ignore[attr-defined]
        local_llm.delay_s = 5.0
        with infer_tasks() as tasks:
            doomed = asyncio.create_task(hub.infer("edge-a", _chat("long")))
            await wait_for(lambda: agent.inventory.inflight() == 1, 3, "the request to hold its slot")
            ack = await hub.command("edge-a", wire.CancelInfer(request_id="long"))
            assert isinstance(ack, wire.Ack) and ack.detail == "cancelled"
            got = await doomed
            assert isinstance(got, wire.ErrorReply) and got.code == "cancelled"
            assert agent.inventory.inflight() == 0 and agent.counters["infer_cancelled"] == 1
            stopped = asyncio.create_task(hub.infer("edge-a", _chat("cut")))
            await wait_for(lambda: agent.inventory.inflight() == 1, 3, "the request to hold its slot")
            await agent.stop()
            got = await stopped
            assert isinstance(got, wire.ErrorReply) and got.code == "shutting_down" and got.retryable
        assert tasks == []


async def test_a_connection_the_server_dropped_is_retried_once_and_a_broken_answer_is_an_error(
        nats_server: NatsServer) -> None:
    # Connection 1 answers one request, then closes when the next arrives without answering it: that
    # request is sent again on a new connection. Connection 2 answers one, then sends half an answer
    # and closes: that is the server failing mid-answer, answered as unavailable and not sent twice.
    plain = b'{"choices":[{"message":{"content":"ok"}}]}'
    requests: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = max(requests, default=0) + 1
        for n in range(2):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length"))
            await reader.readexactly(length)
            requests.append(conn)
            if n == 0:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(plain), plain))
            elif conn == 2:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"choi")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with FakeHub(nats_server.url) as hub, running(_config(nats_server.url, url)) as agent:
            assert isinstance(await hub.infer("edge-a", _chat("a")), wire.InferResult)
            with infer_tasks() as tasks:
                got = await hub.infer("edge-a", _chat("b"))
                assert isinstance(got, wire.InferResult) and got.output == "ok"
                assert requests == [1, 1, 2]
                assert tasks == ["InferenceService.handle"]  # the retry (only it) went the usual way
                tasks.clear()
                broken = await hub.infer("edge-a", _chat("c"))
            assert isinstance(broken, wire.ErrorReply) and broken.code == "backend_unavailable" and broken.retryable
            assert str(server.sockets[0].getsockname()[1]) not in broken.message
            assert requests == [1, 1, 2, 2] and tasks == []
            await until(lambda: agent.inventory.inflight() == 0)
            assert agent.counters["infer_errors"] == 1
    finally:
        server.close()
        await server.wait_closed()


async def test_slow_requests_served_with_no_task_share_one_acknowledgement_timer(
        nats_server: NatsServer, local_llm: LocalServer) -> None:  # noqa: F811
    # Each gets its acknowledgement once, at its time, then its answer; the service arms no timer
    # per request (the old code armed one each: a _Watch), and one shared timer acknowledges them.
    # A request whose acknowledgement is due before one already queued (a shorter delay) goes the
    # task's way, so it is not held back to the queued one's time.
    loop = asyncio.get_running_loop()
    async with FakeHub(nats_server.url) as hub, running(_config(nats_server.url, local_llm.url)) as agent:
        local_llm.delay_s = 0.3  # six at once: six kept-alive connections
        warm = await asyncio.gather(*(hub.infer("edge-a", _chat(f"w{i}")) for i in range(6)))
        assert all(isinstance(got, wire.InferResult) for got in warm)
        assert agent.backend._pool.opened == 6  # type: ignore[attr-defined]
        with timers_armed(owners=("_Watch.", "InferenceService.")) as armed:
            with infer_tasks() as tasks:
                sent = loop.time()
                got_all = await asyncio.gather(*(hub.infer_stream("edge-a", _chat(f"s{i}", ack=True, ack_after_ms=50.0))
                                                 for i in range(6)))
            assert tasks == []
            for i, got in enumerate(got_all):
                (acked_at, ack), (_, end) = got
                assert isinstance(ack, wire.InferAccepted) and ack.request_id == f"s{i}"
                assert isinstance(end, wire.InferResult) and end.request_id == f"s{i}"
                assert 0.04 <= acked_at - sent < 0.28
            assert "_Watch._fire" not in armed and 1 <= len(armed) <= 3, armed
            # A long delay queued, then a short one: the short one is acknowledged at its own time.
            with infer_tasks() as tasks:
                sent = loop.time()
                late = asyncio.create_task(hub.infer_stream("edge-a", _chat("late", ack=True, ack_after_ms=250.0)))
                await wait_for(lambda: agent.inventory.inflight() == 1, 3, "the first request to hold its slot")
                soon = await hub.infer_stream("edge-a", _chat("soon", ack=True, ack_after_ms=30.0))
                (soon_acked_at, soon_ack), _ = soon
                assert isinstance(soon_ack, wire.InferAccepted) and soon_acked_at - sent < 0.2
                (late_acked_at, late_ack), (_, late_end) = await late
                assert isinstance(late_ack, wire.InferAccepted) and late_acked_at - sent >= 0.24
                assert isinstance(late_end, wire.InferResult)
            assert tasks == ["InferenceService.handle"]  # "soon" (only it) went the task's way
