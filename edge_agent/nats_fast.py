"""The inference hot path's two shortcuts through nats-py (2.16), shared by the hub and the agent.

nats-py is built for any caller; the inference path pays for that on every message:

- Delivery: a subscription with a callback puts each message on an ``asyncio.Queue`` that a task
  of its own takes it from, to ``await`` the callback: a queue put, a task wake-up, a queue get and
  a coroutine per message, and one more pass of the event loop before anything happens.
  :class:`Dispatch` takes the other way nats-py delivers, the one-shot "old style request" future
  (``subscribe(future=...)``): nats-py calls its ``set_result(msg)`` from its reader, at once,
  and :class:`Dispatch` hands the message to a plain function. Such a handler must not block (it
  spawns a task for real work), and an exception it raises is caught here (nats-py's reader must
  not die of it). A plain message (no headers) to such a subscription skips nats-py's general
  message processing too (:func:`_install_fast_delivery`) and arrives as a :class:`Plain`.
- Sending: ``publish`` appends the command to the client's pending buffer and kicks a flusher task
  through another queue, with a fresh future per call. :func:`publish_soon` appends the same bytes
  to the same buffer (so order with everything else the client sends is kept) and schedules one
  write of the whole buffer for the end of this pass of the event loop: what several requests
  publish in one pass still goes out in one system call, as before.

Both fall back to nats-py's own path whenever the connection is not plainly up (connecting,
reconnecting, draining, closed), so buffering and errors during outages are nats-py's, unchanged.
Measured, hub + agent + nats-server CPU per 1,000 requests (README peers bench): see the commit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

_log = logging.getLogger("cpn.nats")


class Dispatch:
    """A stand-in for the future of ``nc.subscribe(subject, future=...)`` that never completes:
    each message nats-py hands it goes to ``handler`` synchronously (see the module's text).

    ``errors`` counts the handler's exceptions (each also logged)."""

    __slots__ = ("handler", "errors")

    def __init__(self, handler: Callable[[Any], None]) -> None:
        self.handler = handler
        self.errors = 0

    def __bool__(self) -> bool:  # nats-py tests ``if sub._future:``
        return True

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False

    def set_result(self, msg: Any) -> None:
        try:
            self.handler(msg)
        except Exception:
            self.errors += 1
            _log.exception("event=nats_handler_failed subject=%s", getattr(msg, "subject", "?"))


class Plain:
    """A message without headers handed to a :class:`Dispatch` handler: what such handlers read
    of nats-py's ``Msg`` (``subject``, ``reply``, ``data``, ``headers``), built for a fraction of
    its cost (:func:`_fast_process_msg`)."""

    __slots__ = ("subject", "reply", "data")

    headers = None

    def __init__(self, subject: str, reply: str, data: bytes) -> None:
        self.subject = subject
        self.reply = reply
        self.data = data

    def __repr__(self) -> str:
        return f"<Plain subject={self.subject!r} reply={self.reply!r} {len(self.data)} bytes>"


def _install_fast_delivery(nc: Any) -> None:
    """Route nats-py's reader past its general ``_process_msg`` for plain messages to a
    :class:`Dispatch` (once per client): nats-py's own handles everything else as before."""
    if getattr(nc, "_fast_delivery", False):
        return
    general = nc._process_msg
    subs = nc._subs
    stats = nc.stats

    async def process_msg(sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        # nats-py's path for one of these: two coroutines, its JetStream checks, and a dataclass
        # Msg of eight fields; here one attribute check and a three-slot message.
        sub = subs.get(sid)
        if headers or sub is None or type(sub._future) is not Dispatch or sub._max_msgs > 0 or sub._jsi:
            await general(sid, subject, reply, data, headers)
            return
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        sub._received += 1
        sub._future.set_result(Plain(subject.decode(), reply.decode(), data))

    nc._process_msg = process_msg
    nc._fast_delivery = True


async def subscribe_now(nc: Any, subject: str, handler: Callable[[Any], None]) -> Any:
    """Subscribe ``handler`` to ``subject`` on nats-py client ``nc`` through a :class:`Dispatch`;
    returns nats-py's ``Subscription`` (unsubscribe, re-subscribed after reconnects as any other).

    A plain message (no headers) reaches ``handler`` as a :class:`Plain`; one with headers (a
    no-responders status, say) as nats-py's ``Msg``: both have ``subject``, ``reply``, ``data``
    and ``headers``."""
    _install_fast_delivery(nc)
    future: Any = Dispatch(handler)
    return await nc.subscribe(subject, future=future)


def _write_pending(nc: Any) -> None:
    nc._fast_flush_due = False
    if nc._pending_data_size > 0 and nc.is_connected:
        transport = nc._transport
        if transport is None:
            return
        try:
            transport.writelines(nc._pending)
        except OSError:
            return  # the flusher and the reader see the broken connection and handle it
        nc._pending = []
        nc._pending_data_size = 0


def publish_soon(nc: Any, subject: str, data: bytes, reply: str = "") -> bool:
    """Queue a plain PUB (no headers) on a connected nats-py client and write it (with whatever
    else is pending) at the end of this pass of the event loop.

    Returns False, having sent nothing, when the client is not plainly connected or the message
    is larger than the server takes: the caller then uses ``await nc.publish(...)`` (nats-py's
    buffering and errors)."""
    if not nc.is_connected or len(data) > nc._max_payload:
        return False
    cmd = b"".join((b"PUB ", subject.encode(), b" ", reply.encode(), b" ", str(len(data)).encode(), b"\r\n",
                    data, b"\r\n"))
    nc._pending.append(cmd)
    nc._pending_data_size += len(cmd)
    stats = nc.stats
    stats["out_msgs"] += 1
    stats["out_bytes"] += len(data)
    if not getattr(nc, "_fast_flush_due", False):
        nc._fast_flush_due = True
        asyncio.get_running_loop().call_soon(_write_pending, nc)
    return True
