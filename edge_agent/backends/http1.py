"""A lean HTTP/1.1 client for one site-local server: kept-alive connections on asyncio ``Protocol``s,
answers read by ``httptools`` (llhttp, the parser of Node.js).

The ``openai-http`` backend makes one POST per request to a server on the site's own network. A
general client (aiohttp) spends more CPU per call than the rest of the agent's path together (issue
#18 measured the agent at 9.6 k req/s with the ``sim`` backend and 3.8 k with ``openai-http``), so
this one does only what that call needs, and leaves reading HTTP to a parser made for it:

- ``http://`` and ``https://`` base URLs, one host; connections kept alive and reused (LIFO, at
  most ``max_idle`` idle ones kept); ``TCP_NODELAY`` (asyncio and uvloop set it on TCP sockets).
- Request: method, path, fixed headers given once, a body of bytes with ``Content-Length``.
- Response: status and the end of the body as llhttp reads them (``Content-Length``, chunked
  transfer encoding, or until the server closes; interim 1xx answers skipped); the body read whole
  (:meth:`Response.read`) or piece by piece as it arrives (:meth:`Response.pieces`, for
  server-sent events). A head longer than 64 KiB is refused.
- A connection the server closed while idle is noticed and dropped; a request whose reused
  connection closes before any byte of the answer came is sent once more on a new connection
  (the server cannot have started answering it), as browsers do.

A request can also be sent with no coroutine at all (:meth:`Http1Pool.send_now`, on an idle
connection): the connection calls back when the answer ended, and :meth:`Http1Pool.finish_now`
reads it (the agent's plain requests, with no task each).

Failures are exceptions the caller maps: :class:`OSError` (refused, reset, closed mid-answer:
:class:`Disconnected`), :class:`TimeoutError`, :class:`BadResponse` (not HTTP/1.x).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

import httptools


class Disconnected(ConnectionError):
    """The server closed the connection before the answer was complete."""


class BadResponse(ValueError):
    """What the server sent is not an HTTP/1.x answer this client can read."""


_HEAD_LIMIT = 64 * 1024
_CRLF = b"\r\n"

# Exchange states: awaiting the head, reading the body, done (or idle)
_HEAD, _BODY, _DONE = range(3)


class _Connection(asyncio.Protocol):
    """One TCP connection, one exchange at a time; ``httptools`` (llhttp) reads the answers."""

    __slots__ = ("pool", "loop", "transport", "parser", "state", "head_bytes", "status", "reason", "keep_alive",
                 "framed", "pieces", "waiter", "error", "lost", "used", "got_bytes", "wait_until", "timer", "timer_at",
                 "on_done", "on_piece")

    def __init__(self, pool: Http1Pool) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.state = _DONE
        self.head_bytes = 0
        """Bytes received while the head was awaited (bounded by ``_HEAD_LIMIT``)."""
        self.status = 0
        self.reason = ""
        self.keep_alive = True
        self.framed = False
        """Whether the answer's head said how its body ends (a length or chunks), not the close."""
        self.pieces: deque[bytes] = deque()
        self.waiter: asyncio.Future[bool] | None = None
        """Set (False) when bytes or the end came; True when the wait timed out."""
        self.error: BaseException | None = None
        self.lost = False
        self.used = False
        """Whether an exchange already ran on this connection (a fresh one is never retried)."""
        self.got_bytes = False
        self.wait_until: float | None = None
        """When the wait now under way times out (loop time; None: it does not)."""
        self.timer: asyncio.TimerHandle | None = None
        """The connection's one timer, due at ``timer_at``: it is not re-armed for each wait (see
        :meth:`wait`)."""
        self.timer_at = 0.0
        self.on_done: Callable[[_Connection], None] | None = None
        """Called (once) when an exchange sent with :meth:`Http1Pool.send_now` ended: answered,
        failed or timed out (no coroutine waits for it)."""
        self.on_piece: Callable[[_Connection], None] | None = None
        """Called when more of the body of such an exchange came before its end (a stream read as it
        comes: :meth:`Http1Pool.send_now` with ``on_piece``); the new bytes are in ``pieces``."""

    # -- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.state == _DONE:
            # Bytes nobody asked for (a server speaking out of turn): this connection is unusable.
            self._unusable()
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
            if self.state == _HEAD:  # all of it was head (a body, even in the same read, is not counted)
                self.head_bytes += len(data)
                if self.head_bytes > _HEAD_LIMIT:
                    raise BadResponse("response head too long")
        except BadResponse as exc:
            self._fail(exc)
            self._unusable()
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            self._fail(cause if isinstance(cause, BadResponse) else BadResponse(f"not an HTTP/1.x answer: {exc}"))
            self._unusable()
            return
        self._wake()

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.pool._forget(self)
        if self.state == _BODY and not self.framed:  # a body that ends with the connection
            self.state = _DONE
            self.keep_alive = False
            self._wake()
        elif self.state != _DONE:
            self._fail(Disconnected(f"the server closed the connection ({exc or 'end of stream'})"))

    # -- httptools callbacks (called from ``feed_data``)

    def on_message_begin(self) -> None:
        if self.state == _DONE:  # more than one answer to one request
            raise BadResponse("data after the end of the response")

    def on_status(self, status: bytes) -> None:
        self.reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) in (14, 17) and name.lower() in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            return  # an interim answer (100 Continue): the real head follows
        self.status = status
        self.state = _BODY
        if status in (204, 304):
            self.framed = True

    def on_body(self, body: bytes) -> None:
        self.pieces.append(body)

    def on_message_complete(self) -> None:
        if self.state == _HEAD:
            return  # the end of an interim answer
        self.keep_alive = self.parser.should_keep_alive()
        self.state = _DONE

    # -- the exchange

    def _unusable(self) -> None:
        self.keep_alive = False
        if self.transport is not None:
            self.transport.close()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(False)
        elif self.state == _DONE and self.on_done is not None:
            on_done, self.on_done = self.on_done, None
            self.on_piece = None
            self.wait_until = None
            on_done(self)
        elif self.on_piece is not None and self.pieces and self.state == _BODY:
            self.on_piece(self)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.state = _DONE
        self.keep_alive = False
        self._wake()

    def start(self, data: bytes) -> None:
        self.state = _HEAD
        self.head_bytes = 0
        self.status = 0
        self.framed = False
        self.error = None
        self.got_bytes = False
        self.keep_alive = True
        self.pieces.clear()
        assert self.transport is not None
        self.transport.write(data)

    async def wait(self, timeout_s: float | None) -> None:
        """Until more of the answer came, it ended, or it failed (raised); ``timeout_s`` bounds it.

        The bound is kept by one timer per connection, not one per wait: a wait only notes when it
        times out, and arms the timer if none is due by then. When the timer fires it times out the
        wait under way if that one is due, else re-arms for it (or, with nothing waiting, lapses).
        With a constant timeout each wait is due later than the one before, so a request (or a
        streamed piece) costs no timer of its own: the timer fires about once per timeout."""
        loop = self.loop
        waiter = self.waiter = loop.create_future()
        if timeout_s is not None:
            until = self.wait_until = loop.time() + timeout_s
            if self.timer is None or self.timer_at > until:
                if self.timer is not None:
                    self.timer.cancel()
                self.timer_at = until
                self.timer = loop.call_at(until, self._on_timer)
        else:
            self.wait_until = None
        try:
            timed_out = await waiter
        finally:
            self.waiter = None
            self.wait_until = None
        if timed_out:
            raise TimeoutError

    def arm(self, timeout_s: float) -> None:
        """Bound the exchange under way (or the wait) by ``timeout_s`` from now (see :meth:`wait`)."""
        until = self.wait_until = self.loop.time() + timeout_s
        if self.timer is None or self.timer_at > until:
            if self.timer is not None:
                self.timer.cancel()
            self.timer_at = until
            self.timer = self.loop.call_at(until, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        waiter, until = self.waiter, self.wait_until
        if until is None or (waiter is None and self.on_done is None) or (waiter is not None and waiter.done()):
            return  # nothing waits with a bound now: the next such wait arms the timer again
        if self.loop.time() + _TIMER_SLACK_S >= until:
            if waiter is not None:
                waiter.set_result(True)  # timed out
            else:  # an exchange with no coroutine: it ends in a timeout
                self._fail(TimeoutError())
                self._unusable()
        else:
            self.timer_at = until
            self.timer = self.loop.call_at(until, self._on_timer)


_TIMER_SLACK_S = 0.001
"""Loop timers are kept in whole milliseconds: a wait due within one of now has timed out."""


class Response:
    """An answer whose head has arrived; its body follows (read it, or close the response)."""

    __slots__ = ("status", "reason", "_conn", "_pool", "_timeout_s", "_deadline")

    def __init__(self, conn: _Connection, pool: Http1Pool, timeout_s: float | None, deadline: float | None) -> None:
        self.status = conn.status
        self.reason = conn.reason
        self._conn: _Connection | None = conn
        self._pool = pool
        self._timeout_s = timeout_s
        self._deadline = deadline

    @property
    def whole(self) -> bool:
        """Whether the whole answer is here already (its end came, nothing failed): reading it
        will not wait."""
        conn = self._conn
        return conn is not None and conn.state == _DONE and conn.error is None

    def _wait_s(self) -> float | None:
        if self._deadline is None:
            return self._timeout_s
        return max(self._deadline - self._pool.loop().time(), 0.0)

    async def pieces(self) -> AsyncIterator[bytes]:
        """The body as it arrives, each piece all that has come since the last (each wait bounded by
        the request's timeout). Read to its end, the connection goes back to the pool; left early,
        :meth:`close` decides."""
        conn = self._conn
        if conn is None:
            return
        while True:
            if conn.pieces:  # what has come so far, as one piece (however the server chunked it)
                pieces = conn.pieces
                piece = pieces.popleft() if len(pieces) == 1 else b"".join(pieces)
                pieces.clear()
                yield piece
                continue
            if conn.error is not None:
                self.close()
                raise conn.error
            if conn.state == _DONE:
                break
            try:
                await conn.wait(self._wait_s())
            except TimeoutError:
                self.close()
                raise
        self.close()

    async def read(self) -> bytes:
        """The whole body."""
        conn = self._conn
        if conn is not None and self.whole:
            # The usual case: the whole answer came with its head (no async generator to run).
            pieces = conn.pieces
            body = pieces.popleft() if len(pieces) == 1 else b"".join(pieces)
            pieces.clear()
            self.close()
            return body
        parts = [piece async for piece in self.pieces()]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        """Give the connection back if the answer was read to its end, else close it."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.state == _DONE and not conn.pieces and conn.error is None and conn.keep_alive and not conn.lost:
            self._pool._release(conn)
        else:
            conn.state = _DONE
            if conn.transport is not None:
                conn.transport.close()


class Http1Pool:
    """Kept-alive connections to one ``base_url`` (``http://host:port`` or ``https://...``).

    Args:
        base_url: scheme, host and port (a path in it is prefixed to every request's path).
        headers: sent with every request (e.g. ``Authorization``).
        max_idle: idle connections kept for reuse; more are closed when given back.
    """

    def __init__(self, base_url: str, headers: dict[str, str] | None = None, *, max_idle: int = 64) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = parts.hostname
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.prefix = parts.path.rstrip("/")
        default_port = self.port == (443 if self.tls else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        host_header = host if default_port else f"{host}:{self.port}"
        fixed = {"Host": host_header, "User-Agent": "cpn-agent", **(headers or {})}
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed.items()).encode("latin-1")
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if self.tls else None
        self.max_idle = max_idle
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self.opened = 0
        """Connections opened so far (tests: reuse means this stays small)."""
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"<Http1Pool {self.host}:{self.port} idle={len(self._idle)} open={len(self._all)}>"

    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop this pool's connections live in (kept: ``asyncio.get_running_loop()`` costs a
        ``getpid`` system call on Python 3.11); another one once every connection is gone."""
        loop = self._loop
        if loop is None or (not self._all and loop is not asyncio.get_running_loop()):
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def _release(self, conn: _Connection) -> None:
        if len(self._idle) >= self.max_idle:
            assert conn.transport is not None
            conn.transport.close()
            return
        self._idle.append(conn)

    async def _open(self, timeout_s: float | None) -> _Connection:
        loop = self.loop()
        connect = loop.create_connection(lambda: _Connection(self), self.host, self.port, ssl=self._ssl)
        _, conn = await (asyncio.wait_for(connect, timeout_s) if timeout_s is not None else connect)
        self.opened += 1
        self._all.add(conn)
        return conn

    def _encode(self, method: str, path: str, body: bytes, content_type: str) -> bytes:
        head = f"{method} {self.prefix}{path} HTTP/1.1\r\n".encode("latin-1") + self._fixed
        if body or method in ("POST", "PUT", "PATCH"):
            head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n".encode("latin-1")
        return head + _CRLF + body

    async def request(self, method: str, path: str, body: bytes = b"", *, timeout_s: float | None = None,
                      total: bool = True, content_type: str = "application/json") -> Response:
        """Send one request and return once the answer's head has arrived.

        ``timeout_s`` bounds connecting, then the whole exchange (``total``) or each wait for more
        of the answer (not ``total``: a long stream whose pieces keep coming).
        """
        loop = self.loop()
        deadline = loop.time() + timeout_s if timeout_s is not None and total else None
        data = self._encode(method, path, body, content_type)
        while True:
            conn = None
            while self._idle:
                candidate = self._idle.pop()
                if not candidate.lost:
                    conn = candidate
                    break
            if conn is None:
                conn = await self._open(timeout_s)
            retry = conn.used
            conn.used = True
            conn.start(data)
            try:
                while conn.state == _HEAD and conn.error is None:
                    wait = timeout_s if deadline is None else max(deadline - loop.time(), 0.0)
                    await conn.wait(wait)
                if conn.error is not None:
                    raise conn.error
            except Disconnected:
                if conn.transport is not None:
                    conn.transport.close()
                if retry and not conn.got_bytes:
                    continue  # a kept-alive connection the server had closed: once more, on a new one
                raise
            except BaseException:
                conn.state = _DONE
                if conn.transport is not None:
                    conn.transport.close()
                raise
            return Response(conn, self, timeout_s, deadline)

    def send_now(self, method: str, path: str, body: bytes, on_done: Callable[[_Connection], None], *,
                 timeout_s: float, content_type: str = "application/json",
                 on_piece: Callable[[_Connection], None] | None = None) -> _Connection | None:
        """Send one request on an idle kept-alive connection, with no coroutine: ``on_done(conn)`` is
        called once when the answer ended (whole, failed or after ``timeout_s``); read it with
        :meth:`finish_now`. None, having sent nothing, when no idle connection is open (the caller
        takes :meth:`request`, which opens one).

        With ``on_piece`` (a stream read as it comes), ``on_piece(conn)`` is called each time more
        of the body came before its end: it takes what came from ``conn.pieces`` (what is left there
        at the end is :meth:`finish_now`'s), and may bound the wait for the next with :meth:`rearm`."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.lost:
                break
        else:
            return None
        conn.used = True
        conn.start(self._encode(method, path, body, content_type))
        conn.on_done = on_done
        conn.on_piece = on_piece
        conn.arm(timeout_s)
        return conn

    def deadline(self, timeout_s: float) -> float:
        """The loop time ``timeout_s`` from now (for :meth:`rearm`)."""
        return self.loop().time() + timeout_s

    @staticmethod
    def rearm(conn: _Connection, timeout_s: float, deadline: float) -> None:
        """Bound an exchange :meth:`send_now` started by ``timeout_s`` from now, and by ``deadline``
        (:meth:`deadline`), whichever comes first (a stream: the wait for its next piece)."""
        conn.arm(min(timeout_s, max(deadline - conn.loop.time(), 0.0)))

    @staticmethod
    def fail_now(conn: _Connection, exc: BaseException) -> None:
        """End an exchange :meth:`send_now` started with ``exc`` (its ``on_done`` is called, and
        :meth:`finish_now` raises it)."""
        conn._fail(exc)
        conn._unusable()

    def finish_now(self, conn: _Connection) -> tuple[int, bytes]:
        """The status and whole body of an exchange :meth:`send_now` reported ended, the connection
        given back (or closed); raises its failure (:class:`Disconnected`: ``conn.got_bytes`` says
        whether the server had started answering, i.e. whether sending it again is safe)."""
        error = conn.error
        if error is not None:
            if conn.transport is not None:
                conn.transport.close()
            raise error
        pieces = conn.pieces
        body = pieces.popleft() if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        if conn.keep_alive and not conn.lost:
            self._release(conn)
        elif conn.transport is not None:
            conn.transport.close()
        return conn.status, body

    def abort(self, conn: _Connection) -> None:
        """Give up an exchange :meth:`send_now` started (its ``on_done`` is not called)."""
        conn.on_done = conn.on_piece = None
        conn.state = _DONE
        conn.keep_alive = False
        if conn.transport is not None:
            conn.transport.close()

    async def close(self) -> None:
        """Close every connection (idle or in use)."""
        conns = list(self._all)
        self._idle.clear()
        self._all.clear()
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()
        if conns:
            await asyncio.sleep(0)  # let the transports' connection_lost run
