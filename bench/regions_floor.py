"""The tenant's floor in ``cpn bench regions``: an HTTP server, in a process of its own, that answers
every request at once with an answer shaped like a gateway's ``/v1/infer`` answer (the same headers
and body fields, about the same size).

The bench's client (:mod:`bench.regions_client`, Python aiohttp) sends to it through a proxy of the
same child as the tenant's legs, delayed or not: what such a round trip takes beyond the proxy's
delay is what the bench's own tenant costs (the client's aiohttp writing the request and parsing the
answer, the proxy, loopback, a process waking at each end), none of it cpn's. Nothing is parsed
beyond the framing (head up to the blank line, ``Content-Length`` bytes of body) and the answer is
built once: the server's own cost is a few microseconds, so cpn's gateway (aiohttp parsing and
writing) is not in the floor.

``python -m bench.regions_floor`` prints ``port=N`` when serving; EOF on stdin ends it.
"""

from __future__ import annotations

import asyncio
import json
import sys

from controlplane.runtime import end_child

BODY = json.dumps({
    "id": "r" + "0" * 32, "object": "inference", "model": "demo", "output": "ok", "site": "",
    "rtt_ms": 0.0, "overhead_ms": 0.0, "promise_ms": 0.0, "route": "nearest", "origin": "floor",
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}, "service_ms": 0.0,
}).encode()
ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
          b"X-CPN-Site: floor-site\r\nX-CPN-RTT-Ms: 0.000\r\nX-CPN-Overhead-Ms: 0.000\r\n"
          b"X-CPN-Promise-Ms: 0.000\r\nX-CPN-Route: nearest\r\nX-Request-Id: r" + b"0" * 32 + b"\r\n"
          b"X-CPN-Ingress: floor\r\nContent-Length: " + str(len(BODY)).encode() + b"\r\n"
          b"Date: Thu, 01 Jan 2026 00:00:00 GMT\r\nServer: Python/3.11 aiohttp/3\r\n\r\n" + BODY)


def answer_length(head: bytes) -> int:
    """The body length a request head states (0 without ``Content-Length``)."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


class Floor(asyncio.Protocol):
    """One connection: each whole request answered with :data:`ANSWER` as soon as it is read."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            length = answer_length(self.buf[:end])
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            assert self.transport is not None
            self.transport.write(ANSWER)


async def serve() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Floor, "127.0.0.1", 0)
    print(f"port={server.sockets[0].getsockname()[1]}", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.read()  # until EOF: the bench is done
    server.close()


class FloorServer:
    """The bench's handle on the floor's process."""

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self.port = 0

    async def start(self) -> None:
        self._proc = proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.regions_floor", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        line = (await proc.stdout.readline()).decode()
        if not line.startswith("port="):
            raise RuntimeError(f"the bench's floor server did not start (code {proc.returncode})")
        self.port = int(line[5:])

    async def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        await end_child(proc)


if __name__ == "__main__":
    asyncio.run(serve())
