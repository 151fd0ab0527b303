"""A streamed request served with no task: sent from the NATS callback on a kept-alive backend
connection, each piece of text published from the connection's callback as it comes.

The streamed counterpart of the plain requests :meth:`InferenceService.start_now
<edge_agent.inference.InferenceService.start_now>` serves (a backend with ``stream_now``:
``openai-http`` with an idle connection), with the same promises as a stream served in a task:

- Chunks go out numbered 0, 1, ... as the backend hands them on, the first stating the site's own
  time to it (``InferChunk.site_ms``, the hub's overhead estimate); the first chunk stands for the
  acknowledgement (a delayed ``InferAccepted`` is then not sent). Then one final answer.
- A chunk that cannot be published (the site's NATS link is down) ends the stream: the backend
  call is given up, its slot freed, and the hub told once the link is back
  (:meth:`InferenceService._tell_broken`), as the task's way does.
- Deadline, cancellation and the agent's stop are the plain requests' (the connection's timer,
  ``InferenceService.cancel``, ``InferenceService.stop_now``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from edge_agent import wire
from edge_agent.errors import BackendError
from edge_agent.exchange import Exchange
from edge_agent.logs import log

if TYPE_CHECKING:
    from edge_agent.bus import Incoming
    from edge_agent.inference import InferenceService
    from edge_agent.inventory import Replica


class StreamExchange(Exchange):
    """One streamed request served with no task (``conn``: the backend's call)."""

    __slots__ = ("index", "open")

    def __init__(self, service: InferenceService, msg: Incoming, request: wire.InferRequest, replica: Replica,
                 started: float, timeout_s: float) -> None:
        super().__init__(service, msg, request, replica, started, timeout_s)
        self.conn: Any = None
        self.index = 0
        self.open = True
        """Its slot is still held (cleared once, by :meth:`_close`)."""

    def send(self, text: str) -> bool:
        """Publish ``text`` as the next chunk (the backend's ``on_text``); False when the stream
        broke (the call is given up, the hub told later)."""
        service = self.service
        site_ms = None
        if self.index == 0:
            self.pending = False  # the first chunk says it all
            site_ms = round((service.clock.monotonic() - self.started) * 1000.0, 3)
        body = wire.encode(wire.InferChunk(request_id=self.request.request_id, index=self.index, text=text,
                                           site_ms=site_ms))
        if service.bus.publish_nowait(self.msg.reply, body):
            self.index += 1
            return True
        self._broken()
        return False

    def done(self, call: Any) -> None:
        """The backend's answer ended (the connection's callback): the rest of it, then the result."""
        service = self.service
        self._close()
        try:
            completion = call.finish()
        except BackendError as exc:
            service._failed_now(self, exc)
            return
        if completion is None:
            service._again_now(self)
            return
        if call.rest and not self.send(call.rest):
            return
        service.reply_soon(self.msg.reply, service._result(
            self.request, completion, (service.clock.monotonic() - self.started) * 1000.0))

    def _close(self) -> None:
        if self.open:
            self.open = False
            self.service._close_now(self)

    def _broken(self) -> None:
        service = self.service
        self._close()
        self.conn.abort()
        service.counters["reply_failures"] += 1
        log(logging.WARNING, "infer_stream_broken", site=service.site, request_id=self.request.request_id,
            error="the site's NATS link is down")
        service.spawn(service._tell_broken(self.msg.reply, self.request.request_id))
