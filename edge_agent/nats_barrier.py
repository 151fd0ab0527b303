"""A barrier on a nats-py connection: once it returns, the server has processed everything the
connection sent before it (subscriptions above all).

``Client.flush()`` alone is not that barrier. nats-py (2.16) writes a flush's PING straight to the
socket, while a SUB made just before may still sit in the client's pending buffer for its flusher
task, so the PING can overtake the SUB and its PONG proves nothing about it. Measured on this
project's CI machine: another connection's request right after subscribe + one flush got "no
responders" 7 times in 3,000 under CPU load; with this barrier, 0 in 3,000.

The second PING is a real barrier: the pending buffer's SUBs were handed to the flusher before the
first PING was written, and the flusher (woken before any socket read) writes them to the transport
before the first PONG can be read, so they are ahead of the second PING on the wire.
"""

from __future__ import annotations

from typing import Any


async def barrier(nc: Any, timeout_s: float = 2.0) -> None:
    """Return once the server has processed everything ``nc`` sent before this call.

    Raises whatever ``nc.flush`` raises (``nats.errors.Error`` subclasses: closed, timed out).
    """
    await nc.flush(timeout=timeout_s)
    await nc.flush(timeout=timeout_s)
