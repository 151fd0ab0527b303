"""Time to first chunk of streamed answers: a small raw-socket HTTP/1.1 client run as its own process.

wrk sees whole responses only, so streaming's time to first chunk (TTFC) is measured here: each of
``--conns`` keep-alive connections sends the request, notes when the first body bytes holding
``data:`` arrive (TTFC) and when the response ends (chunked terminator, or ``Content-Length``),
then sends the next. It acknowledges every read at once (``TCP_QUICKACK``), so a server that
leaves Nagle on is not charged the client's delayed-ACK timer (``--no-quickack`` shows what an
ordinary client would see). It is Python (asyncio ``Protocol`` on uvloop, no HTTP library), so it is used
at low concurrency only (8 connections), where it is far from its own ceiling; the same client
measures every system.

``python -m bench.ttfc URL --conns 8 --seconds 3 --body JSON [--header 'K: V']`` prints one JSON
line: requests, errors, rps, ttfc_p50_ms, ttfc_p99_ms, total_p50_ms, total_p99_ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from urllib.parse import urlsplit

from bench import common
from bench.common import percentile


class ResponseReader:
    """Incremental parser of one HTTP/1.1 response (pure: feed bytes, ask what was seen).

    ``first_data`` turns true once body bytes containing ``data:`` (or, for a non-SSE answer, any
    body byte) have arrived; ``done`` once the body is complete."""

    def __init__(self) -> None:
        self.status = 0
        self.first_data = False
        self.done = False
        self._buf = b""
        self._head_done = False
        self._chunked = False
        self._length = -1
        self._body_seen = 0
        self._chunk_left = -1  # bytes left in the current chunk incl. its CRLF; -1: expect a size line

    def feed(self, data: bytes) -> None:
        self._buf += data
        if not self._head_done:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self._buf = self._buf[:end].decode("latin-1"), self._buf[end + 4:]
            self._head_done = True
            lines = head.split("\r\n")
            self.status = int(lines[0].split(" ", 2)[1])
            for line in lines[1:]:
                key, _, value = line.partition(":")
                key, value = key.strip().lower(), value.strip().lower()
                if key == "transfer-encoding" and "chunked" in value:
                    self._chunked = True
                elif key == "content-length":
                    self._length = int(value)
        if self._chunked:
            self._feed_chunked()
        else:
            self._body_seen += len(self._buf)
            if self._buf:
                self.first_data = True
            self._buf = b""
            if self._length >= 0 and self._body_seen >= self._length:
                self.done = True

    def _feed_chunked(self) -> None:
        buf = self._buf
        while buf:
            if self._chunk_left < 0:
                nl = buf.find(b"\r\n")
                if nl < 0:
                    break
                size = int(buf[:nl].split(b";", 1)[0], 16)
                buf = buf[nl + 2:]
                if size == 0:
                    self.done = True  # trailers, if any, end with a CRLF we need not wait for
                    buf = b""
                    break
                self._chunk_left = size + 2
                continue
            take = buf[: self._chunk_left]
            if b"data:" in take:
                self.first_data = True
            self._chunk_left -= len(take)
            buf = buf[len(take):]
            if self._chunk_left == 0:
                self._chunk_left = -1
        self._buf = buf


QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class _Conn(asyncio.Protocol):
    quickack = True

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._sock: socket.socket | None = None
        self.reader = ResponseReader()
        self.sent_at = 0.0
        self.ttfc = 0.0
        self.finished: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._sock = transport.get_extra_info("socket")
        if self._sock is not None:
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, request: bytes) -> asyncio.Future[None]:
        self.reader = ResponseReader()
        self.ttfc = 0.0
        self.finished = asyncio.get_running_loop().create_future()
        self.sent_at = time.perf_counter()
        assert self.transport is not None
        self.transport.write(request)
        return self.finished

    def data_received(self, data: bytes) -> None:
        if self.quickack and QUICKACK is not None and self._sock is not None:
            # Linux re-enters delayed-ACK mode on its own; re-arm after every read. Without this, a
            # server that writes headers and first chunk separately with Nagle on (sglang-router
            # 0.3.2 does) waits ~40 ms for our delayed ACK: a client artefact, not the path's cost.
            self._sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
        r = self.reader
        r.feed(data)
        if r.first_data and not self.ttfc:
            self.ttfc = time.perf_counter() - self.sent_at
        if r.done and self.finished is not None and not self.finished.done():
            self.finished.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.finished is not None and not self.finished.done():
            self.finished.set_exception(ConnectionError("connection closed mid-response"))


def build_request(url: str, body: bytes, headers: dict[str, str]) -> bytes:
    """The raw HTTP/1.1 POST (pure)."""
    u = urlsplit(url)
    lines = [f"POST {u.path or '/'} HTTP/1.1", f"Host: {u.netloc}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def run(url: str, conns: int, seconds: float, body: bytes, headers: dict[str, str]) -> dict[str, float]:
    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    request = build_request(url, body, headers)
    loop = asyncio.get_running_loop()
    ttfcs: list[float] = []
    totals: list[float] = []
    errors = 0

    async def worker(stop_at: float | None, count: int) -> None:
        nonlocal errors
        _, conn = await loop.create_connection(_Conn, host, port)
        done = 0
        try:
            while (stop_at is None and done < count) or (stop_at is not None and time.perf_counter() < stop_at):
                done += 1
                try:
                    await asyncio.wait_for(conn.send(request), 30)
                except (ConnectionError, asyncio.TimeoutError):
                    errors += 1
                    conn.transport.close()  # type: ignore[union-attr]
                    _, conn = await loop.create_connection(_Conn, host, port)
                    continue
                if conn.reader.status != 200:
                    errors += 1
                elif stop_at is not None:
                    ttfcs.append(conn.ttfc)
                    totals.append(time.perf_counter() - conn.sent_at)
        finally:
            conn.transport.close()  # type: ignore[union-attr]

    await asyncio.gather(*(worker(None, 20) for _ in range(conns)))  # warm up, not counted
    errors = 0
    started = time.perf_counter()
    await asyncio.gather(*(worker(started + seconds, 0) for _ in range(conns)))
    elapsed = time.perf_counter() - started
    ttfcs.sort()
    totals.sort()
    return {"requests": len(totals), "errors": errors, "rps": len(totals) / elapsed,
            "ttfc_p50_ms": percentile(ttfcs, 50) * 1000, "ttfc_p99_ms": percentile(ttfcs, 99) * 1000,
            "total_p50_ms": percentile(totals, 50) * 1000, "total_p99_ms": percentile(totals, 99) * 1000}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.ttfc")
    p.add_argument("url")
    p.add_argument("--conns", type=int, default=8)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--body", default="{}")
    p.add_argument("--header", action="append", default=[])
    p.add_argument("--no-quickack", action="store_true", help="let the kernel delay ACKs as an ordinary client would")
    a = p.parse_args(argv)
    _Conn.quickack = not a.no_quickack
    headers = {k.strip(): v.strip() for k, v in (h.split(":", 1) for h in a.header)}
    common.install_uvloop()
    print(json.dumps(asyncio.run(run(a.url, a.conns, a.seconds, a.body.encode(), headers))))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
