"""The ``sim`` executor: a training attempt that only exists as time passing.

Semantics, all in *simulated* seconds (``time_scale`` of them per wall second):

- first ``restart_s`` of setup, then work from ``progress × work_s`` toward ``work_s``;
- after every ``checkpoint_interval_s`` of work a checkpoint taking ``checkpoint_cost_s`` (no work
  is done meanwhile); the ``Checkpointed`` event goes out when it is complete;
- infrastructure failures arrive at rate ``failure_rate_per_card_hour × cards`` per hour
  (exponential; drawn from ``random.Random`` seeded by ``seed``, job and attempt, so a re-run of
  the same attempt fails at the same moment); a failure ends with ``infra_failure`` and the work
  since the last checkpoint is lost (the hub resumes from that checkpoint);
- ``fail_now(reason)`` injects a card fault at once (tests, chaos).
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable

from edge_agent import wire
from edge_agent.clock import WALL, Clock, wait_or_sleep
from edge_agent.executors import AttemptTask, EventSink, RunningAttempt


class SimExecutor:
    name = "sim"

    def __init__(self, *, clock: Clock = WALL) -> None:
        self.clock = clock

    def refusal(self, command: wire.StartAttempt) -> str:
        return ""  # runs no code of the tenant's

    async def start(self, command: wire.StartAttempt, sink: EventSink,
                    on_exit: Callable[[RunningAttempt], None]) -> RunningAttempt:
        attempt = SimAttempt(command, sink, on_exit, clock=self.clock)
        attempt.begin()
        return attempt


class SimAttempt(AttemptTask):
    """One simulated attempt (see the module docstring for the model)."""

    def __init__(self, command: wire.StartAttempt, sink: EventSink,
                 on_exit: Callable[[RunningAttempt], None], *, clock: Clock = WALL) -> None:
        super().__init__(command, sink, on_exit)
        self.clock = clock
        self._scale = command.time_scale if command.time_scale > 0 else 1.0
        self._work_s = max(command.work_s, 0.0)
        self._done_s = min(max(command.progress, 0.0), 1.0) * self._work_s
        self._computing_since: float | None = None  # clock.monotonic() when the current work segment began
        self._wake = asyncio.Event()
        self._fault: str | None = None
        self._stop: tuple[bool, str] | None = None  # (checkpoint, detail) once a stop is asked for
        self._abort: str | None = None
        self.checkpoints = 0
        self._last_checkpoint_progress = self._fraction(self._done_s)
        rate_per_s = max(command.failure_rate_per_card_hour, 0.0) * command.cards / 3600.0
        rng = random.Random(f"{command.seed}:{command.job}:{command.attempt}")
        self._fail_at_sim_s = rng.expovariate(rate_per_s) if rate_per_s > 0 else math.inf
        self._sim_elapsed_s = 0.0

    def _fraction(self, done_s: float) -> float:
        return 1.0 if self._work_s <= 0 else min(1.0, done_s / self._work_s)

    @property
    def progress(self) -> float:
        done = self._done_s
        if self._computing_since is not None:
            done += (self.clock.monotonic() - self._computing_since) * self._scale
        return self._fraction(done)

    def begin(self) -> None:
        self.sink.started(resumed_from=self.command.resume_from)
        self._launch(self._run())

    def fail_now(self, reason: str = "card fault") -> None:
        """Inject an infrastructure failure now (the attempt exits with ``infra_failure``)."""
        self._fault = reason
        self._wake.set()

    async def stop(self, *, checkpoint: bool = True, detail: str = "") -> None:
        if not self.done:
            self._stop = (checkpoint, detail)
            self._wake.set()
        await self.wait()

    async def abort(self, detail: str) -> None:
        if not self.done:
            self._abort = detail
            self._wake.set()
        await self.wait()

    async def _advance(self, sim_s: float, *, computing: bool) -> bool:
        """Let ``sim_s`` simulated seconds pass; False if interrupted (failure, fault, stop)."""
        until_failure = self._fail_at_sim_s - self._sim_elapsed_s
        step = min(sim_s, until_failure)
        start = self.clock.monotonic()
        if computing:
            self._computing_since = start
        interrupted = self._wake.is_set()
        completed = False
        try:
            if interrupted:
                pass
            elif step > 0:
                # woken: a fault or stop was asked for; else the step's time passed
                interrupted = await wait_or_sleep(self.clock, self._wake, step / self._scale)
                completed = not interrupted
            else:
                completed = True
        finally:
            # On interruption or cancellation only the time that really passed counts.
            passed = max(step, 0.0) if completed else min(max(step, 0.0), (self.clock.monotonic() - start) * self._scale)
            self._computing_since = None
            self._sim_elapsed_s += passed
            if computing:
                self._done_s = min(self._work_s, self._done_s + passed)
                if self._work_s - self._done_s < 1e-9 * max(1.0, self._work_s):
                    self._done_s = self._work_s  # float dust must not leave a sliver of work
        if interrupted:
            return False
        if step < sim_s:  # the drawn failure time came first
            self._fault = "infrastructure failure (drawn from the pool's failure rate)"
            return False
        return True

    async def _run(self) -> None:
        cmd = self.command
        ok = await self._advance(max(cmd.restart_s, 0.0), computing=False)
        interval = cmd.checkpoint_interval_s if cmd.checkpoint_interval_s > 0 else math.inf
        while ok and self._done_s < self._work_s:
            ok = await self._advance(min(interval, self._work_s - self._done_s), computing=True)
            if not ok or self._done_s >= self._work_s:
                break
            ok = await self._advance(max(cmd.checkpoint_cost_s, 0.0), computing=False)
            if ok:
                self._checkpoint()
        self._finish()

    def _checkpoint(self) -> None:
        self.checkpoints += 1
        progress = self._fraction(self._done_s)
        self._last_checkpoint_progress = progress
        self.sink.checkpointed(progress, f"sim://{self.sink.site}/{self.job}/{self.attempt}/{self.checkpoints}")

    def _finish(self) -> None:
        progress = self._fraction(self._done_s)
        if self._abort is not None:
            self.sink.exit("infra_failure", progress=progress, detail=self._abort)
        elif self._fault is not None:
            self.sink.exit("infra_failure", progress=progress, detail=self._fault)
        elif self._stop is not None:
            checkpoint, detail = self._stop
            if checkpoint and progress > self._last_checkpoint_progress:
                self._checkpoint()  # a graceful stop saves the work done so far
            self.sink.exit("stopped", progress=progress, detail=detail)
        else:
            self.sink.exit("completed", progress=1.0, exit_code=0)
