"""Delivering attempt events from the outbox to the JetStream stream ``CPN_EVENTS``.

Each event is sent as a plain NATS *request* on ``wire.event_subject(site)`` with the header
``Nats-Msg-Id`` of :func:`wire.event_msg_id` (``job:attempt:seq:<keyed hash>``); the stream
answers with its PubAck JSON (``{"stream": ..., "seq": N, "duplicate": true?}``), which is all
``js.publish`` does, without needing JetStream API permissions on the site's credentials.

Promises: events go out one at a time in outbox order; an event leaves the outbox only when a
PubAck (including a duplicate one) names it stored; on no-responders (no stream yet), timeouts,
disconnects or a JetStream error the same event is retried after a capped, jittered backoff, and at
once after a reconnect. Nothing is ever dropped here.
"""

from __future__ import annotations

import asyncio
import logging
import random

import msgspec

from edge_agent.bus import AgentBus
from edge_agent.errors import BusError, NoResponders, NotConnected
from edge_agent.logs import log
from edge_agent.outbox import Outbox

MSG_ID_HEADER = "Nats-Msg-Id"


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


_puback_decoder = msgspec.json.Decoder(PubAck)


class EventPublisher:
    """Drains an :class:`Outbox` into JetStream over an :class:`AgentBus`."""

    def __init__(self, bus: AgentBus, outbox: Outbox, *, timeout_s: float = 2.0, backoff_max_s: float = 5.0,
                 rng: random.Random | None = None) -> None:
        self.bus = bus
        self.outbox = outbox
        self.timeout_s = timeout_s
        self.backoff_max_s = backoff_max_s
        self._rng = rng or random.Random()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self.counters = {"published": 0, "duplicates": 0, "retries": 0, "id_collisions": 0}
        # Ids sent at least once and not yet acknowledged; recovered entries may have been sent by
        # an earlier run. A duplicate PubAck for an id sent for the first time is a collision.
        self._tried: set[str] = {e.msg_id for e in outbox}
        self.last_error = ""
        bus.on_reconnected(self.kick)

    def __repr__(self) -> str:
        return f"<EventPublisher pending={len(self.outbox)} published={self.counters['published']} retries={self.counters['retries']}>"

    def kick(self) -> None:
        """Something changed (a new event, a reconnect): try now instead of after the backoff."""
        self._wake.set()

    async def wait_idle(self) -> None:
        """Return once the outbox is empty."""
        while len(self.outbox):
            self._idle.clear()
            await self._idle.wait()

    async def _pause(self, delay_s: float) -> None:
        try:  # asyncio.timeout: wait_for on 3.11 can swallow our cancellation
            async with asyncio.timeout(delay_s):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def run(self) -> None:
        """Publish until cancelled."""
        backoff_s = 0.1
        while True:
            entry = self.outbox.peek()
            if entry is None:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            self._wake.clear()
            try:
                if not self.bus.is_connected:
                    raise NotConnected("disconnected")
                first_try = entry.msg_id not in self._tried
                self._tried.add(entry.msg_id)
                raw = await self.bus.request(entry.subject, entry.body, timeout_s=self.timeout_s,
                                             headers={MSG_ID_HEADER: entry.msg_id})
                ack = _puback_decoder.decode(raw)
                if ack.error is not None:
                    raise BusError(f"JetStream refused {entry.msg_id}: {ack.error.code} {ack.error.description}")
                if not ack.stream:
                    raise BusError(f"no PubAck for {entry.msg_id}: {raw[:120]!r}")
            except (BusError, msgspec.DecodeError) as exc:
                self.counters["retries"] += 1
                reason = "no stream" if isinstance(exc, NoResponders) else str(exc)
                if reason != self.last_error:  # one line per kind of trouble, not one per retry
                    log(logging.WARNING, "event_publish_retry", site=self.bus.site, msg_id=entry.msg_id,
                        error=reason, pending=len(self.outbox))
                self.last_error = reason
                await self._pause(backoff_s * (0.5 + self._rng.random()))
                backoff_s = min(backoff_s * 2, self.backoff_max_s)
                continue
            self.outbox.ack(entry.msg_id)
            self._tried.discard(entry.msg_id)
            self.counters["published"] += 1
            if ack.duplicate:
                self.counters["duplicates"] += 1
                if first_try:
                    # JetStream held this id before we ever sent it: someone else published under it
                    # (a forged id, or a hub that sent no event_key) and our event was dropped.
                    self.counters["id_collisions"] += 1
                    log(logging.ERROR, "event_id_collision", site=self.bus.site, msg_id=entry.msg_id,
                        detail="JetStream already held this id: the hub may never see this event")
            if self.last_error:
                log(logging.INFO, "event_publish_resumed", site=self.bus.site, msg_id=entry.msg_id)
            self.last_error = ""
            backoff_s = 0.1
            log(logging.DEBUG, "event_published", site=self.bus.site, msg_id=entry.msg_id, stream_seq=ack.seq,
                duplicate=ack.duplicate)
