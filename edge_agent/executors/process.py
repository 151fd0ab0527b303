"""The ``process`` executor: a training attempt as a real subprocess.

The command (``StartAttempt.command``, an argv list, no shell) runs in its own process group in the
configured work dir with these extra environment variables:

- ``CPN_JOB_ID``, ``CPN_ATTEMPT``: who it is;
- ``CPN_CHECKPOINT_DIR``: a per-job directory under ``<data_dir>/checkpoints/`` (kept across attempts);
- ``CPN_RESUME_FROM``: the checkpoint to resume from, or empty for a fresh start;
- ``CPN_PROGRESS_START``: the fraction already done at that checkpoint.

It talks back through stdout lines (everything else on stdout is ignored):

- ``CPN_CHECKPOINT <path> <progress>``: a checkpoint is complete (path relative to the work dir
  or absolute, progress 0..1) -> a ``Checkpointed`` event;
- ``CPN_PROGRESS <progress>``: progress for heartbeats (no event).

Exit 0 -> ``completed``; any other exit -> ``user_error`` with the exit code and the last stderr
lines in ``detail``. ``StopAttempt`` sends SIGTERM to the group (a program may checkpoint then),
waits ``grace_s``, then SIGKILL -> ``stopped``.

After an agent crash the group is not re-attached (its pipes died with the agent): ``recover``
SIGKILLs what is left of it (:mod:`edge_agent.executors.orphans`) and the agent reports the attempt
lost, so the hub restarts it from its checkpoint and no orphan writes on meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections import deque
from collections.abc import Callable
from pathlib import Path

from edge_agent import wire
from edge_agent.config import ProcessExecutorConfig
from edge_agent.attempt_journal import AttemptRecord
from edge_agent.executors import AttemptTask, EventSink, RunningAttempt
from edge_agent.executors.orphans import kill_orphan_group
from edge_agent.logs import log

CHECKPOINT_PREFIX = "CPN_CHECKPOINT"
PROGRESS_PREFIX = "CPN_PROGRESS"


class ProcessExecutor:
    """Runs attempts as subprocesses under ``data_dir``."""

    name = "process"

    def __init__(self, config: ProcessExecutorConfig, data_dir: Path) -> None:
        self._config = config
        self.data_dir = data_dir
        self.work_dir = Path(config.work_dir) if config.work_dir else data_dir / "work"

    def checkpoint_dir(self, job: str) -> Path:
        return self.data_dir / "checkpoints" / job

    async def start(self, command: wire.StartAttempt, sink: EventSink,
                    on_exit: Callable[[RunningAttempt], None]) -> RunningAttempt:
        attempt = ProcessAttempt(command, sink, on_exit, self._config,
                                 work_dir=self.work_dir, checkpoint_dir=self.checkpoint_dir(command.job))
        await attempt.begin()
        return attempt

    async def recover(self, record: AttemptRecord, sink: EventSink,
                      on_exit: Callable[[RunningAttempt], None]) -> RunningAttempt | None:
        """Cannot re-attach: end the orphaned process group, if any, and return None."""
        pgid = int(record.state.get("pgid", "0") or 0)
        if kill_orphan_group(pgid, record.job, record.attempt):
            log(logging.WARNING, "attempt_orphan_killed", site=sink.site, job=record.job, attempt=record.attempt,
                pgid=pgid)
        return None


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


class ProcessAttempt(AttemptTask):
    """One attempt as a subprocess in its own process group."""

    def __init__(self, command: wire.StartAttempt, sink: EventSink, on_exit: Callable[[RunningAttempt], None],
                 config: ProcessExecutorConfig, *, work_dir: Path, checkpoint_dir: Path) -> None:
        super().__init__(command, sink, on_exit)
        self._config = config
        self.work_dir = work_dir
        self.checkpoint_dir = checkpoint_dir
        self._progress = min(max(command.progress, 0.0), 1.0)
        self._stderr: deque[str] = deque(maxlen=max(config.stderr_lines, 1))
        self._proc: asyncio.subprocess.Process | None = None
        self._ending: tuple[wire.ExitReason, str] | None = None  # set by stop()/abort()
        self.protocol_errors = 0

    @property
    def progress(self) -> float:
        return self._progress

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def recovery(self) -> dict[str, str]:
        """Journalled by the agent: the process group to end after an agent crash."""
        return {"pgid": str(self._proc.pid)} if self._proc else {}

    async def begin(self) -> None:
        cmd = self.command
        env = dict(os.environ)
        env.update({
            "CPN_JOB_ID": cmd.job,
            "CPN_ATTEMPT": str(cmd.attempt),
            "CPN_CHECKPOINT_DIR": str(self.checkpoint_dir),
            "CPN_RESUME_FROM": cmd.resume_from,
            "CPN_PROGRESS_START": repr(self._progress),
        })
        try:
            if not cmd.command:
                raise ValueError("StartAttempt.command is empty")
            self.work_dir.mkdir(parents=True, exist_ok=True)
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            self._proc = await asyncio.create_subprocess_exec(
                *cmd.command, cwd=self.work_dir, env=env,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # its own group: stop() reaches the children too
            )
        except (OSError, ValueError) as exc:
            self.sink.exit("user_error", progress=self._progress, detail=f"cannot start {cmd.command!r}: {exc}")
            self._finished.set()
            self._on_exit(self)
            return
        self.sink.started(resumed_from=cmd.resume_from)
        log(logging.INFO, "attempt_process_started", site=self.sink.site, job=self.job, attempt=self.attempt,
            pid=self._proc.pid)
        self._launch(self._run())

    async def _read_stdout(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            line = raw.decode("utf-8", errors="replace").strip()
            try:
                parsed = parse_line(line)
            except ValueError as exc:
                self.protocol_errors += 1
                log(logging.WARNING, "attempt_bad_protocol_line", site=self.sink.site, job=self.job,
                    attempt=self.attempt, error=str(exc))
                continue
            if parsed is None:
                continue
            kind, path, progress = parsed
            self._progress = progress
            if kind == "checkpoint":
                where = Path(path)
                if not where.is_absolute():
                    where = self.work_dir / where
                self.sink.checkpointed(progress, str(where))

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
            await self._kill_group(signal.SIGKILL)
            await proc.wait()
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
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            tail = "\n".join(list(self._stderr)[-self._config.stderr_lines:]) if self._config.stderr_lines else ""
            detail = f"{how}; stderr:\n{tail}" if tail else how
            self.sink.exit("user_error", progress=self._progress, exit_code=code, detail=detail)

    def _close_transport(self) -> None:
        # Close the pipes now rather than at garbage collection (ResourceWarning otherwise).
        transport = getattr(self._proc, "_transport", None)
        if transport is not None:
            transport.close()

    async def _kill_group(self, sig: int) -> None:
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
        await self._kill_group(signal.SIGTERM)
        try:
            async with asyncio.timeout(self._config.grace_s):
                await self._finished.wait()
        except TimeoutError:
            log(logging.WARNING, "attempt_kill", site=self.sink.site, job=self.job, attempt=self.attempt,
                grace_s=self._config.grace_s)
            await self._kill_group(signal.SIGKILL)
        await self.wait()

    async def stop(self, *, checkpoint: bool = True, detail: str = "") -> None:
        # SIGTERM is the program's cue to checkpoint (documented in docs/agent.md); ``checkpoint``
        # cannot be honoured any other way for a foreign program.
        await self._terminate("stopped", detail)

    async def abort(self, detail: str) -> None:
        await self._terminate("infra_failure", detail)
