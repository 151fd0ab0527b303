"""``Agent``: one site's process: register, heartbeat, serve inference and commands, run training.

Promises:

- Rule 1: ``start()`` returns once connected and subscribed; registering goes on in the background
  (retry with capped, jittered backoff until a ``RegisterAck``), so an agent started before its hub
  simply keeps trying. It registers again after every reconnect and on a ``Reregister`` command.
- Rule 2: heartbeats go out every ``heartbeat_s`` while connected and registered; while
  disconnected they are skipped, never queued (stale soft state is worse than none).
- Rule 3: every handler answers (``Ack``/``InferResult``/``ErrorReply``) and none raises: malformed
  messages are counted in ``counters["bad_messages"]``, bugs answer ``ErrorReply("internal")``.
- Rule 4: ``stop()`` leaves nothing behind: no task, no subprocess, no connection.
- Rule 5: attempts journalled by an earlier run (a crash, a SIGKILL) are dealt with before the
  agent connects: re-attached, or reported lost (:meth:`Training.recover`).
- Rule 6: a backend that can be probed is, every ``probe_s``; while it does not answer, the site's
  replicas are reported not ready (:mod:`edge_agent.backend_health`).
- Several agents run in one process (``cpn up``): no module-level state, no signal handlers here.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import msgspec

from edge_agent import private_files, wire
from edge_agent.clock import WALL, Clock, wait_or_sleep
from edge_agent.attempt_journal import AttemptJournal
from edge_agent.backend_health import BackendHealth
from edge_agent.backends import Backend, make_backend
from edge_agent.bus import AgentBus, Incoming
from edge_agent.config import AgentConfig
from edge_agent.errors import BusError
from edge_agent.events import EventPublisher
from edge_agent.executors import Executor
from edge_agent.fencing import FILE_NAME as EPOCH_FILE
from edge_agent.fencing import EpochFence
from edge_agent.inference import InferenceService
from edge_agent.inventory import READY, Inventory
from edge_agent.logs import log
from edge_agent.outbox import Outbox
from edge_agent.training import Training

STOP_TASKS_S = 5.0
"""How long a stopping agent waits for its cancelled tasks before it closes the bus under them."""

LOCAL_DEPLOYMENT = "local"
"""Deployment name of the models a site preloads from its config."""


@functools.cache
def agent_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("cpn")
    except metadata.PackageNotFoundError:
        return "dev"


def _where(task: asyncio.Task[Any]) -> str:
    """Where a task is suspended (innermost frame), for a log line."""
    frames = task.get_stack(limit=1)
    return f"{frames[-1].f_code.co_filename}:{frames[-1].f_lineno}" if frames else "?"


def _make_executors(config: AgentConfig, clock: Clock) -> dict[str, Executor]:
    executors: dict[str, Executor] = {}
    # Without a data dir, checkpoints go to a per-site temp dir (fine for demos, said in docs).
    base = config.data_path or Path(tempfile.gettempdir()) / f"cpn-agent-{config.site}"
    for name in config.executors.enabled:
        if name == "sim":
            from edge_agent.executors.sim import SimExecutor

            executors[name] = SimExecutor(clock=clock)
        elif name == "process":
            from edge_agent.executors.process import ProcessExecutor

            process = ProcessExecutor(config.executors.process, base)
            if process.unavailable:
                log(logging.ERROR, "executor_unavailable", site=config.site, executor=name, reason=process.unavailable)
            executors[name] = process
        elif name == "container":
            from edge_agent.executors.container import ContainerExecutor

            container = ContainerExecutor(config.executors.container, base, config.site, config.accelerators)
            if container.unavailable:
                log(logging.ERROR, "executor_unavailable", site=config.site, executor=name,
                    reason=container.unavailable)
            executors[name] = container
        elif name == "slurm":
            from edge_agent.executors.slurm import SlurmExecutor

            slurm = SlurmExecutor(config.executors.slurm, base)
            executors[name] = slurm
            if "process" not in config.executors.enabled:
                executors["process"] = slurm  # command jobs (executor "process") go to the site's Slurm
    return executors


class Agent:
    """One site. See the module docstring for what it promises.

    Args:
        config: the site's config.
        backend: an inference backend to use instead of the one the config names (tests, ``cpn up``).
        rng: source of backoff jitter.
        clock: the agent's time (heartbeats, backoffs, deadlines, event timestamps); the wall clock
            unless given (tests, a simulation).
    """

    def __init__(self, config: AgentConfig, *, backend: Backend | None = None,
                 rng: random.Random | None = None, clock: Clock | None = None) -> None:
        self.config = config
        self.site = config.site
        self.clock: Clock = clock or WALL
        self._rng = rng or random.Random()
        self.counters: Counter[str] = Counter()
        self.bus = AgentBus(config, rng=self._rng)
        self.inventory = Inventory(config.accelerators)
        self.backend = backend or make_backend(config, self.clock)
        self.inference = InferenceService(self.site, self.bus, self.inventory, self.backend, self.counters,
                                          request_timeout_s=config.backend.request_timeout_s, clock=self.clock)
        self.health = BackendHealth(self.site, getattr(self.backend, "probe", None),
                                    float(getattr(self.backend, "probe_s", 0.0)), self.inventory, self._backend_changed,
                                    clock=self.clock)
        self.inference.on_unavailable = self.health.mark_down
        self.inference.spawn = lambda coro: self._spawn(coro, "infer")
        data = config.data_path
        if data is not None:
            private_files.private_dir(data)  # 0700: its journals and checkpoints are the site's only
        self.outbox = Outbox(data / "outbox.jsonl" if data else None)
        self.events = EventPublisher(self.bus, self.outbox, timeout_s=config.bus.event_timeout_s,
                                     backoff_max_s=config.bus.event_backoff_max_s, rng=self._rng)
        self.journal = AttemptJournal(data / "attempts") if data else None
        self.fence = EpochFence(data / EPOCH_FILE if data else None)
        self.training = Training(self.site, self.inventory, _make_executors(config, self.clock), self._emit, self.journal,
                                 clock=self.clock)
        self.registered = asyncio.Event()
        self.hub = ""
        self.draining = False
        self.heartbeat_s = config.heartbeat_s
        self.heartbeat_seq = 0
        self._register_wanted = asyncio.Event()
        self._heartbeat_now = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[Any]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task_names: dict[str, str] = {}
        self._started = False
        self._stopped = False
        self.bus.on_reconnected(self._on_reconnected)

    def __repr__(self) -> str:
        return (f"<Agent site={self.site} registered={self.registered.is_set()} replicas={len(self.inventory.replicas)} "
                f"attempts={len(self.training.attempts)} inflight={self.inventory.inflight()} "
                f"outbox={len(self.outbox)} heartbeats={self.counters['heartbeats']} "
                f"bad_messages={self.counters['bad_messages']}>")

    # ------------------------------------------------------------------ life cycle

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        # One task per inference request: the loop and the task's name are kept, not looked up or
        # built each time (``asyncio.create_task`` asks for the running loop: a ``getpid`` system
        # call on Python 3.11).
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        full = self._task_names.get(name)
        if full is None:
            full = self._task_names[name] = f"{self.site}:{name}"
        task = loop.create_task(coro, name=full)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self.counters["task_failures"] += 1
            log(logging.ERROR, "task_failed", site=self.site, task=task.get_name(), error=repr(exc))

    async def start(self) -> None:
        """Connect, subscribe, preload models and start the background loops; then return.

        Waits (retrying forever) while no NATS server answers; cancelling it is safe.
        """
        self._loop = asyncio.get_running_loop()
        if self._started:
            return
        self._started = True
        await self._recover_attempts()  # before any command can arrive
        await self.bus.connect()
        await self.bus.subscribe(wire.infer_subject(self.site), self._on_infer)
        await self.bus.subscribe(wire.cmd_subject(self.site), self._on_cmd)
        try:
            await self.bus.flush()  # the server knows our subscriptions before start() returns
        except BusError:
            pass  # disconnected already: nats-py re-subscribes on reconnect
        for model in self.config.models:
            slots = model.slots or self.backend.default_slots
            if self._load(model.name, LOCAL_DEPLOYMENT, model.cards, slots) is None:
                log(logging.ERROR, "preload_no_capacity", site=self.site, model=model.name, cards=model.cards)
        self._loops = [
            self._spawn(self._supervised(self._register_loop, "register"), "register"),
            self._spawn(self._supervised(self._heartbeat_loop, "heartbeat"), "heartbeat"),
            self._spawn(self._supervised(self.events.run, "events"), "events"),
        ]
        if self.health.enabled:
            self._loops.append(self._spawn(self._supervised(self.health.run, "probe"), "probe"))
        self._register_wanted.set()
        if len(self.outbox):
            log(logging.INFO, "outbox_recovered", site=self.site, pending=len(self.outbox))
            self.events.kick()
        log(logging.INFO, "agent_started", site=self.site, accelerators=self.config.accelerators,
            backend=self.backend.name, executors=",".join(self.training.executors))

    def _backend_changed(self, up: bool) -> None:
        if up:
            self.inference.reset_health()
        self._heartbeat_now.set()  # the hub should route around (or back to) us at once

    async def _recover_attempts(self) -> None:
        """Attempts journalled by an earlier run of this agent: re-attach or report them lost."""
        if self.journal is None or not len(self.journal):
            return
        pending_exits = set()
        for entry in self.outbox:
            try:
                event = wire.event_decoder.decode(entry.body)
            except (msgspec.ValidationError, msgspec.DecodeError):
                continue
            if isinstance(event, wire.AttemptExited):
                pending_exits.add((event.job, event.attempt))
        counts = await self.training.recover(pending_exits)
        self.counters.update({f"attempts_{k}": v for k, v in counts.items()})
        log(logging.INFO, "attempts_recovered", site=self.site, **counts)

    async def stop(self, drain: bool = False) -> None:
        """Stop everything this agent started.

        Args:
            drain: first announce draining, let in-flight requests finish and send pending events
                (each bounded by ``stop_grace_s``).
        """
        if self._stopped:
            return
        self._stopped = True
        grace_s = self.config.stop_grace_s
        if drain and self.bus.is_connected:
            self.draining = True
            await self._send_heartbeat()
            await self._until(lambda: self.inventory.inflight() == 0, grace_s)
        await self.training.abort_all("agent stopping")
        if drain and self.bus.is_connected:
            try:
                async with asyncio.timeout(grace_s):
                    await self.events.wait_idle()
            except TimeoutError:
                log(logging.WARNING, "outbox_not_flushed", site=self.site, pending=len(self.outbox))
        self.inference.stop_now()  # the requests served with no task: answered shutting_down
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        stuck: set[asyncio.Task[Any]] = set()
        if tasks:
            # A task that does not end soon after its cancel must not hold the agent's stop: name it,
            # close the bus under it (what it waits on, usually) and give it a last moment.
            _, stuck = await asyncio.wait(tasks, timeout=STOP_TASKS_S)
            for task in stuck:
                log(logging.ERROR, "task_outlived_cancel", site=self.site, task=task.get_name(),
                    where=_where(task))
        await self.backend.close()
        await self.bus.close()
        if stuck:
            # A cancel can be lost: on Python 3.11 ``asyncio.wait_for`` (nats-py's request uses it)
            # returns the result instead of raising when the answer and the cancel arrive together,
            # and the loop goes on to wait forever. Cancel once more, with the bus now closed.
            for task in stuck:
                task.cancel()
            await asyncio.wait(stuck, timeout=STOP_TASKS_S)
        self.registered.clear()
        log(logging.INFO, "agent_stopped", site=self.site, pending_events=len(self.outbox))

    async def _supervised(self, loop: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        # A bug in one loop must not silently end registration, heartbeats or event delivery.
        while True:
            try:
                await loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                self.counters["loop_restarts"] += 1
                logging.getLogger("cpn.agent").exception("loop_failed site=%s loop=%s", self.site, name)
                await self.clock.sleep(1.0)

    async def _until(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        deadline = self.clock.monotonic() + timeout_s
        while not condition():
            if self.clock.monotonic() >= deadline:
                return False
            await self.clock.sleep(0.02)
        return True

    # ------------------------------------------------------------------ registration, heartbeats

    def _on_reconnected(self) -> None:
        self.registered.clear()
        self._register_wanted.set()

    def register_message(self) -> wire.Register:
        c = self.config
        return wire.Register(
            site=self.site, tier=c.tier, city=c.city, provider=c.provider, accelerators=dict(c.accelerators),
            backends=[self.backend.name], executors=self.training.offered(),
            models=self.inventory.statuses(), attempts=self.training.refs(), tee=c.tee, lat=c.lat, lon=c.lon,
            agent_version=agent_version(), infer_acks=True,
        )

    async def _pause(self, event: asyncio.Event, delay_s: float) -> None:
        # Not wait_for: on 3.11 wait_for swallows a cancellation that races with the event being
        # set, and a loop that survives stop() hangs the agent's shutdown. wait_or_sleep cancels
        # and awaits both of its waits, whatever happens.
        await wait_or_sleep(self.clock, event, delay_s)

    async def _register_loop(self) -> None:
        cfg = self.config.bus
        subject = wire.register_subject(self.site)
        while True:
            await self._register_wanted.wait()
            self._register_wanted.clear()
            backoff_s = 0.2
            while True:
                await self.bus.wait_connected()
                try:
                    raw = await self.bus.request(subject, wire.encode(self.register_message()),
                                                 timeout_s=cfg.register_timeout_s)
                    reply = wire.register_reply_decoder.decode(raw)
                except (BusError, msgspec.ValidationError, msgspec.DecodeError) as exc:
                    self.counters["register_failures"] += 1
                    log(logging.INFO if self.counters["register_failures"] % 30 != 1 else logging.WARNING,
                        "register_retry", site=self.site, error=str(exc), backoff_s=backoff_s)
                else:
                    if isinstance(reply, wire.RegisterAck):
                        self.hub = reply.hub
                        if reply.heartbeat_s > 0:
                            self.heartbeat_s = reply.heartbeat_s
                        self.counters["registrations"] += 1
                        self.registered.set()
                        self._heartbeat_now.set()  # let the hub see our state at once
                        log(logging.INFO, "registered", site=self.site, hub=reply.hub, known=reply.known,
                            heartbeat_s=self.heartbeat_s)
                        break
                    self.counters["register_refused"] += 1
                    log(logging.WARNING, "register_refused", site=self.site, code=reply.code, error=reply.message)
                await self.clock.sleep(backoff_s * (0.5 + self._rng.random()))
                backoff_s = min(backoff_s * 2, cfg.register_backoff_max_s)

    def heartbeat_message(self) -> wire.Heartbeat:
        times = self.inference.service_times
        return wire.Heartbeat(
            site=self.site, seq=self.heartbeat_seq, free_cards=self.inventory.free_cards(),
            models=self.inventory.statuses(), attempts=self.training.refs(), queue_depth=0,
            inflight=self.inventory.inflight(), service_ms_p50=round(times.percentile(0.5), 3),
            service_ms_p99=round(times.percentile(0.99), 3),
            health="degraded" if self.inference.degraded else "ok", draining=self.draining,
        )

    async def _send_heartbeat(self) -> None:
        if not (self.bus.is_connected and self.registered.is_set()):
            self.counters["heartbeats_skipped"] += 1
            return
        self.heartbeat_seq += 1
        try:
            await self.bus.publish(wire.heartbeat_subject(self.site), wire.encode(self.heartbeat_message()))
            self.counters["heartbeats"] += 1
        except BusError:
            self.counters["heartbeats_skipped"] += 1

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._pause(self._heartbeat_now, self.heartbeat_s)
            self._heartbeat_now.clear()
            await self._send_heartbeat()

    # ------------------------------------------------------------------ events

    def _emit(self, event: wire.AttemptStarted | wire.Checkpointed | wire.AttemptExited, msg_id: str = "") -> None:
        entry = self.outbox.add(event, msg_id)
        self.counters["events"] += 1
        log(logging.INFO, "attempt_event", site=self.site, job=event.job, attempt=event.attempt, seq=event.seq,
            kind=type(event).__name__, msg_id=entry.msg_id)
        self.events.kick()
        self._heartbeat_now.set()  # progress and free cards changed

    # ------------------------------------------------------------------ handlers

    def _on_infer(self, msg: Incoming) -> Awaitable[None] | None:
        answer = self.inference.answer_now(msg)
        if answer is not None:
            return self.inference.reply(msg.reply, answer)
        if self.inference.start_now(msg):
            return None
        self._spawn(self.inference.handle(msg), "infer")
        return None

    def _on_cmd(self, msg: Incoming) -> None:
        self._spawn(self._handle_cmd(msg), "cmd")

    async def _reply(self, msg: Incoming, body: wire.Ack | wire.ErrorReply) -> None:
        if not msg.reply:
            return
        try:
            await self.bus.publish(msg.reply, wire.encode(body))
        except BusError as exc:
            self.counters["reply_failures"] += 1
            log(logging.WARNING, "cmd_reply_failed", site=self.site, error=str(exc))

    async def _handle_cmd(self, msg: Incoming) -> None:
        try:
            cmd = wire.command_decoder.decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            self.counters["bad_messages"] += 1
            log(logging.WARNING, "cmd_bad_message", site=self.site, error=str(exc))
            await self._reply(msg, wire.ErrorReply(code="bad_message", message=f"not a command: {exc}"))
            return
        try:
            answer = await self._dispatch(cmd)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.counters["internal_errors"] += 1
            logging.getLogger("cpn.agent").exception("cmd_internal_error site=%s cmd=%s", self.site, type(cmd).__name__)
            answer = wire.ErrorReply(code="internal", message=f"{type(exc).__name__} at site {self.site}")
        self.counters[f"cmd_{type(cmd).__name__}"] += 1
        await self._reply(msg, answer)

    def _draining_error(self, what: str) -> wire.ErrorReply:
        return wire.ErrorReply(code="draining", message=f"site {self.site} is draining: no new {what}",
                               retryable=True)

    async def _dispatch(self, cmd: Any) -> wire.Ack | wire.ErrorReply:
        epoch = getattr(cmd, "epoch", 0)
        if not self.fence.admit(epoch):
            self.counters["stale_epoch"] += 1
            log(logging.WARNING, "stale_epoch", site=self.site, cmd=type(cmd).__name__, epoch=epoch,
                highest=self.fence.highest)
            return wire.ErrorReply(code="stale_epoch", message=f"epoch {epoch} is older than {self.fence.highest}, "
                                   f"the newest leader's this site has seen")
        match cmd:
            case wire.LoadModel():
                if self.draining:
                    return self._draining_error("models")
                return self._load_model(cmd)
            case wire.UnloadModel(model=model, deployment=deployment):
                gone = self.inventory.remove_replica(model, deployment)
                self._heartbeat_now.set()
                log(logging.INFO, "model_unloaded", site=self.site, model=model, deployment=deployment,
                    known=gone is not None)
                return wire.Ack(detail="unloaded" if gone else f"{model}/{deployment} was not loaded")
            case wire.Drain(on=on):
                self.draining = on
                self._heartbeat_now.set()
                log(logging.INFO, "drain", site=self.site, on=on)
                return wire.Ack(detail="draining" if on else "accepting work")
            case wire.CancelInfer(request_id=request_id):
                found = self.inference.cancel(request_id)
                return wire.Ack(detail="cancelled" if found else f"request {request_id} is not running here")
            case wire.LeaderEpoch(epoch=epoch, hub=hub):
                log(logging.INFO, "leader_epoch", site=self.site, epoch=epoch, hub=hub)
                return wire.Ack(detail=f"epoch {epoch}")
            case wire.Reregister():
                self.registered.clear()
                self._register_wanted.set()
                return wire.Ack(detail="registering")
            case wire.StartAttempt():
                if self.draining:
                    return self._draining_error("attempts")
                return await self.training.start(cmd)
            case wire.StopAttempt():
                return self.training.stop(cmd)
        return wire.ErrorReply(code="bad_message", message=f"unsupported command {type(cmd).__name__}")

    def _load_model(self, cmd: wire.LoadModel) -> wire.Ack | wire.ErrorReply:
        existing = self.inventory.replicas.get((cmd.model, cmd.deployment))
        if existing is not None:
            return wire.Ack(detail=f"already {existing.state}")
        if cmd.cards < 0 or cmd.slots < 1:
            return wire.ErrorReply(code="bad_message", message="LoadModel: cards must be >= 0 and slots >= 1")
        if self._load(cmd.model, cmd.deployment, cmd.cards, cmd.slots, cmd.accelerator or None) is None:
            free = self.inventory.free_cards()
            what = f"{cmd.cards:g} {cmd.accelerator} cards" if cmd.accelerator else f"{cmd.cards:g} cards"
            return wire.ErrorReply(code="no_capacity", message=f"{cmd.model} needs {what}; free at {self.site}: {free}")
        return wire.Ack(detail="loading")

    def _load(self, model: str, deployment: str, cards: float, slots: int,
              accelerator: str | None = None) -> object | None:
        replica = self.inventory.add_replica(model, deployment, cards, slots, accelerator)
        if replica is None:
            return None
        log(logging.INFO, "model_loading", site=self.site, model=model, deployment=deployment, cards=cards,
            accelerator=replica.accelerator, load_time_s=self.backend.load_time_s)

        async def become_ready() -> None:
            if self.backend.load_time_s > 0:
                await self.clock.sleep(self.backend.load_time_s)
            if self.inventory.replicas.get((model, deployment)) is replica:
                replica.state = READY
                self._heartbeat_now.set()
                log(logging.INFO, "model_ready", site=self.site, model=model, deployment=deployment)

        if self.backend.load_time_s > 0:
            self._spawn(become_ready(), f"load-{model}")
        else:
            replica.state = READY
        self._heartbeat_now.set()
        return replica
