"""An attempt as one child process that reports over stdout: shared by ``process`` and ``container``.

The child talks back through stdout lines (everything else on stdout is ignored):

- ``CPN_CHECKPOINT <path> <progress>``: a checkpoint is complete (progress 0..1) -> a
  ``Checkpointed`` event; a relative path is resolved by the executor (:meth:`PipedAttempt.resolve`);
- ``CPN_PROGRESS <progress>``: progress for heartbeats (no event).

Exit 0 -> ``completed``; any other exit -> ``user_error`` with the exit code and the last stderr
lines in ``detail`` (an executor may explain some codes better, see :meth:`PipedAttempt.explain`).
A stop or abort ends it with ``stopped`` / ``infra_failure`` whatever the code. The child runs in
its own session, so a stop reaches its whole process group.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections import deque
from collections.abc import Callable

from edge_agent import wire
from edge_agent.executors import AttemptTask, EventSink, RunningAttempt
from edge_agent.logs import log

CHECKPOINT_PREFIX = "CPN_CHECKPOINT"
PROGRESS_PREFIX = "CPN_PROGRESS"


def parse_line(line: str) -> tuple[str, str, float] | None:
    """Parse one stdout line of the checkpoint protocol.

    Returns:
        ``("checkpoint", path, progress)``, ``("progress", "", progress)``, or None for other lines.

    Raises:
        ValueError: a ``CPN_`` line that does not follow the protocol.
    """
    parts = line.split()
    if not parts or parts[0] not in (CHECKPOINT_PREFIX, PROGRESS_PREFIX):
        return None
    if parts[0] == CHECKPOINT_PREFIX:
        if len(parts) != 3:
            raise ValueError(f"want '{CHECKPOINT_PREFIX} <path> <progress>', got {line!r}")
        kind, path, value = "checkpoint", parts[1], parts[2]
    else:
        if len(parts) != 2:
            raise ValueError(f"want '{PROGRESS_PREFIX} <progress>', got {line!r}")
        kind, path, value = "progress", "", parts[1]
    progress = float(value)
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress {progress} is outside 0..1 in {line!r}")
    return kind, path, progress


def attempt_env(command: wire.StartAttempt, checkpoint_dir: str, progress: float) -> dict[str, str]:
    """The ``CPN_*`` variables every piped attempt gets (``checkpoint_dir`` as the child sees it)."""
    return {
        "CPN_JOB_ID": command.job,
        "CPN_ATTEMPT": str(command.attempt),
        "CPN_CHECKPOINT_DIR": checkpoint_dir,
        "CPN_RESUME_FROM": command.resume_from,
        "CPN_PROGRESS_START": repr(progress),
    }


class ProtocolLines:
    """Acting on the child's stdout lines (the protocol above), for an attempt whose output is read
    by the agent: ``piped`` attempts and Slurm jobs. A checkpoint line becomes a ``Checkpointed``
    event (its path through :meth:`resolve`), every protocol line sets ``_progress``, a bad one is
    counted in ``protocol_errors`` and logged; any other line is ignored."""

    sink: EventSink
    job: str
    attempt: int
    _progress: float
    protocol_errors: int

    def resolve(self, path: str) -> str:
        """The checkpoint URI to report for a path the child printed."""
        return path

    def protocol_line(self, line: str) -> None:
        try:
            parsed = parse_line(line)
        except ValueError as exc:
            self.protocol_errors += 1
            log(logging.WARNING, "attempt_bad_protocol_line", site=self.sink.site, job=self.job,
                attempt=self.attempt, error=str(exc))
            return
        if parsed is None:
            return
        kind, path, progress = parsed
        self._progress = progress
        if kind == "checkpoint":
            self.sink.checkpointed(progress, self.resolve(path))


class PipedAttempt(ProtocolLines, AttemptTask):
    """One attempt as a child process; subclasses say how to resolve paths, explain exits and halt."""

    def __init__(self, command: wire.StartAttempt, sink: EventSink, on_exit: Callable[[RunningAttempt], None],
                 *, grace_s: float, stderr_lines: int) -> None:
        super().__init__(command, sink, on_exit)
        self.grace_s = grace_s
        self._stderr_lines = stderr_lines
        self._progress = min(max(command.progress, 0.0), 1.0)
        self._stderr: deque[str] = deque(maxlen=max(stderr_lines, 1))
        self._proc: asyncio.subprocess.Process | None = None
        self._ending: tuple[wire.ExitReason, str] | None = None  # set by stop()/abort()
        self.protocol_errors = 0

    @property
    def progress(self) -> float:
        return self._progress

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    # ------------------------------------------------------------------ hooks

    def explain(self, code: int) -> str:
        """What a non-zero exit code means (the stderr tail is added after it)."""
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    async def halt(self) -> None:
        """Make the child exit (called once by stop/abort): SIGTERM, ``grace_s``, SIGKILL."""
        self.kill_group(signal.SIGTERM)
        try:
            async with asyncio.timeout(self.grace_s):
                await self._finished.wait()
        except TimeoutError:
            log(logging.WARNING, "attempt_kill", site=self.sink.site, job=self.job, attempt=self.attempt,
                grace_s=self.grace_s)
            self.kill_group(signal.SIGKILL)

    async def cleanup(self) -> None:
        """After the attempt task was cancelled and its child killed (e.g. remove a container)."""

    # ------------------------------------------------------------------ running

    def fail_to_start(self, detail: str) -> None:
        """End the attempt before it started (``user_error``): nothing ran."""
        self.sink.exit("user_error", progress=self._progress, detail=detail)
        self._finished.set()
        self._on_exit(self)

    async def spawn(self, argv: list[str], *, env: dict[str, str], cwd: str | None = None) -> None:
        """Start ``argv`` and the task that reads it; a failure to start ends the attempt."""
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *argv, cwd=cwd, env=env,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # its own group: a stop reaches the children too
            )
        except OSError as exc:
            self.fail_to_start(f"cannot start {argv[0]!r}: {exc}")
            return
        self.sink.started(resumed_from=self.command.resume_from)
        log(logging.INFO, "attempt_process_started", site=self.sink.site, job=self.job, attempt=self.attempt,
            pid=self._proc.pid, executor=self.command.executor)
        self._launch(self._run())

    async def _read_stdout(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            self.protocol_line(raw.decode("utf-8", errors="replace").strip())

    async def _read_stderr(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            line = raw.decode("utf-8", errors="replace").rstrip()
            if line:
                self._stderr.append(line)

    async def _run(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None and proc.stderr is not None
        try:
            await asyncio.gather(self._read_stdout(proc.stdout), self._read_stderr(proc.stderr))
            code = await proc.wait()
        except asyncio.CancelledError:
            self.kill_group(signal.SIGKILL)
            await proc.wait()
            await self.cleanup()
            raise
        finally:
            self._close_transport()
        if self._ending is not None:
            reason, detail = self._ending
            self.sink.exit(reason, progress=self._progress, exit_code=code, detail=detail)
        elif code == 0:
            self._progress = 1.0
            self.sink.exit("completed", progress=1.0, exit_code=0)
        else:
            how = self.explain(code)
            tail = "\n".join(list(self._stderr)[-self._stderr_lines:]) if self._stderr_lines else ""
            detail = f"{how}; stderr:\n{tail}" if tail else how
            self.sink.exit("user_error", progress=self._progress, exit_code=code, detail=detail)

    def _close_transport(self) -> None:
        # Close the pipes now rather than at garbage collection (ResourceWarning otherwise).
        transport = getattr(self._proc, "_transport", None)
        if transport is not None:
            transport.close()

    def kill_group(self, sig: int) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    async def _terminate(self, reason: wire.ExitReason, detail: str) -> None:
        if self.done:
            return
        if self._ending is None:
            self._ending = (reason, detail)
            await self.halt()
        await self.wait()

    async def stop(self, *, checkpoint: bool = True, detail: str = "") -> None:
        # SIGTERM is the program's cue to checkpoint (documented in docs/agent.md); ``checkpoint``
        # cannot be honoured any other way for a foreign program.
        await self._terminate("stopped", detail)

    async def abort(self, detail: str) -> None:
        await self._terminate("infra_failure", detail)
