"""``edge_agent.nats_fast`` against a real nats-server: messages handed over at once, in order, a
failing handler costing one message and not the connection, publishes written once per loop pass
and left to nats-py while the connection is down."""

from __future__ import annotations

import asyncio

import nats
import pytest

from controlplane.nats.natsserver import NatsServer
from edge_agent.nats_barrier import barrier
from edge_agent.nats_fast import Dispatch, Plain, publish_soon, subscribe_now
from tests.support.waiting import until


async def test_dispatch_delivers_in_order_without_a_task_and_survives_a_failing_handler(nats_server: NatsServer) -> None:
    rx = await nats.connect(nats_server.url)
    tx = await nats.connect(nats_server.url)
    got: list[bytes] = []

    def handler(msg: object) -> None:
        data = msg.data  # type: ignore[attr-defined]
        if data == b"boom":
            raise ValueError("a handler's bug")
        got.append(data)

    try:
        dispatch = Dispatch(handler)
        sub = await rx.subscribe("fast.in", future=dispatch)
        await barrier(rx)
        assert sub._wait_for_msgs_task is None  # no task (and no queue) per subscription
        for i in range(50):
            payload = b"boom" if i == 10 else str(i).encode()
            if i % 2:
                assert publish_soon(tx, "fast.in", payload)
            else:
                await tx.publish("fast.in", payload)  # nats-py's own path, interleaved: order kept
        await until(lambda: len(got) == 49, timeout_s=10)
        assert got == [str(i).encode() for i in range(50) if i != 10]
        assert dispatch.errors == 1
        assert rx.is_connected  # the reader lived through the handler's exception
    finally:
        await rx.close()
        await tx.close()


async def test_publish_soon_writes_once_per_loop_pass_with_a_reply_subject(nats_server: NatsServer) -> None:
    rx = await nats.connect(nats_server.url)
    tx = await nats.connect(nats_server.url)
    got: list[tuple[bytes, str]] = []
    try:
        await rx.subscribe("fast.req", future=Dispatch(lambda m: got.append((m.data, m.reply))))
        await barrier(rx)
        writes = 0
        transport = tx._transport
        real = transport.writelines

        def counting(lines: list[bytes]) -> None:
            nonlocal writes
            writes += 1
            real(lines)

        transport.writelines = counting
        for i in range(20):
            assert publish_soon(tx, "fast.req", b"q%d" % i, f"_INBOX.x.{i}")
        assert len(tx._pending) == 20 and writes == 0  # nothing written yet: one write at the end of the pass
        await asyncio.sleep(0)
        assert writes == 1 and tx._pending == []
        await until(lambda: len(got) == 20, timeout_s=10)
        assert got == [(b"q%d" % i, f"_INBOX.x.{i}") for i in range(20)]
        assert tx.stats["out_msgs"] >= 20
    finally:
        await rx.close()
        await tx.close()


async def test_publish_soon_leaves_a_connection_that_is_not_up_to_nats_py(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url, allow_reconnect=False)
    await nc.close()
    assert publish_soon(nc, "fast.none", b"x") is False
    with pytest.raises(nats.errors.ConnectionClosedError):
        await nc.publish("fast.none", b"x")  # what the callers fall back to, and its error


async def test_publish_soon_leaves_a_payload_over_the_server_limit_to_nats_py(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        assert publish_soon(nc, "fast.big", b"x" * (nc._max_payload + 1)) is False
        assert nc._pending == []
    finally:
        await nc.close()


async def test_subscribe_now_hands_plain_messages_over_light_and_leaves_the_rest_to_nats_py(nats_server: NatsServer) -> None:
    rx = await nats.connect(nats_server.url)
    tx = await nats.connect(nats_server.url)
    got: list[object] = []
    queued: list[bytes] = []

    async def on_other(msg: object) -> None:
        queued.append(msg.data)  # type: ignore[attr-defined]

    try:
        await subscribe_now(rx, "fast.plain", got.append)
        await rx.subscribe("fast.other", cb=on_other)  # a subscription of nats-py's own kind
        await barrier(rx)
        before = rx.stats["in_msgs"]
        await tx.publish("fast.plain", b"one", reply="_INBOX.r1")
        await tx.publish("fast.plain", b"two", headers={"Status": "503"})
        await tx.publish("fast.other", b"three")
        await tx.publish("fast.plain", b"", reply="")
        await until(lambda: len(got) == 3 and queued == [b"three"], timeout_s=10)
        plain, with_headers, empty = got
        assert isinstance(plain, Plain)
        assert (plain.subject, plain.reply, plain.data, plain.headers) == ("fast.plain", "_INBOX.r1", b"one", None)
        assert not isinstance(with_headers, Plain)  # nats-py's Msg, headers read by nats-py
        assert with_headers.data == b"two" and with_headers.headers == {"Status": "503"}  # type: ignore[attr-defined]
        assert isinstance(empty, Plain) and (empty.data, empty.reply) == (b"", "")
        assert rx.stats["in_msgs"] - before == 4  # counted as nats-py counts them
    finally:
        await rx.close()
        await tx.close()
