"""One request the agent serves with no task: the state a kept-alive backend connection's callbacks
need to answer it (:meth:`InferenceService.start_now <edge_agent.inference.InferenceService.start_now>`).

A plain request is answered whole from the connection's completion callback (:class:`Exchange`); a
streamed one also publishes each piece as it comes (:class:`edge_agent.stream_now.StreamExchange`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge_agent import wire
    from edge_agent.bus import Incoming
    from edge_agent.inference import InferenceService
    from edge_agent.inventory import Replica


class Exchange:
    """A plain request served with no task: sent on a kept-alive backend connection from the NATS
    callback, answered from the connection's completion callback."""

    __slots__ = ("service", "msg", "request", "replica", "started", "conn", "timeout_s", "ack_at", "pending")

    def __init__(self, service: InferenceService, msg: Incoming, request: wire.InferRequest, replica: Replica,
                 started: float, timeout_s: float) -> None:
        self.service = service
        self.msg = msg
        self.request = request
        self.replica = replica
        self.started = started
        self.timeout_s = timeout_s
        self.conn: object = None
        self.ack_at = 0.0
        self.pending = True
        """Neither an answer nor (for a stream) a first chunk went out yet: a delayed
        acknowledgement is still due."""

    def done(self, conn: object) -> None:
        """The backend's answer ended (the connection's callback)."""
        self.service._finish_now(self)
