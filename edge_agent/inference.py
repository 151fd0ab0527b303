"""Serving ``wire.infer_subject(site)``: one task per request, slots, streaming, cancellation.

A request the backend can answer without waiting (:meth:`InferenceService.answer_now`) is answered
inline, with no task: there is nothing to time out or cancel. A request to a backend that can send
it from a callback (``openai-http`` with an idle kept-alive connection:
:meth:`InferenceService.start_now`) takes no task either: the NATS callback sends it, the
connection's callbacks publish a stream's chunks as they come (:mod:`edge_agent.stream_now`) and
the answer at its end; its deadline is the connection's timer, a delayed acknowledgement one timer
shared by all such requests. Anything else (no idle connection, a retry) goes the task's way.

Promises:

- Rule 1: every request with a reply subject gets exactly one final answer: an ``InferResult`` or
  an ``ErrorReply`` (``bad_message``, ``unknown_model``, ``busy``, ``backend_unavailable``,
  ``backend_error``, ``timeout``, ``cancelled``, ``shutting_down``, ``internal``). Streaming
  requests get ``InferChunk``s (index 0, 1, ...) on the same reply subject before the final answer.
- Rule 4: an error's message names no URL or host of the site (a backend's ``detail`` is logged
  here, never sent); a request that could not connect to the backend calls ``on_unavailable``.
- Rule 2: no queueing: when every slot of the model's ready replicas is taken the answer is
  ``busy`` (retryable) at once, so the hub fails over within its latency budget.
- Rule 3: a malformed body is counted (``bad_messages``) and answered, never raised.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import msgspec

from edge_agent import wire
from edge_agent.clock import WALL, Clock
from edge_agent.backends import Backend, Completion
from edge_agent.bus import AgentBus, Incoming
from edge_agent.errors import BackendError, BusError
from edge_agent.exchange import Exchange as _Exchange
from edge_agent.inventory import Inventory, Replica, ServiceTimes
from edge_agent.logs import log
from edge_agent.stream_now import StreamExchange


class _Watch:
    """A request's one timer: first its acknowledgement's time (``InferRequest.ack_after_ms``), if
    asked for and due before the deadline, then its deadline. One loop timer per request instead of
    two (each costs about as much as the rest of the request's bookkeeping together).

    ``ack_wanted`` goes False when the answer or a first chunk goes out first: at the
    acknowledgement's time the timer then only re-arms for the deadline."""

    __slots__ = ("service", "task", "reply", "request_id", "ack_wanted", "rest_s", "handle")

    def __init__(self, service: InferenceService, loop: asyncio.AbstractEventLoop, task: asyncio.Task[None],
                 reply: str, request_id: str, ack_after_s: float | None, timeout_s: float) -> None:
        self.service = service
        self.task = task
        self.reply = reply
        self.request_id = request_id
        self.ack_wanted = ack_after_s is not None and ack_after_s < timeout_s
        self.rest_s: float | None = None
        """Armed for the acknowledgement: the deadline is this much later (None: armed for the deadline)."""
        if self.ack_wanted and ack_after_s is not None:
            self.rest_s = timeout_s - ack_after_s
            self.handle: asyncio.TimerHandle | None = loop.call_later(ack_after_s, self._fire, loop)
        else:
            self.handle = loop.call_later(timeout_s, self._fire, loop)

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.handle is None:
            return  # cancelled
        rest_s = self.rest_s
        if rest_s is not None:  # the acknowledgement's time (the deadline is still ahead)
            self.rest_s = None
            if self.ack_wanted:
                self.ack_wanted = False
                self.service._send_ack(self.reply, self.request_id)
            self.handle = loop.call_later(rest_s, self._fire, loop)
            return
        self.service._expire(self.task)  # the deadline

    def cancel(self) -> None:
        self.ack_wanted = False
        handle, self.handle = self.handle, None
        if handle is not None:
            handle.cancel()


def _wellformed(msg: Incoming) -> wire.InferRequest | None:
    """The request a message carries if it may be served without a task: a well-formed request
    with a reply subject; None otherwise (:meth:`InferenceService.handle` then serves it, and
    answers what is malformed)."""
    if not msg.reply:
        return None
    try:
        return wire.infer_request_decoder.decode(msg.data)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None


def _plain(msg: Incoming) -> wire.InferRequest | None:
    """As :func:`_wellformed`, for a plain (not streamed) request only."""
    request = _wellformed(msg)
    return None if request is None or request.stream else request


_ACK_SLACK_S = 0.001
"""Loop timers are kept in whole milliseconds: an acknowledgement due within one of now is due."""

BROKEN_RETRY_S = 0.05
"""How soon a failed telling of a broken stream is tried again (:meth:`InferenceService._tell_broken`)."""

BROKEN_TELL_S = 10.0
"""How long a stream cut by the site's NATS link waits for the link to come back to say so to the
hub (past it the hub has declared the site lost and ended the stream itself)."""


class InferenceService:
    """Answers infer requests from the site's replicas through one backend."""

    def __init__(self, site: str, bus: AgentBus, inventory: Inventory, backend: Backend,
                 counters: dict[str, int], *, request_timeout_s: float, clock: Clock = WALL) -> None:
        self.site = site
        self.clock = clock
        self.bus = bus
        self.inventory = inventory
        self.backend = backend
        self.counters = counters
        self.request_timeout_s = request_timeout_s
        self.service_times = ServiceTimes()
        self._answers_now: bool = getattr(backend, "answers_now", True)
        """False for a backend whose ``generate_now`` is always None (skip decoding twice)."""
        self.on_unavailable: Callable[[str], None] | None = None
        """Told (with the local detail) when a request could not connect to the backend."""
        self._outcomes: deque[bool] = deque(maxlen=20)  # recent backend successes, for health
        self._running: dict[str, set[asyncio.Task[None]]] = {}
        self._cancelled: set[asyncio.Task[None]] = set()
        self._expired: set[asyncio.Task[None]] = set()
        self._acks: set[asyncio.Future[None]] = set()
        self._start_now: Callable[[wire.InferRequest, Callable[[object], None], float], object] | None = getattr(
            backend, "start_now", None)
        """The backend's way to send a plain request from a callback (None: it has none)."""
        self._stream_now: Callable[..., object] | None = getattr(backend, "stream_now", None)
        """The backend's way to send a streamed request from a callback (None: it has none)."""
        self.spawn: Callable[[Coroutine[Any, Any, None]], object] = self._spawn_own
        """Runs a request in a task when one served with no task must go the usual way after all
        (the agent sets its own spawner, whose tasks it waits for when stopping)."""
        self._now: dict[str, _Exchange | StreamExchange] = {}
        """Requests served with no task (:meth:`start_now`), by id."""
        self._ack_due: deque[_Exchange | StreamExchange] = deque()
        """Requests served with no task whose acknowledgement is due later, in order of its time."""
        self._ack_timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        """The loop serving requests, kept from the first: ``asyncio.get_running_loop()`` (and
        ``current_task()`` without a loop) cost a ``getpid`` system call each on Python 3.11."""

    def __repr__(self) -> str:
        return f"<InferenceService site={self.site} running={sum(map(len, self._running.values())) + len(self._now)}>"

    @property
    def degraded(self) -> bool:
        """More than half of the recent backend calls failed."""
        return len(self._outcomes) >= 4 and sum(self._outcomes) * 2 < len(self._outcomes)

    def reset_health(self) -> None:
        """Forget recent failures (the backend answers again): a degraded site gets no requests to
        prove itself with, so without this it would stay degraded."""
        self._outcomes.clear()

    def cancel(self, request_id: str) -> bool:
        """Stop generating ``request_id`` (its requester gets ``ErrorReply("cancelled")``)."""
        exchange = self._now.get(request_id)
        if exchange is not None:
            self._abort_now(exchange)
            return True
        tasks = self._running.get(request_id)
        if not tasks:
            return False
        for task in tasks:
            self._cancelled.add(task)
            task.cancel()
        return True

    async def _answer(self, reply: str, body: bytes) -> None:
        try:
            await self.bus.publish(reply, body)
        except BusError as exc:  # the requester will time out and fail over; nothing else to do
            self.counters["reply_failures"] += 1
            log(logging.WARNING, "infer_reply_failed", site=self.site, error=str(exc))

    def answer_now(self, msg: Incoming) -> bytes | None:
        """The encoded answer to ``msg`` if the backend gives it without waiting, else None.

        None means: serve it with :meth:`handle` in a task (that also answers malformed messages,
        busy slots and unknown models). A request answered here needs no task, no timer and no
        entry among the requests in flight: there is nothing to wait for, time out or cancel.
        """
        request = _plain(msg) if self._answers_now else None
        if request is None:
            return None
        replica, _ = self.inventory.acquire_slot(request.model)
        if replica is None:
            return None
        started = self.clock.monotonic()
        try:
            completion = self.backend.generate_now(request)
        except BackendError:
            completion = None  # handle() tries again and answers the error
        finally:
            self.inventory.release_slot(replica)
        if completion is None:
            return None
        return self._result(request, completion, (self.clock.monotonic() - started) * 1000.0)

    def _result(self, request: wire.InferRequest, completion: Completion, service_ms: float) -> bytes:
        """Count a successful answer and encode it."""
        self._outcomes.append(True)
        self.service_times.add(service_ms)
        self.counters["infer_ok"] += 1
        return wire.encode(wire.InferResult(
            request_id=request.request_id, site=self.site, model=request.model, output=completion.output,
            prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens,
            service_ms=round(service_ms, 3), finish_reason=completion.finish_reason, tail=completion.tail,
        ))

    def reply(self, subject: str, body: bytes) -> Awaitable[None] | None:
        """Publish an answer: queued at once when the connection is up (None), else the awaitable
        that publishes it (a failure is counted and logged: the requester times out and fails over)."""
        if self.bus.publish_nowait(subject, body):
            return None
        return self._answer(subject, body)

    async def handle(self, msg: Incoming) -> None:
        """Serve one request message (run it in its own task)."""
        if not msg.reply:
            self.counters["bad_messages"] += 1
            log(logging.WARNING, "infer_no_reply_subject", site=self.site)
            return
        try:
            request = wire.infer_request_decoder.decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            self.counters["bad_messages"] += 1
            log(logging.WARNING, "infer_bad_message", site=self.site, error=str(exc))
            await self._answer(msg.reply, wire.error_reply("bad_message", f"not an InferRequest: {exc}"))
            return
        loop = self._loop
        task = asyncio.current_task(loop) if loop is not None else None
        if loop is None or task is None:  # the first request (or the agent runs in another loop now)
            loop = self._loop = asyncio.get_running_loop()
            task = asyncio.current_task(loop)
            assert task is not None
        self._running.setdefault(request.request_id, set()).add(task)
        try:
            await self._serve(request, msg.reply, task, loop)
        except asyncio.CancelledError:
            if task in self._cancelled:
                self._cancelled.discard(task)
                self.counters["infer_cancelled"] += 1
                await self._answer(msg.reply, wire.error_reply("cancelled", f"request {request.request_id} cancelled"))
                return  # the cancellation was ours to handle, not the agent's shutdown
            await self._answer(msg.reply, wire.error_reply("shutting_down", f"site {self.site} is stopping",
                                                           retryable=True))
            raise
        except Exception as exc:  # a bug: answer, log with traceback, keep serving
            self.counters["internal_errors"] += 1
            logging.getLogger("cpn.agent").exception("infer_internal_error site=%s request_id=%s",
                                                     self.site, request.request_id)
            await self._answer(msg.reply, wire.error_reply("internal", f"{type(exc).__name__} at site {self.site}"))
        finally:
            tasks = self._running.get(request.request_id)
            if tasks is not None:
                tasks.discard(task)
                if not tasks:
                    del self._running[request.request_id]

    async def _tell_broken(self, reply: str, request_id: str) -> None:
        """A stream cut by this site's NATS link (its server died mid-answer; chunks were lost): once
        connected again, within :data:`BROKEN_TELL_S`, say so to the hub, so the tenant's stream
        ends now with an error rather than at the hub's idle timeout. The hub relays the error
        (an older hub too: an error reply mid-stream ends any stream)."""
        body = wire.error_reply(
            "stream_broken", f"site {self.site} lost its NATS link mid-answer (request {request_id}): "
            "part of the answer did not arrive", retryable=False)
        try:
            async with asyncio.timeout(BROKEN_TELL_S):
                while True:
                    await self.bus.wait_connected()
                    try:
                        await self.bus.publish(reply, body)
                        break
                    except BusError:
                        # "Connected" can still be the old link: nats-py starts reconnecting before
                        # the bus hears of the disconnect, and a publish then fails. Told once,
                        # that was lost, and with the site back within the hub's detection period
                        # the tenant's stream waited for the hub's idle timeout (30 s; seen under
                        # load). Try again until it goes out.
                        self.counters["reply_failures"] += 1
                        await self.clock.sleep(BROKEN_RETRY_S)
        except TimeoutError:
            return  # still cut off: the hub declares the site lost and ends the stream itself
        self.counters["streams_broken_told"] = self.counters.get("streams_broken_told", 0) + 1

    def _chunk_sender(self, request_id: str, reply: str, watch: _Watch,
                      started: float) -> Callable[[str], Awaitable[None]]:
        index = 0
        bus = self.bus

        async def on_text(text: str) -> None:
            nonlocal index
            watch.ack_wanted = False  # the first chunk says it all
            # The first chunk states the site's own time to it (the hub's overhead estimate).
            site_ms = round((self.clock.monotonic() - started) * 1000.0, 3) if index == 0 else None
            body = wire.encode(wire.InferChunk(request_id=request_id, index=index, text=text, site_ms=site_ms))
            if not bus.publish_nowait(reply, body):  # queued at once while connected (no coroutine)
                # Chunks must reach the hub; if the bus is gone the stream is dead anyway (raises).
                await bus.publish(reply, body)
            index += 1

        return on_text

    def _send_ack(self, reply: str, request_id: str) -> None:
        """Publish an ``InferAccepted`` from a timer (the answer is slow in coming)."""
        task = asyncio.ensure_future(self._answer(reply, wire.encode(wire.InferAccepted(request_id=request_id))))
        self._acks.add(task)
        task.add_done_callback(self._acks.discard)

    def start_now(self, msg: Incoming) -> bool:
        """Serve a request to a backend that can send it from a callback (``start_now``, and
        ``stream_now`` for a stream: :mod:`edge_agent.stream_now`), with no task: True when sent
        (the answer goes out from the backend's callbacks), False (nothing done) when it needs
        :meth:`handle` (a malformed message, no free slot, no idle backend connection, ...)."""
        start = self._start_now
        if start is None:
            return False
        request = _wellformed(msg)
        if request is None or (request.stream and self._stream_now is None):
            return False
        loop = self._loop
        if loop is None:
            return False  # the first request goes the usual way (it keeps the loop)
        replica, _ = self.inventory.acquire_slot(request.model)
        if replica is None:
            return False
        timeout_s = request.deadline_ms / 1000.0 if request.deadline_ms > 0 else self.request_timeout_s
        delayed_ack = request.ack and request.ack_after_ms > 0
        ack_at = 0.0
        started = self.clock.monotonic()
        if delayed_ack:
            ack_at = started + request.ack_after_ms / 1000.0
            if request.ack_after_ms / 1000.0 >= timeout_s:
                ack_at = 0.0  # due after the deadline: never sent (as the task path does)
            elif self._ack_due and self._ack_due[-1].ack_at > ack_at:
                self.inventory.release_slot(replica)
                return False  # due before one queued already (a shorter delay): the task path keeps it
        exchange: _Exchange | StreamExchange
        try:
            if request.stream:
                exchange = StreamExchange(self, msg, request, replica, started, timeout_s)
                assert self._stream_now is not None
                conn = self._stream_now(request, exchange.send, exchange.done, timeout_s)
            else:
                exchange = _Exchange(self, msg, request, replica, started, timeout_s)
                conn = start(request, exchange.done, timeout_s)
        except Exception:  # a bug: the task's way answers it (and logs it)
            conn = None
        if conn is None:
            self.inventory.release_slot(replica)
            return False
        exchange.conn = conn
        if request.ack and not delayed_ack:
            self.reply_soon(msg.reply, wire.encode(wire.InferAccepted(request_id=request.request_id)))
        elif ack_at:
            exchange.ack_at = ack_at
            self._ack_due.append(exchange)
            if self._ack_timer is None:
                self._ack_timer = loop.call_later(ack_at - started, self._on_ack_timer, loop)
        self._now[request.request_id] = exchange
        return True

    def _on_ack_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        """Acknowledge the requests served with no task whose answer is slow in coming: one timer
        for all of them (the hub's delay is the same for every request, so they fall due in the
        order they came), re-armed for the next one due."""
        self._ack_timer = None
        due = self._ack_due
        now = self.clock.monotonic()
        while due and due[0].ack_at <= now + _ACK_SLACK_S:
            exchange = due.popleft()
            if exchange.pending:
                self.reply_soon(exchange.msg.reply, wire.encode(wire.InferAccepted(
                    request_id=exchange.request.request_id)))
        if due:
            self._ack_timer = loop.call_later(due[0].ack_at - now, self._on_ack_timer, loop)

    def reply_soon(self, subject: str, body: bytes) -> None:
        """Publish from a callback: queued at once when connected, else in a task of its own."""
        if not self.bus.publish_nowait(subject, body):
            task = asyncio.ensure_future(self._answer(subject, body))
            self._acks.add(task)
            task.add_done_callback(self._acks.discard)

    def _close_now(self, exchange: _Exchange | StreamExchange) -> None:
        exchange.pending = False
        self.inventory.release_slot(exchange.replica)
        if self._now.get(exchange.request.request_id) is exchange:
            del self._now[exchange.request.request_id]

    def _finish_now(self, exchange: _Exchange) -> None:
        self._close_now(exchange)
        request, reply = exchange.request, exchange.msg.reply
        try:
            completion = self.backend.finish_now(exchange.conn, request)  # type: ignore[attr-defined]
        except BackendError as exc:
            self._failed_now(exchange, exc)
            return
        if completion is None:
            self._again_now(exchange)
            return
        self.reply_soon(reply, self._result(request, completion, (self.clock.monotonic() - exchange.started) * 1000.0))

    def _failed_now(self, exchange: _Exchange | StreamExchange, exc: BackendError) -> None:
        """Answer a request served with no task whose backend call failed."""
        request, reply = exchange.request, exchange.msg.reply
        self._outcomes.append(False)
        self.counters["infer_errors"] += 1
        backend_timeout_s: float = self.backend.timeout_s  # type: ignore[attr-defined]
        if exc.code == "timeout" and exchange.timeout_s <= backend_timeout_s:  # the request's deadline came first
            log(logging.WARNING, "infer_timeout", site=self.site, request_id=request.request_id,
                timeout_s=exchange.timeout_s)
            self.reply_soon(reply, wire.error_reply(
                "timeout", f"no answer within {exchange.timeout_s:g} s at {self.site}", retryable=True))
            return
        log(logging.WARNING, "infer_backend_error", site=self.site, request_id=request.request_id,
            code=exc.code, error=exc.message, detail=exc.detail or None)
        if exc.code == "backend_unavailable" and self.on_unavailable is not None:
            self.on_unavailable(exc.detail or exc.message)
        self.reply_soon(reply, wire.error_reply(exc.code, exc.message, retryable=exc.retryable))

    def _again_now(self, exchange: _Exchange | StreamExchange) -> None:
        """The kept-alive connection was closed by the server before answering: once more, in a task
        (unless the agent is stopping: the pool closed it)."""
        if self._start_now is None:
            self.reply_soon(exchange.msg.reply, wire.error_reply("shutting_down", f"site {self.site} is stopping",
                                                                 retryable=True))
            return
        self.spawn(self.handle(exchange.msg))

    def _abort_now(self, exchange: _Exchange | StreamExchange, why: str = "cancelled") -> None:
        self.backend.abort_now(exchange.conn)  # type: ignore[attr-defined]
        self._close_now(exchange)
        request, reply = exchange.request, exchange.msg.reply
        if why == "cancelled":
            self.counters["infer_cancelled"] += 1
            self.reply_soon(reply, wire.error_reply("cancelled", f"request {request.request_id} cancelled"))
        else:
            self.reply_soon(reply, wire.error_reply("shutting_down", f"site {self.site} is stopping", retryable=True))

    def stop_now(self) -> None:
        """The agent stops: every request served with no task is given up and answered
        ``shutting_down`` (retryable), as a task's would be; requests still arriving take the task's way
        (the agent cancels those)."""
        self._start_now = None
        for exchange in list(self._now.values()):
            self._abort_now(exchange, "shutting_down")
        self._ack_due.clear()
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None

    def _spawn_own(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._acks.add(task)
        task.add_done_callback(self._acks.discard)

    def _expire(self, task: asyncio.Task[None]) -> None:
        self._expired.add(task)
        task.cancel()

    async def _serve(self, request: wire.InferRequest, reply: str, task: asyncio.Task[None],
                     loop: asyncio.AbstractEventLoop) -> None:
        started = self.clock.monotonic()
        replica, reason = self.inventory.acquire_slot(request.model)
        if replica is None:
            self.counters[reason] += 1
            message = {"busy": f"every slot of {request.model} is busy at {self.site}",
                       "backend_unavailable": f"the model server at {self.site} is unavailable"}.get(
                           reason, f"no ready replica of {request.model} at {self.site}")
            await self._answer(reply, wire.error_reply(reason, message, retryable=True))
            return
        timeout_s = request.deadline_ms / 1000.0 if request.deadline_ms > 0 else self.request_timeout_s
        # A bare timer rather than ``asyncio.timeout``: the same effect for a fraction of the cost
        # on the hot path. At the deadline the task is cancelled and marked as expired; before it,
        # the same timer sends the acknowledgement if the answer is slow in coming.
        delayed_ack = request.ack and request.ack_after_ms > 0
        watch = _Watch(self, loop, task, reply, request.request_id,
                       request.ack_after_ms / 1000.0 if delayed_ack else None, timeout_s)
        on_text = self._chunk_sender(request.request_id, reply, watch, started) if request.stream else None
        try:
            try:
                if request.ack and not delayed_ack:  # the hub may now wait for the answer, not fail over
                    await self._answer(reply, wire.encode(wire.InferAccepted(request_id=request.request_id)))
                completion = await self.backend.generate(request, on_text)
            except asyncio.CancelledError:
                if task not in self._expired:
                    raise
                self._expired.discard(task)
                task.uncancel()
                raise TimeoutError from None
        except TimeoutError:
            self._outcomes.append(False)
            self.counters["infer_errors"] += 1
            log(logging.WARNING, "infer_timeout", site=self.site, request_id=request.request_id, timeout_s=timeout_s)
            await self._answer(reply, wire.error_reply("timeout", f"no answer within {timeout_s:g} s at {self.site}",
                                                       retryable=True))
            return
        except BackendError as exc:
            self._outcomes.append(False)
            self.counters["infer_errors"] += 1
            log(logging.WARNING, "infer_backend_error", site=self.site, request_id=request.request_id,
                code=exc.code, error=exc.message, detail=exc.detail or None)
            if exc.code == "backend_unavailable" and self.on_unavailable is not None:
                self.on_unavailable(exc.detail or exc.message)
            await self._answer(reply, wire.error_reply(exc.code, exc.message, retryable=exc.retryable))
            return
        except BusError as exc:
            self.counters["reply_failures"] += 1
            log(logging.WARNING, "infer_stream_broken", site=self.site, request_id=request.request_id, error=str(exc))
            broken = True
        else:
            broken = False
        finally:
            watch.cancel()
            self._expired.discard(task)  # fired as the answer came: the answer wins
            self.inventory.release_slot(replica)
        if broken:
            await self._tell_broken(reply, request.request_id)
            return
        pending = self.reply(reply, self._result(request, completion, (self.clock.monotonic() - started) * 1000.0))
        if pending is not None:  # not plainly connected: published (or counted as failed) the slow way
            await pending
