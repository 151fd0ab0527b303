"""A small stand-in hub for agent tests: a real NATS peer written with plain nats-py.

It answers ``Register`` with ``RegisterAck`` (or stays silent / refuses, when told), keeps every
registration and heartbeat, sends infer requests and commands the way the hub does, and owns the
JetStream stream ``CPN_EVENTS`` so tests can read what agents published, with message ids.
It speaks only ``edge_agent.wire``: nothing from the real hub is used.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from edge_agent import wire
from edge_agent.nats_barrier import barrier
from tests.support.waiting import until

T = TypeVar("T")


async def wait_for(condition: Callable[[], T], timeout_s: float = 5.0, what: str = "condition",
                   interval_s: float = 0.02) -> T:
    """:func:`tests.support.waiting.until` that returns what ``condition`` returned when it held."""
    seen: list[T] = []

    def holds() -> T:
        seen[:] = [condition()]
        return seen[0]

    await until(holds, timeout_s, what, interval_s=interval_s)
    return seen[0]


@dataclass
class StreamedEvent:
    msg_id: str
    subject: str
    event: wire.AttemptStarted | wire.Checkpointed | wire.AttemptExited


class FakeHub:
    """Plays the hub against a real nats-server. Use ``async with FakeHub(url) as hub``."""

    def __init__(self, url: str, *, heartbeat_s: float = 0.2, name: str = "fakehub", user: str = "",
                 password: str = "") -> None:
        self.url = url
        self.user = user
        self.password = password
        self.heartbeat_s = heartbeat_s
        self.name = name
        self.nc: Client | None = None
        self.registrations: list[wire.Register] = []
        self.heartbeats: dict[str, list[wire.Heartbeat]] = defaultdict(list)
        self.answer_register: bool = True
        self.refuse_register: wire.ErrorReply | None = None
        self.bad_agent_messages = 0

    async def __aenter__(self) -> FakeHub:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        self.nc = await nats.connect(
            self.url, name=self.name, inbox_prefix=wire.HUB_INBOX_PREFIX, max_reconnect_attempts=-1,
            reconnect_time_wait=0.2, ping_interval=1, max_outstanding_pings=2,
            error_cb=self._quiet, disconnected_cb=self._noop, reconnected_cb=self._noop, closed_cb=self._noop,
            **({"user": self.user, "password": self.password} if self.user else {}),
        )
        await self.nc.subscribe(wire.REGISTER_WILDCARD, cb=self._on_register)
        await self.nc.subscribe(wire.HEARTBEAT_WILDCARD, cb=self._on_heartbeat)
        await barrier(self.nc)

    async def _quiet(self, exc: Exception) -> None:  # reconnect noise during restarts
        pass

    async def _noop(self) -> None:
        pass

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()
            self.nc = None

    # ------------------------------------------------------------------ agent -> hub

    async def _on_register(self, msg: Msg) -> None:
        try:
            reg = wire.agent_message_decoder.decode(msg.data)
        except Exception:
            self.bad_agent_messages += 1
            return
        if not isinstance(reg, wire.Register):
            self.bad_agent_messages += 1
            return
        self.registrations.append(reg)
        if not self.answer_register:
            return
        if self.refuse_register is not None:
            await msg.respond(wire.encode(self.refuse_register))
            return
        await msg.respond(wire.encode(wire.RegisterAck(hub=self.name, heartbeat_s=self.heartbeat_s)))

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            hb = wire.agent_message_decoder.decode(msg.data)
        except Exception:
            self.bad_agent_messages += 1
            return
        if isinstance(hb, wire.Heartbeat):
            self.heartbeats[hb.site].append(hb)

    def registrations_of(self, site: str) -> list[wire.Register]:
        return [r for r in self.registrations if r.site == site]

    def last_heartbeat(self, site: str) -> wire.Heartbeat | None:
        beats = self.heartbeats.get(site)
        return beats[-1] if beats else None

    async def wait_heartbeat(self, site: str, predicate: Callable[[wire.Heartbeat], bool] = lambda hb: True,
                             timeout_s: float = 5.0, what: str = "a heartbeat") -> wire.Heartbeat:
        """The first heartbeat from now on (or the latest) from ``site`` that satisfies ``predicate``."""
        def check() -> wire.Heartbeat | None:
            hb = self.last_heartbeat(site)
            return hb if hb is not None and predicate(hb) else None

        return await wait_for(check, timeout_s, f"{what} from {site}")

    # ------------------------------------------------------------------ hub -> agent

    def _client(self) -> Client:
        assert self.nc is not None, "FakeHub not started"
        return self.nc

    async def command(self, site: str, cmd: Any, timeout_s: float = 5.0) -> wire.Ack | wire.ErrorReply:
        msg = await self._client().request(wire.cmd_subject(site), wire.encode(cmd), timeout=timeout_s)
        return wire.command_reply_decoder.decode(msg.data)

    async def command_raw(self, site: str, body: bytes, timeout_s: float = 5.0) -> wire.Ack | wire.ErrorReply:
        msg = await self._client().request(wire.cmd_subject(site), body, timeout=timeout_s)
        return wire.command_reply_decoder.decode(msg.data)

    async def infer(self, site: str, request: wire.InferRequest | bytes,
                    timeout_s: float = 5.0) -> wire.InferChunk | wire.InferResult | wire.ErrorReply:
        body = request if isinstance(request, bytes) else wire.encode(request)
        msg = await self._client().request(wire.infer_subject(site), body, timeout=timeout_s)
        return wire.infer_reply_decoder.decode(msg.data)

    async def infer_stream(self, site: str, request: wire.InferRequest, timeout_s: float = 5.0,
                           ) -> list[tuple[float, wire.InferChunk | wire.InferResult | wire.ErrorReply]]:
        """Send a request (streaming or not); return ``(arrival loop time, message)`` up to the final
        answer, acknowledgements and chunks included."""
        nc = self._client()
        inbox = nc.new_inbox()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def collect(msg: Msg) -> None:
            queue.put_nowait((loop.time(), msg.data))

        sub = await nc.subscribe(inbox, cb=collect)
        try:
            await nc.publish(wire.infer_subject(site), wire.encode(request), reply=inbox)
            out: list[tuple[float, Any]] = []
            deadline = loop.time() + timeout_s
            while True:
                at, data = await asyncio.wait_for(queue.get(), max(0.01, deadline - loop.time()))
                message = wire.infer_reply_decoder.decode(data)
                out.append((at, message))
                if not isinstance(message, (wire.InferChunk, wire.InferAccepted)):
                    return out
        finally:
            await sub.unsubscribe()

    # ------------------------------------------------------------------ JetStream

    async def create_stream(self) -> None:
        """Create ``CPN_EVENTS`` on ``cpn.v1.site.*.evt`` (as the hub does at start)."""
        js = self._client().jetstream()
        await js.add_stream(name=wire.EVENTS_STREAM, subjects=[wire.EVENT_WILDCARD])

    async def delete_stream(self) -> None:
        await self._client().jetstream().delete_stream(wire.EVENTS_STREAM)

    async def stream_events(self) -> list[StreamedEvent]:
        """Every message in ``CPN_EVENTS``, in stream order, with its ``Nats-Msg-Id``."""
        js = self._client().jetstream()
        info = await js.stream_info(wire.EVENTS_STREAM)
        out: list[StreamedEvent] = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            if info.state.messages == 0:
                break
            raw = await js.get_msg(wire.EVENTS_STREAM, seq)
            headers = raw.headers or {}
            out.append(StreamedEvent(msg_id=headers.get("Nats-Msg-Id", ""), subject=raw.subject or "",
                                     event=wire.event_decoder.decode(raw.data or b"")))
        return out

    async def wait_events(self, predicate: Callable[[list[StreamedEvent]], bool], timeout_s: float = 10.0,
                          what: str = "events") -> list[StreamedEvent]:
        events: list[StreamedEvent] = []

        async def holds() -> bool:
            try:
                events[:] = await self.stream_events()
            except Exception:  # the stream not created yet, JetStream busy: read again
                events.clear()
            return predicate(events)

        await until(holds, timeout_s, what, interval_s=0.05, last=lambda: f"stream has {[e.msg_id for e in events]}")
        return events

    async def run_attempt(self, site: str, cmd: wire.StartAttempt, timeout_s: float = 10.0,
                          ) -> tuple[wire.AttemptExited, list[StreamedEvent]]:
        """Send ``cmd`` (which ``site`` must acknowledge) and wait until the attempt exits.

        Returns:
            Its ``AttemptExited`` and every event of its job in the stream.
        """
        reply = await self.command(site, cmd)
        assert isinstance(reply, wire.Ack), reply
        events = await self.wait_events(lambda ev: exit_event(ev, cmd.job) is not None, timeout_s=timeout_s,
                                        what=f"{cmd.job} to exit")
        exited = exit_event(events, cmd.job)
        assert exited is not None
        return exited, [e for e in events if e.event.job == cmd.job]


def exit_event(events: list[StreamedEvent], job: str) -> wire.AttemptExited | None:
    """``job``'s ``AttemptExited`` among ``events``; None until it came."""
    return next((e.event for e in events if isinstance(e.event, wire.AttemptExited) and e.event.job == job), None)


def agent_config(url: str, site: str = "edge-a", **overrides: Any) -> Any:
    """An ``AgentConfig`` with test timings (fast heartbeats, retries and reconnects).

    ``overrides`` are top-level keys in TOML shape (nested dicts for tables), validated as a file is.
    """
    from edge_agent import config

    raw: dict[str, Any] = {
        "site": site,
        "nats": url,
        "accelerators": {"H20": 4},
        "heartbeat_s": 0.1,
        "stop_grace_s": 1.0,
        "bus": {"reconnect_wait_s": 0.2, "reconnect_jitter_s": 0.1, "register_timeout_s": 0.5,
                "register_backoff_max_s": 0.5, "event_timeout_s": 0.5, "event_backoff_max_s": 0.3},
        "backend": {"kind": "sim", "sim": {"ttft_ms": 0.0, "per_token_ms": 0.0, "slots": 2}},
        "models": [{"name": "qwen", "cards": 0.5}],
        "executors": {"enabled": ["sim"]},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            merged = dict(raw[key])
            for k, v in value.items():
                merged[k] = {**merged[k], **v} if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
            raw[key] = merged
        else:
            raw[key] = value
    return config.from_dict(raw, "test")


@contextlib.asynccontextmanager
async def running(config: Any, **kwargs: Any) -> AsyncIterator[Any]:
    """Start an ``Agent`` for the test and always stop it (asserting it left no task behind)."""
    from edge_agent.agent import Agent

    agent = Agent(config, **kwargs)
    await asyncio.wait_for(agent.start(), 10)
    try:
        yield agent
    finally:
        await asyncio.wait_for(agent.stop(), 15)
        assert not agent._tasks, f"tasks left behind: {agent._tasks}"
