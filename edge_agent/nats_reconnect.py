"""Which NATS server a connection that lost its own tries next (the hub's and the agent's).

nats-py, left to itself, shuffles its server pool and may well pick the server it just left. After a
crash that costs one refused connect (cheap), but after a *freeze* (a paused or hung server, its
sockets still open) it costs a whole ``connect_timeout``: the kernel accepts the TCP connection and
nobody ever sends INFO. :func:`next_server` is a ``reconnect_to_server_handler`` policy:

- Rule 1: never the server just left (or just failed), while another is in the pool;
- Rule 2: of the others, the one with the fewest failed attempts since it last worked;
- Rule 3: a server that has not failed since it last worked is tried at once; one that has, after
  ``wait_s`` (nats-py's own back-off), plus up to ``jitter_s`` of random extra wait so that many
  clients do not reconnect in lockstep.

Pure: the caller passes the pool (nats-py's ``Server`` snapshots: ``uri.netloc`` and
``reconnects``), the server it left and its random draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

S = TypeVar("S")


def next_server(servers: Sequence[S], left: str, *, wait_s: float, jitter: float = 0.0) -> tuple[S, float]:
    """(server to try, seconds to wait first), by the rules above.

    Args:
        servers: the eligible servers (non-empty), each with ``uri.netloc`` and ``reconnects``.
        left: ``host:port`` of the server the connection just left or just failed ("" if unknown).
        wait_s: back-off before a server that failed since it last worked.
        jitter: random extra wait already drawn by the caller (seconds).
    """
    others = [s for s in servers if _netloc(s) != left] or list(servers)
    server = min(others, key=_reconnects)
    return server, (0.0 if _reconnects(server) == 0 else wait_s) + jitter


def current_netloc(client: Any) -> str:
    """``host:port`` of the server a nats-py client is (or was last) connected to, "" if none.

    nats-py keeps it in a private attribute (``_current_server``), still the old server while the
    reconnect handler runs; read here only."""
    server = getattr(client, "_current_server", None)
    uri = getattr(server, "uri", None)
    return str(getattr(uri, "netloc", "") or "")


def _netloc(server: Any) -> str:
    return str(server.uri.netloc)


def _reconnects(server: Any) -> int:
    return int(server.reconnects)
