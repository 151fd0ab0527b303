"""The hot inference routes answered below aiohttp, on the gateway's own port and connections.

``POST /v1/chat/completions`` and ``POST /v1/completions`` are most of a gateway's requests, and
for them aiohttp's machinery (its parser's request objects, a task per request and a wake-up of
the connection's task, the dispatcher, the response's preparation and writer) cost more CPU than
cpn's own steps. Here the connection's protocol (``server.py``) frames each request itself and
serves a hot one directly; any other request hands the connection to aiohttp's own protocol for
good, with the bytes read so far replayed, so every other endpoint and every unusual request is
aiohttp's as before.

Rule 1: a hot request takes the same steps as aiohttp's handler, not copies of them: the request
guard (``app.Guard``: id, API key, rate limit, error shape, metrics), the answer
(``openai.answer``: origin, budget, routing, relay, usage) and the stream's relay
(``openai.relay``). Only the HTTP framing is this module's.

Rule 2: only what is plainly a hot request is served here: the request line exactly ``POST
<route> HTTP/1.1`` (no query), well-formed header lines, one ``Content-Length`` within
``max_body_bytes`` and the whole body already read, no ``Transfer-Encoding``, ``Expect`` or
``Upgrade``, ``Connection`` absent, ``keep-alive`` or ``close``. Anything else (another route, a
malformed head, a chunked or too large or still arriving body, ``100-continue``, HTTP/1.0) goes to
aiohttp, which answers it as it always did (400, 413, 408, ...).

Rule 3: a client gone while its stream is relayed cancels the relay at once (the site is told to
stop, its slot freed); a plain answer still completes (and is accounted), as under aiohttp.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import NamedTuple, Protocol, cast

from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE
from multidict import CIMultiDict, CIMultiDictProxy

from controlplane.gateway import openai
from controlplane.gateway import openai_shapes as oa
from controlplane.gateway.app import ARRIVED, SERVICES, Guard, UnknownKey, arrived
from controlplane.services.inference import aclose


MAX_HEAD_BYTES = 8190
"""A longer request head goes to aiohttp (which refuses it with 400 or 431, as before)."""


class Hot(NamedTuple):
    route: str
    decode: Callable[[bytes], oa.ChatCompletionRequest | oa.CompletionRequest]
    kind: oa.Kind
    guard: Guard


class Head(NamedTuple):
    """A hot request's head, framed: its route, headers, where its body starts, its length."""

    hot: Hot
    headers: CIMultiDictProxy[str]
    body_start: int
    length: int
    close: bool
    """The client sent ``Connection: close``: the connection ends with the answer."""


INCOMPLETE = "incomplete"
""":meth:`HotRoutes.parse`: the head has not all arrived yet."""

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_VALUE = r"[^\x00-\x08\x0a-\x1f\x7f]*"
_FIELD = re.compile(rf"^({_TOKEN}):[ \t]*({_VALUE})\r\n", re.MULTILINE)
"""One well-formed header line (a line that is not matches nothing: the count of matches tells)."""
_SERVER = "Server: " + SERVER_SOFTWARE
_REASONS = {s.value: s.phrase for s in HTTPStatus}


class HotRequest(dict):  # type: ignore[type-arg]
    """What the shared steps read of a request (``app.RequestView``), for one framed here: its
    state (``request[KEY]``, ``request.get(KEY)``) is the dict itself, read and written in C, not
    through a Python method per access (about eight a request)."""

    __slots__ = ("app", "headers", "remote", "path")

    method = "POST"

    def __init__(self, app: web.Application, headers: CIMultiDictProxy[str], remote: str | None, path: str) -> None:
        self.app = app
        self.headers = headers
        self.remote = remote
        self.path = path


class Connection(Protocol):
    """What a hot request needs of its connection (``server._Guarded``)."""

    relaying: bool

    def send(self, data: bytes) -> None: ...

    def write(self, data: bytes) -> Awaitable[None]: ...

    def done(self) -> None: ...


def head_bytes(status: int, headers: dict[str, str], length: int | None, close: bool) -> bytes:
    """An answer's status line and headers: ``Content-Length`` when ``length`` is known, else chunked."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, '')}", *[f"{k}: {v}" for k, v in headers.items()],
             f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked",
             "Date: " + rfc822_formatted_time(), _SERVER]
    if close:
        lines.append("Connection: close")
    text = "\r\n".join(lines) + "\r\n\r\n"
    if text.count("\n") != len(lines) + 1:  # a value with a line break would forge headers
        raise ValueError("a response header value holds a line break")
    return text.encode()


class ChunkedSink:
    """A stream's body in chunked encoding, the answer's head going out with its first bytes."""

    __slots__ = ("conn", "head")

    def __init__(self, conn: Connection, head: bytes) -> None:
        self.conn = conn
        self.head = head

    async def write(self, data: bytes) -> None:
        if data:
            frame = b"%x\r\n%b\r\n" % (len(data), data)
            if self.head:
                frame, self.head = self.head + frame, b""
            await self.conn.write(frame)

    async def write_eof(self, data: bytes = b"") -> None:
        frame = (b"%x\r\n%b\r\n" % (len(data), data) if data else b"") + b"0\r\n\r\n"
        if self.head:
            frame, self.head = self.head + frame, b""
        await self.conn.write(frame)


def parse(buf: bytes, lines: dict[bytes, Hot], max_body_bytes: int) -> Head | str | None:
    """The head at the start of ``buf``: a :class:`Head`, :data:`INCOMPLETE`, or None when the
    request is not one to serve here (Rule 2); ``lines``: the hot routes by request line."""
    end = buf.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES)
    if end < 0:
        line_end = buf.find(b"\n")
        if line_end >= 0 and (buf[:line_end].rstrip(b"\r") not in lines or b"\n\n" in buf):
            return None  # not a hot route, or bare line feeds: aiohttp reads it (and answers it)
        return INCOMPLETE if len(buf) < MAX_HEAD_BYTES else None
    line_end = buf.find(b"\r\n")
    hot = lines.get(buf[:line_end])
    if hot is None:
        return None
    block = buf[line_end + 2:end + 2].decode("utf-8", "surrogateescape")
    fields = _FIELD.findall(block)
    if len(fields) != block.count("\n") or " \r" in block or "\t\r" in block:
        return None  # a malformed line, or a value with trailing blanks (aiohttp strips them)
    headers = CIMultiDict(fields)
    if "Transfer-Encoding" in headers or "Expect" in headers or "Upgrade" in headers:
        return None
    lengths = headers.getall("Content-Length", ())
    if len(lengths) != 1 or not (lengths[0].isascii() and lengths[0].isdigit()):
        return None
    length = int(lengths[0])
    if length > max_body_bytes:
        return None
    close = False
    connection = headers.get("Connection")
    if connection is not None:
        connection = connection.lower()
        if connection == "close":
            close = True
        elif connection != "keep-alive":
            return None
    return Head(hot, CIMultiDictProxy(headers), end + 4, length, close)


class HotRoutes:
    """The hot routes of one gateway: framing (:meth:`parse`) and serving (:meth:`serve`).

    ``served`` and ``handed`` count requests answered here and connections handed to aiohttp.
    """

    def __init__(self, app: web.Application, loop: asyncio.AbstractEventLoop) -> None:
        services = app[SERVICES]
        self.app = app
        self.loop = loop
        self.clock = services.clock
        self.max_body_bytes = services.config.max_body_bytes
        self.lines: dict[bytes, Hot] = {}
        for route, decode, kind in (("/v1/chat/completions", oa.decode_chat_request, "chat"),
                                    ("/v1/completions", oa.decode_completion_request, "completion")):
            self.lines[f"POST {route} HTTP/1.1".encode()] = Hot(
                route, decode, cast(oa.Kind, kind), Guard(services, route, public=False))
        self.served = 0
        self.handed = 0

    def __repr__(self) -> str:
        return f"<HotRoutes served={self.served} handed={self.handed}>"

    def parse(self, buf: bytes) -> Head | str | None:
        return parse(buf, self.lines, self.max_body_bytes)

    async def serve(self, conn: Connection, head: Head, body: bytes, remote: str | None,
                    read_at: float | None = None) -> None:
        """Answer one hot request on ``conn`` (then ``conn.done()``), as aiohttp's handler would;
        ``read_at``: when its bytes were read off the connection (``app.ARRIVED``)."""
        hot = head.hot
        guard = hot.guard
        request = HotRequest(self.app, head.headers, remote, hot.route)
        if read_at is not None:
            request[ARRIVED] = read_at
        rid, echo, started, bound = guard.enter(request)
        status = 500
        self.served += 1
        out: openai.Whole | openai.Streamed | None = None
        try:
            try:
                try:
                    guard.check(request)
                except UnknownKey:
                    await guard.check_again(request)
                began = arrived(request, self.clock.monotonic())
                out = await openai.answer(request, hot.decode(body), hot.kind, began)
                answer = head_bytes(200, out.headers, len(out.body) if isinstance(out, openai.Whole) else None,
                                    head.close)
            except Exception as exc:
                if isinstance(out, openai.Streamed):
                    await aclose(out.messages)  # its head could not be written: the site is told to stop
                reply = guard.refusal(exc, request, rid, echo)
                status = reply.status
                conn.send(head_bytes(status, reply.headers, len(reply.body), head.close) + reply.body)
                return
            status = 200
            if isinstance(out, openai.Whole):
                conn.send(answer + out.body)
                return
            conn.relaying = True
            try:
                await openai.relay(out, ChunkedSink(conn, answer))
            except asyncio.CancelledError:
                pass  # the client went away (Rule 3): the relay told the site to stop
        finally:
            guard.leave(request, rid, echo, status, started, bound)
            conn.done()
