"""Gateway rules against hostile clients: slow headers, connection caps, rate limits, mass assignment.

The connection tests run on both event loops a hub runs on: asyncio's, and uvloop's (what ``cpn up``
and ``cpn hub`` run; its transports are not asyncio classes), each in its own loop with its own
nats-server, against raw sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controlplane.hub import Hub
from controlplane.nats.natsserver import NatsServer
from controlplane.runtime import new_event_loop
from tests.support.hubrig import Client, hub_config, running_hub
from tests.support.waiting import until

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop, "uvloop": new_event_loop}


def run_on(loop: str, main: Callable[[], Awaitable[None]]) -> None:
    """Run ``main()`` to the end on a fresh loop of kind ``loop``."""
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(main())  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def hub_here(tmp_path: Path, **config: Any) -> AsyncIterator[Hub]:
    """A hub and its nats-server, both on the running loop."""
    nats_server = NatsServer(tmp_path / "jetstream")
    await nats_server.start()
    try:
        async with running_hub(hub_config(tmp_path, nats_server.url, **config)) as hub:
            yield hub
    finally:
        await nats_server.stop()


async def closed_within(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float,
                        trickle: bytes | None = None) -> float | None:
    """Seconds until the server closes the connection (None: still open after ``timeout``), sending
    ``trickle`` every 0.2 s meanwhile (one more header line, never the blank line ending them)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if trickle:
                writer.write(trickle)
                await writer.drain()
            if not await asyncio.wait_for(reader.read(1000), 0.2):
                return time.monotonic() - started
        except asyncio.TimeoutError:
            continue
        except (ConnectionError, BrokenPipeError):
            return time.monotonic() - started
    return None


async def one_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """A whole keep-alive request on the connection; its status line and headers."""
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    await asyncio.wait_for(reader.readexactly(length), 5)
    return head


@pytest.mark.parametrize("loop", LOOPS)
def test_a_client_trickling_headers_is_cut_off(tmp_path: Path, loop: str) -> None:
    async def main() -> None:
        async with hub_here(tmp_path, header_timeout_s=1.0) as hub:
            reader, writer = await asyncio.open_connection("127.0.0.1", hub.http_port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            elapsed = await closed_within(reader, writer, 8.0, trickle=b"X-Slow: 1\r\n")
            writer.close()
            assert elapsed is not None and 0.9 <= elapsed < 5.0 and hub.gateway.guard.slow_aborted == 1

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_the_header_deadline_holds_for_every_request_of_a_keepalive_connection(tmp_path: Path, loop: str) -> None:
    """The attack: send one good request (which used to switch the deadline off), then trickle."""
    async def main() -> None:
        async with hub_here(tmp_path, header_timeout_s=1.0) as hub:
            reader, writer = await asyncio.open_connection("127.0.0.1", hub.http_port)
            for _ in range(3):  # keep-alive requests well within the deadline are untouched
                assert (await one_request(reader, writer)).startswith(b"HTTP/1.1 200")
                await asyncio.sleep(0.6)  # the behaviour: an idle keep-alive gap, well within the 1 s deadline
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            elapsed = await closed_within(reader, writer, 8.0, trickle=b"X-Slow: 1\r\n")
            writer.close()
            assert elapsed is not None and 0.8 <= elapsed < 3.0, elapsed
            assert hub.gateway.guard.slow_aborted == 1

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_an_idle_keepalive_connection_is_closed_after_the_keepalive_timeout(tmp_path: Path, loop: str) -> None:
    async def main() -> None:
        async with hub_here(tmp_path, keepalive_timeout_s=1.0) as hub:
            reader, writer = await asyncio.open_connection("127.0.0.1", hub.http_port)
            assert (await one_request(reader, writer)).startswith(b"HTTP/1.1 200")
            elapsed = await closed_within(reader, writer, 8.0)
            writer.close()
            assert elapsed is not None and 0.8 <= elapsed < 3.0, elapsed

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_connections_beyond_the_cap_get_503_and_are_closed(tmp_path: Path, loop: str) -> None:
    """Beyond ``max_connections``: a 503 at once, then the close, for raw sockets and HTTP clients
    alike (the issue: under uvloop no 503, clients hung ~75 s); freed slots are reused."""
    async def main() -> None:
        async with hub_here(tmp_path, max_connections=20) as hub:
            held = [await asyncio.open_connection("127.0.0.1", hub.http_port) for _ in range(20)]
            extra = [await asyncio.open_connection("127.0.0.1", hub.http_port) for _ in range(10)]
            for reader, _ in extra:  # a raw socket that sends nothing
                data = await asyncio.wait_for(reader.read(), 5)
                assert data.startswith(b"HTTP/1.1 503") and b"too_many_connections" in data
            async with aiohttp.ClientSession() as session:  # an HTTP client that sends its request at once
                async with session.get(f"http://127.0.0.1:{hub.http_port}/healthz") as resp:
                    assert resp.status == 503 and resp.headers["Retry-After"] == "1"
                    assert (await resp.json())["error"]["code"] == "too_many_connections"
                for _, w in [*held, *extra]:
                    w.close()
                await until(lambda: hub.gateway.guard.open == 0, 5, "every connection closed at the hub")
                async with session.get(f"http://127.0.0.1:{hub.http_port}/metrics") as resp:
                    assert resp.status == 200
                    text = await resp.text()
            assert hub.gateway.guard.refused == 11
            assert 'cpn_gateway_connections_refused_total{reason="max_connections"} 11.0' in text

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_one_address_cannot_hold_the_cap_and_trickling_connections_are_cut(tmp_path: Path, loop: str) -> None:
    """The issue's attack, scaled down: connections from one address that send one request each,
    then trickle headers. Beyond ``max_connections_per_client`` they get a 503; those admitted are
    cut at the header deadline; a client from another address is served meanwhile."""
    async def main() -> None:
        async with hub_here(tmp_path, max_connections=40, max_connections_per_client=8, header_timeout_s=1.5) as hub:
            port = hub.http_port
            attack = [await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0)) for _ in range(12)]
            admitted = []
            for reader, writer in attack:
                try:
                    head = await one_request(reader, writer)
                except (asyncio.IncompleteReadError, ConnectionError):
                    head = b""
                if head.startswith(b"HTTP/1.1 200"):
                    admitted.append((reader, writer))
            assert len(admitted) == 8 and hub.gateway.guard.counts[("max_connections_per_client",)] == 4
            for _, writer in admitted:
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            async with aiohttp.ClientSession() as session:  # another address is served at once
                started = time.monotonic()
                async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    assert resp.status == 200 and time.monotonic() - started < 1.0
            cut = await asyncio.gather(*(closed_within(r, w, 8.0, trickle=b"X-Slow: 1\r\n") for r, w in admitted))
            assert all(c is not None and c < 4.0 for c in cut), cut
            assert hub.gateway.guard.slow_aborted == 8
            for _, w in attack:
                w.close()
            await until(lambda: hub.gateway.guard.open == 0 and not hub.gateway.guard.by_client, 5, "all closed")

    run_on(loop, main)


async def test_tenant_rate_limit_answers_429_with_retry_after(tmp_path: Path, nats_server: NatsServer) -> None:
    async with running_hub(hub_config(tmp_path, nats_server.url)) as hub:
        key = hub.create_tenant("slow", rate_per_s=1.0, burst=3)
        async with aiohttp.ClientSession() as session:
            c = Client(session, f"http://127.0.0.1:{hub.http_port}", key)
            statuses = [(await c.call("GET", "/v1/models"))[0] for _ in range(5)]
            assert statuses[:3] == [200, 200, 200] and statuses[3] == 429
            status, body, headers = await c.call("GET", "/v1/models")
            assert status == 429 and int(headers["Retry-After"]) >= 1 and body["error"]["type"] == "rate_limit_error"


@pytest.mark.parametrize("field", ["tenant_id", "site", "attempt"])
async def test_mass_assignment_fields_are_422_naming_the_field(tmp_path: Path, nats_server: NatsServer, field: str) -> None:
    async with running_hub(hub_config(tmp_path, nats_server.url)) as hub:
        key = hub.create_tenant("acme", default_origin="shanghai")
        async with aiohttp.ClientSession() as session:
            c = Client(session, f"http://127.0.0.1:{hub.http_port}", key)
            for path, body in [("/v1/infer", {"model": "m", "input": "x"}),
                               ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}]})]:
                status, answer, _ = await c.call("POST", path, {**body, field: "x"})
                assert status == 422 and field in answer["error"]["message"], (path, answer)


async def test_405_names_the_allowed_methods(tmp_path: Path, nats_server: NatsServer) -> None:
    async with running_hub(hub_config(tmp_path, nats_server.url)) as hub:
        key = hub.create_tenant("acme", default_origin="shanghai")
        async with aiohttp.ClientSession() as session:
            c = Client(session, f"http://127.0.0.1:{hub.http_port}", key)
            for method, path, allow in [("DELETE", "/v1/models", "GET, HEAD"), ("GET", "/v1/chat/completions", "POST"),
                                        ("PUT", "/v1/jobs", "GET, HEAD, POST"), ("POST", "/healthz", "GET, HEAD")]:
                status, body, headers = await c.call(method, path)
                assert status == 405 and headers.get("Allow") == allow, (method, path, status, headers)
                assert body["error"]["code"] == "method_not_allowed" and "x-request-id" in {h.lower() for h in headers}
            status, body, headers = await c.call("GET", "/v1/nothing-here")
            assert status == 404 and "Allow" not in headers


@pytest.mark.parametrize("loop", LOOPS)
def test_a_body_sent_slowly_gets_408_at_the_body_timeout(tmp_path: Path, loop: str) -> None:
    async def main() -> None:
        async with hub_here(tmp_path, body_timeout_s=1.0, header_timeout_s=1.0) as hub:
            key = hub.create_tenant("acme", default_origin="shanghai")
            reader, writer = await asyncio.open_connection("127.0.0.1", hub.http_port)
            writer.write(f"POST /v1/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{".encode())
            started = time.monotonic()
            answer = b""
            while time.monotonic() - started < 8 and b"\r\n\r\n" not in answer:
                writer.write(b" ")  # one byte of the body every 0.2 s
                await writer.drain()
                try:
                    answer += await asyncio.wait_for(reader.read(1000), 0.2)
                except asyncio.TimeoutError:
                    pass
            elapsed = time.monotonic() - started
            writer.close()
            assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer + await reader.read(), answer
            assert 0.9 <= elapsed < 3.0, elapsed

    run_on(loop, main)


async def test_a_body_over_the_limit_that_came_whole_is_413_and_one_under_is_read(tmp_path: Path) -> None:
    """A body that arrived with its headers is taken from the buffer at once (no read loop): the
    limit still holds there, and a body just under it is read whole."""
    async with hub_here(tmp_path, max_body_bytes=2000) as hub:
        key = hub.create_tenant("acme", default_origin="hangzhou")
        reader, writer = await asyncio.open_connection("127.0.0.1", hub.http_port)
        try:
            for size, want in ((2500, b" 413 "), (1990, b" 404 ")):
                body = b'{"model":"nobody-serves-this","input":"' + b"x" * (size - 45) + b'"}'
                writer.write(b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: "
                             + str(len(body)).encode() + b"\r\n\r\n" + body)  # one write: it arrives whole
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                answer = await asyncio.wait_for(reader.readexactly(length), 5)
                assert want in head.split(b"\r\n", 1)[0], (size, head, answer)
                if size > 2000:
                    assert b"larger than 2000 bytes" in answer
                else:
                    assert b"nobody-serves-this" in answer  # the whole body was read and decoded
        finally:
            writer.close()
