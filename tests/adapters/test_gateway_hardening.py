"""Gateway rules against hostile clients: slow headers, connection cap, rate limits, mass assignment."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from controlplane.natsserver import NatsServer
from tests.support.hubrig import Client, hub_config, running_hub


async def test_a_client_trickling_headers_is_cut_off(tmp_path: Path, nats_server: NatsServer) -> None:
    async with running_hub(hub_config(tmp_path, nats_server.url, header_timeout_s=1.0)) as hub:
        reader, writer = await asyncio.open_connection("127.0.0.1", hub.http_port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        closed = False
        while not closed and time.monotonic() - started < 8.0:
            try:  # one more header line every 0.3 s, never the blank line that ends them
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
                closed = not await asyncio.wait_for(reader.read(100), 0.3)
            except asyncio.TimeoutError:
                continue
            except (ConnectionError, BrokenPipeError):
                closed = True
        elapsed = time.monotonic() - started
        writer.close()
        assert closed and 0.9 <= elapsed < 5.0 and hub.gateway.guard.slow_aborted == 1


async def test_connections_beyond_the_cap_get_503(tmp_path: Path, nats_server: NatsServer) -> None:
    async with running_hub(hub_config(tmp_path, nats_server.url, max_connections=2)) as hub:
        held = [await asyncio.open_connection("127.0.0.1", hub.http_port) for _ in range(2)]
        reader, writer = await asyncio.open_connection("127.0.0.1", hub.http_port)
        data = await asyncio.wait_for(reader.read(), 5)
        assert data.startswith(b"HTTP/1.1 503") and b"too_many_connections" in data
        for _, w in [*held, (reader, writer)]:
            w.close()


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
