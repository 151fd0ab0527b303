"""An asyncio TCP proxy that injects network faults between a NATS client and its server.

Listens on 127.0.0.1, port 0, in front of one upstream URL. Modes switch at run time:

- ``pass``: forward bytes both ways.
- ``delay(ms)``: forward each chunk ``ms`` later, per direction, order kept (RTT grows by 2 x ms).
  How much later than asked each chunk really left is kept (``lateness_ms``): on asyncio's default
  loop (epoll) a timer fires up to a millisecond late, since epoll waits in whole milliseconds;
  :mod:`controlplane.tools.proxyhost` runs its proxies on a ``select`` loop (microseconds) for that.
- ``blackhole``: what a partition looks like: connections stay open, bytes both ways are
  dropped, new connections are accepted and held without reaching the server. When the mode
  leaves ``blackhole`` the held connections are aborted (bytes were lost, their streams are
  garbage); the client's own stale-connection check is what should notice first.
- ``reset``: abort every connection now (TCP RST) and abort new ones at once until switched back.

``close()`` stops listening, aborts every connection and awaits every task, so a test leaves no
unclosed transports (pytest runs with ``filterwarnings = error``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import struct
from typing import Literal
from urllib.parse import urlsplit

Mode = Literal["pass", "delay", "blackhole", "reset"]

LATENESS_KEPT = 20_000
"""Delayed chunks whose lateness a proxy keeps (the newest)."""


def _abort(writer: asyncio.StreamWriter | None) -> None:
    """Close with RST (linger 0), not FIN: a reset peer, not a polite goodbye."""
    if writer is None or writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One client connection and, unless it arrived during a blackhole, its upstream connection."""

    def __init__(self, proxy: FaultProxy, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.c_reader, self.c_writer = c_reader, c_writer
        self.u_reader: asyncio.StreamReader | None = None
        self.u_writer: asyncio.StreamWriter | None = None
        self.held = False
        """Accepted during a blackhole: never connected upstream, aborted when the mode changes."""
        self.tasks: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        proxy = self.proxy
        if proxy.mode == "blackhole":
            self.held = True
            await self._drain_forever(self.c_reader)
            return
        try:
            self.u_reader, self.u_writer = await asyncio.open_connection(proxy.upstream_host, proxy.upstream_port)
        except OSError:
            return  # upstream down: the client sees its connection close, as it would
        queues: list[asyncio.Queue[tuple[float, bytes] | None]] = [asyncio.Queue(), asyncio.Queue()]
        self.tasks = [
            asyncio.create_task(self._read(self.c_reader, queues[0])),
            asyncio.create_task(self._write(queues[0], self.u_writer)),
            asyncio.create_task(self._read(self.u_reader, queues[1])),
            asyncio.create_task(self._write(queues[1], self.c_writer)),
        ]
        # Either side closing ends the link.
        await asyncio.wait(self.tasks, return_when=asyncio.FIRST_COMPLETED)

    async def _drain_forever(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while await reader.read(65536):
                pass

    async def _read(self, reader: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes] | None]) -> None:
        loop = asyncio.get_running_loop()
        try:
            while data := await reader.read(65536):
                if self.proxy.mode == "blackhole":
                    continue  # dropped on the floor, both ways
                queue.put_nowait((loop.time() + self.proxy.delay_ms / 1000.0, data))
        except (ConnectionError, OSError):
            pass
        queue.put_nowait(None)

    async def _write(self, queue: asyncio.Queue[tuple[float, bytes] | None], writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while (item := await queue.get()) is not None:
                due, data = item
                if (wait_s := due - loop.time()) > 0:
                    await asyncio.sleep(wait_s)
                if self.proxy.mode == "blackhole":
                    continue
                if self.proxy.delay_ms > 0:
                    self.proxy.lateness_ms.append((loop.time() - due) * 1000.0)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass

    def abort(self) -> None:
        _abort(self.c_writer)
        _abort(self.u_writer)

    async def close(self) -> None:
        self.abort()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class FaultProxy:
    """A TCP proxy in front of ``upstream_url`` (``nats://host:port``) with switchable faults.

    Use ``async with FaultProxy(server.url) as proxy:`` and connect clients to ``proxy.url``.
    """

    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        if not parts.hostname or not parts.port:
            raise ValueError(f"upstream_url {upstream_url!r} needs a host and a port")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port
        self.mode: Mode = "pass"
        self.delay_ms = 0.0
        self.accepted = 0
        self.lateness_ms: collections.deque[float] = collections.deque(maxlen=LATENESS_KEPT)
        """How late each delayed chunk left (ms past its due time): the proxy's own error, the last
        :data:`LATENESS_KEPT` chunks."""
        self._server: asyncio.Server | None = None
        self._links: dict[_Link, asyncio.Task[None]] = {}
        self._closing = False
        self.port = 0

    def __repr__(self) -> str:
        return f"<FaultProxy :{self.port} -> {self.upstream_host}:{self.upstream_port} mode={self.mode} links={len(self._links)}>"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def links(self) -> int:
        """Client connections open right now."""
        return len(self._links)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode == "reset" or self._closing:  # a connection accepted just before close() began
            _abort(writer)
            return
        link = _Link(self, reader, writer)
        task = asyncio.current_task()
        assert task is not None
        self._links[link] = task
        try:
            await link.run()
        finally:
            self._links.pop(link, None)
            await link.close()

    # ------------------------------------------------------------------ modes

    def set_pass(self) -> None:
        """Forward everything again (held blackhole connections are aborted)."""
        self._leave_blackhole()
        self.mode, self.delay_ms = "pass", 0.0

    def set_delay(self, ms: float) -> None:
        """Forward every chunk ``ms`` milliseconds late, in each direction."""
        if ms < 0:
            raise ValueError(f"delay ms must be >= 0, got {ms}")
        self._leave_blackhole()
        self.mode, self.delay_ms = "delay", float(ms)

    def set_blackhole(self) -> None:
        """Keep connections open and drop every byte both ways; hold new connections."""
        self.mode = "blackhole"

    def set_reset(self) -> None:
        """Abort every connection now and every new one until the mode changes."""
        self.mode = "reset"
        for link in list(self._links):
            link.abort()

    def _leave_blackhole(self) -> None:
        if self.mode == "blackhole":
            for link in list(self._links):
                link.abort()

    # ------------------------------------------------------------------ lifecycle

    async def close(self) -> None:
        """Stop listening, abort every connection, await every task."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        await asyncio.sleep(0)  # connection callbacks already scheduled run now, and abort themselves
        for link in list(self._links):
            link.abort()
        # Aborted links end on their own. Cancelling a connection task instead would make
        # asyncio's start_server callback log the CancelledError (Python 3.11).
        tasks = list(self._links.values())
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=2.0)
            for task in stuck:
                task.cancel()
            for task in stuck:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
