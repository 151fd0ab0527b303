"""The ``slurm`` executor: a training attempt as one job of the site's own Slurm.

A site that already schedules its cluster with Slurm keeps doing so: the agent submits each
attempt with ``sbatch`` (the whole gang is one Slurm job), follows it with ``squeue``, reads its
stdout file for the checkpoint protocol, and ends it with ``scancel``. The hub sends command jobs
with executor ``process``; an agent with ``slurm`` enabled (and ``process`` not) runs them here.

Promises (beyond those of every executor, see :mod:`edge_agent.executors`):

- Rule 1: the argv never meets a shell. sbatch runs a fixed batch script (``exec "$@"``) and passes
  the argv after it as the script's arguments, so no character in the command is ever parsed.
- Rule 2: ``argv[0]`` must be on the site's ``commands`` list, else the attempt is refused
  (``user_error``, detail starting ``refused:``) and nothing is submitted.
- Rule 3: ``AttemptStarted`` is emitted when Slurm says the job runs, not at submission;
  ``Checkpointed`` for each ``CPN_CHECKPOINT <path> <progress>`` line in the job's stdout file (the
  same protocol as the ``process`` executor); ``AttemptExited`` from the final state
  (:func:`outcome`), read from ``scontrol show job``, else ``sacct``, else a jobcomp/filetxt log.
- Rule 4: ``stop()`` sends SIGTERM to every process of the job (``scancel --signal=TERM --full``),
  waits ``grace_s``, then cancels it (``scancel``) -> ``stopped``; ``abort()`` does the same and
  reports ``infra_failure``. Both return once Slurm no longer runs the job.
- Rule 5: the job gets only the ``CPN_*`` variables and the names in ``export_env`` from the
  agent's environment (``--export``), and ``--no-requeue``: restarts are the hub's to decide.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
from collections import deque
from collections.abc import Callable
from pathlib import Path

from edge_agent import wire
from edge_agent.config import SlurmExecutorConfig
from edge_agent.executors import AttemptTask, EventSink, RunningAttempt
from edge_agent.executors.piped import ProtocolLines, attempt_env
from edge_agent.logs import log

BATCH_SCRIPT = """#!/bin/sh
# cpn attempt: the command is this script's arguments, run as they are (no shell parses them).
exec "$@"
"""

ACTIVE_STATES = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
    "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "SPECIAL_EXIT",
})
RUNNING_STATES = frozenset({"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "SUSPENDED", "STOPPED"})
RAN_STATES = frozenset({"COMPLETED", "FAILED", "OUT_OF_MEMORY", "TIMEOUT"})
"""Final states only a job that started can reach."""

INFRA_STATES = {
    "NODE_FAIL": "a node of the job failed",
    "BOOT_FAIL": "a node of the job failed to boot",
    "PREEMPTED": "preempted by the site's Slurm",
    "DEADLINE": "the site's Slurm could not run it before its deadline",
    "REVOKED": "revoked by the site's Slurm federation",
    "CANCELLED": "cancelled at the site, not by cpn",
}

_STATE_RE = re.compile(r"(?:^| )JobState=(\S+)")
_EXIT_RE = re.compile(r"(?:^| )ExitCode=(\d+):(\d+)")
_TAIL_BYTES = 65536
_MAX_PARTIAL = 1 << 20


def outcome(state: str, exit_code: int | None, *, time_limit_min: int | None = None) -> tuple[wire.ExitReason, str]:
    """How a Slurm final state ends an attempt that cpn did not stop (docs/agent.md has the table).

    ``exit_code`` is the command's code, negative for a signal. Returns ``(reason, detail)``.
    """
    if state == "COMPLETED":
        return "completed", ""
    if state == "FAILED":
        how = f"killed by signal {-exit_code}" if exit_code is not None and exit_code < 0 else f"exit code {exit_code}"
        return "user_error", how
    if state == "OUT_OF_MEMORY":
        return "user_error", "memory limit: killed by the site's Slurm for using more memory than it was given"
    if state == "TIMEOUT":
        limit = f" of {time_limit_min} min" if time_limit_min else ""
        return "user_error", f"time limit{limit} reached (the job's estimate times the site's time_limit_factor)"
    if state in INFRA_STATES:
        return "infra_failure", f"Slurm state {state}: {INFRA_STATES[state]}"
    return "infra_failure", f"Slurm state {state or 'unknown'}: the job's outcome could not be read"


def parse_record(text: str) -> tuple[str, int | None] | None:
    """``(state, exit_code)`` from a ``scontrol show job -o`` line or a jobcomp/filetxt record.

    The first ``JobState=`` / ``ExitCode=`` are taken: both come before the job's command and work
    dir in these records, so a command's own text cannot pose as them. A signal is a negative code.
    """
    state = _STATE_RE.search(text)
    if state is None:
        return None
    code = _EXIT_RE.search(text)
    exit_code: int | None = None
    if code is not None:
        exit_code = -int(code.group(2)) if int(code.group(2)) else int(code.group(1))
    return state.group(1), exit_code


def parse_sacct(text: str) -> tuple[str, int | None] | None:
    """``(state, exit_code)`` from ``sacct -n -P -X -o State,ExitCode`` (``CANCELLED by 0|0:15``)."""
    for line in text.splitlines():
        state, sep, code = line.partition("|")
        if not sep or not state.split():
            continue
        first, _, second = code.partition(":")
        try:
            exit_code = -int(second) if second and int(second) else int(first)
        except ValueError:
            exit_code = None
        return state.split()[0], exit_code
    return None


class SlurmExecutor:
    """Submits attempts to the site's Slurm. Paths default under the agent's ``data_dir``."""

    name = "slurm"

    def __init__(self, config: SlurmExecutorConfig, data_dir: Path) -> None:
        self.config = config
        self.work_dir = Path(config.work_dir) if config.work_dir else data_dir / "slurm" / "work"
        self.checkpoints = Path(config.checkpoint_dir) if config.checkpoint_dir else data_dir / "checkpoints"
        self.attempts_dir = Path(config.attempts_dir) if config.attempts_dir else data_dir / "slurm" / "attempts"
        self.env = dict(os.environ)
        if config.slurm_conf:
            self.env["SLURM_CONF"] = config.slurm_conf
        self.sacct_works = bool(config.sacct)

    async def start(self, command: wire.StartAttempt, sink: EventSink,
                    on_exit: Callable[[RunningAttempt], None]) -> RunningAttempt:
        attempt = SlurmAttempt(command, sink, on_exit, self)
        await attempt.begin()
        return attempt

    async def run(self, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        """Run one Slurm command: ``(returncode, stdout, stderr)``; 127 if it cannot be run, -1 on timeout."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *args, env=env or self.env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except (OSError, ValueError) as exc:
            return 127, "", f"cannot run {args[0]}: {exc}"
        try:
            async with asyncio.timeout(self.config.command_timeout_s):
                out, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return -1, "", f"{args[0]} timed out after {self.config.command_timeout_s:g} s"
        except asyncio.CancelledError:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        assert proc.returncode is not None
        return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    def refusal(self, command: wire.StartAttempt) -> str:
        """Why this site will not run ``command`` here, or ``""``."""
        argv = command.command
        if not argv:
            return "the job has no command"
        if argv[0] not in self.config.commands:
            allowed = ", ".join(self.config.commands) or "none"
            return f"command {argv[0]!r} is not on this site's allow-list for Slurm jobs (allowed: {allowed})"
        if any("\0" in a for a in argv):
            return "the command contains a NUL byte"
        return ""

    def resources(self, command: wire.StartAttempt) -> tuple[list[str], int | None] | str:
        """The sbatch resource options for the gang and its ``--time`` in minutes, or why it cannot fit."""
        c = self.config
        per_node = c.cards_per_node
        if command.cards <= per_node:
            nodes, cards = 1, command.cards
        elif command.cards % per_node == 0:
            nodes, cards = command.cards // per_node, per_node
        else:
            return f"{command.cards} cards do not split into whole nodes of {per_node} (cards_per_node)"
        args = [f"--nodes={nodes}", "--ntasks-per-node=1"]
        gres = c.gres.get(command.accelerator, "gpu")
        if gres:
            args.append(f"--gres={gres}:{cards}")
        if c.cpus_per_task:
            args.append(f"--cpus-per-task={c.cpus_per_task}")
        for flag, value in (("--partition", c.partition), ("--account", c.account), ("--qos", c.qos)):
            if value:
                args.append(f"{flag}={value}")
        minutes: int | None = None
        if c.time_limit_factor > 0:
            remaining_s = command.work_s * (1.0 - min(max(command.progress, 0.0), 1.0))
            minutes = max(1, math.ceil(remaining_s * c.time_limit_factor / 60.0))
            args.append(f"--time={minutes}")
        return args, minutes


class SlurmAttempt(ProtocolLines, AttemptTask):
    """One attempt as one Slurm batch job."""

    def __init__(self, command: wire.StartAttempt, sink: EventSink, on_exit: Callable[[RunningAttempt], None],
                 executor: SlurmExecutor) -> None:
        super().__init__(command, sink, on_exit)
        self.executor = executor
        self.config = executor.config
        self.dir = executor.attempts_dir / command.job / str(command.attempt)
        self.stdout_path = self.dir / "stdout"
        self.stderr_path = self.dir / "stderr"
        self.checkpoint_dir = executor.checkpoints / command.job
        self.slurm_id = ""
        self.state = ""
        self.time_limit_min: int | None = None
        self._progress = min(max(command.progress, 0.0), 1.0)
        self._offset = 0
        self._partial = b""
        self._ending: tuple[wire.ExitReason, str] | None = None  # set by stop()/abort()
        self._wake = asyncio.Event()
        self.started = False
        self.polls = 0
        self.protocol_errors = 0

    @property
    def progress(self) -> float:
        return self._progress

    def _fail_to_start(self, reason: wire.ExitReason, detail: str) -> None:
        log(logging.WARNING, "attempt_slurm_not_submitted", site=self.sink.site, job=self.job,
            attempt=self.attempt, reason=reason, detail=detail)
        self.sink.exit(reason, progress=self._progress, detail=detail)
        self._finished.set()
        self._on_exit(self)

    async def begin(self) -> None:
        cmd, ex = self.command, self.executor
        refusal = ex.refusal(cmd)
        if refusal:
            self._fail_to_start("user_error", f"refused: {refusal}")
            return
        resources = ex.resources(cmd)
        if isinstance(resources, str):
            self._fail_to_start("infra_failure", f"refused: {resources}")
            return
        options, self.time_limit_min = resources
        try:
            for d in (self.dir, ex.work_dir, self.checkpoint_dir):
                d.mkdir(parents=True, exist_ok=True)
            for old in (self.stdout_path, self.stderr_path):  # a resent attempt must not replay old lines
                old.unlink(missing_ok=True)
            script = self.dir / "job.sh"
            script.write_text(BATCH_SCRIPT)
            script.chmod(0o755)
        except OSError as exc:
            self._fail_to_start("infra_failure", f"cannot prepare the attempt's files: {exc}")
            return
        cpn_env = attempt_env(cmd, str(self.checkpoint_dir), self._progress)
        exported = [*cpn_env, *(n for n in self.config.export_env if n in ex.env and n not in cpn_env)]
        args = [
            self.config.sbatch, "--parsable", f"--job-name=cpn-{cmd.job}-{cmd.attempt}", "--no-requeue",
            *options, f"--chdir={ex.work_dir}", f"--output={self.stdout_path}", f"--error={self.stderr_path}",
            f"--export={','.join(exported)}", *self.config.extra_args, str(script), *cmd.command,
        ]
        code, out, err = await ex.run(*args, env={**ex.env, **cpn_env})
        first = out.strip().split(";")[0]
        if code != 0 or not first.isdigit():
            self._fail_to_start("infra_failure", f"sbatch failed ({code}): {(err or out).strip()[-500:]}")
            return
        self.slurm_id = first
        log(logging.INFO, "attempt_slurm_submitted", site=self.sink.site, job=self.job, attempt=self.attempt,
            slurm_job=self.slurm_id)
        self._launch(self._run())

    # ------------------------------------------------------------------ following the job

    def _read_stdout(self) -> None:
        try:
            with open(self.stdout_path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > _MAX_PARTIAL:  # no protocol line is this long: drop it
            self._partial = b""
        for raw in lines:
            self.protocol_line(raw.decode("utf-8", errors="replace").strip())

    def resolve(self, path: str) -> str:
        where = Path(path)
        return str(where if where.is_absolute() else self.executor.work_dir / where)

    def _stderr_tail(self) -> str:
        lines = self.config.stderr_lines
        if not lines:
            return ""
        try:
            with open(self.stderr_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - _TAIL_BYTES))
                text = f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(deque((ln.rstrip() for ln in text.splitlines() if ln.strip()), maxlen=lines))

    async def _squeue_state(self) -> str | None:
        """The job's state while Slurm has it queued or running; ``""`` once it is not; None if unknown."""
        code, out, err = await self.executor.run(self.config.squeue, "-h", "-j", self.slurm_id, "-o", "%T")
        if code == 0:
            return out.strip().split()[0] if out.strip() else ""
        if "Invalid job id" in err:
            return ""
        log(logging.WARNING, "slurm_squeue_failed", site=self.sink.site, job=self.job, attempt=self.attempt,
            slurm_job=self.slurm_id, code=code, error=err.strip()[-300:])
        return None

    async def final_state(self) -> tuple[str, int | None]:
        """The ended job's state and exit code: scontrol, else sacct, else the jobcomp log."""
        ex = self.executor
        code, out, _ = await ex.run(self.config.scontrol, "show", "job", "-o", self.slurm_id)
        record = parse_record(out) if code == 0 else None
        if record is None and ex.sacct_works:
            code, out, err = await ex.run(self.config.sacct, "-n", "-P", "-X", "-j", self.slurm_id,
                                          "-o", "State,ExitCode")
            if code != 0 and "accounting storage is disabled" in err:
                ex.sacct_works = False
            record = parse_sacct(out) if code == 0 else None
        if record is None and self.config.jobcomp_file:
            record = self._jobcomp_record()
        return record or ("", None)

    def _jobcomp_record(self) -> tuple[str, int | None] | None:
        prefix = f"JobId={self.slurm_id} "
        found: tuple[str, int | None] | None = None
        try:
            with open(self.config.jobcomp_file, encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith(prefix):
                        found = parse_record(line) or found  # the last record of this id wins
        except OSError:
            return None
        return found

    async def _run(self) -> None:
        try:
            await self._follow()
        except asyncio.CancelledError:
            if self.slurm_id:
                await asyncio.shield(self.executor.run(self.config.scancel, self.slurm_id))
            raise

    async def _follow(self) -> None:
        while True:
            state = await self._squeue_state()
            self.polls += 1
            self._read_stdout()
            if state is not None:
                self.state = state or self.state
                if state in RUNNING_STATES and not self.started:
                    self._mark_started()
                if state not in ACTIVE_STATES:
                    break
            self._wake.clear()
            try:
                async with asyncio.timeout(self.config.poll_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
        final, exit_code = await self.final_state()
        self.state = final or self.state
        self._read_stdout()
        if self._partial:
            self.protocol_line(self._partial.decode("utf-8", errors="replace").strip())
            self._partial = b""
        if not self.started and (final in RAN_STATES or self.stdout_path.exists()):
            self._mark_started()  # it ran between two polls
        if self._ending is not None:
            reason, detail = self._ending
            self.sink.exit(reason, progress=self._progress, exit_code=exit_code, detail=detail)
            return
        reason, detail = outcome(final, exit_code, time_limit_min=self.time_limit_min)
        if reason == "completed":
            self._progress = 1.0
            self.sink.exit("completed", progress=1.0, exit_code=exit_code or 0)
            return
        if reason == "user_error":
            tail = self._stderr_tail()
            detail = f"{detail}; stderr:\n{tail}" if tail else detail
        self.sink.exit(reason, progress=self._progress, exit_code=exit_code,
                       detail=f"{detail} (Slurm job {self.slurm_id})")

    def _mark_started(self) -> None:
        self.started = True
        self.sink.started(resumed_from=self.command.resume_from)
        log(logging.INFO, "attempt_slurm_running", site=self.sink.site, job=self.job, attempt=self.attempt,
            slurm_job=self.slurm_id)

    # ------------------------------------------------------------------ ending it

    async def _terminate(self, reason: wire.ExitReason, detail: str) -> None:
        if self.done:
            return
        if self._ending is None:
            self._ending = (reason, detail)
        run, scancel = self.executor.run, self.config.scancel
        if self.state in RUNNING_STATES:
            # SIGTERM to every process of the job (the batch step is the command itself): its cue to checkpoint.
            await run(scancel, "--signal=TERM", "--full", self.slurm_id)
            try:
                async with asyncio.timeout(self.config.grace_s):
                    await self._finished.wait()
            except TimeoutError:
                log(logging.WARNING, "attempt_kill", site=self.sink.site, job=self.job, attempt=self.attempt,
                    grace_s=self.config.grace_s, slurm_job=self.slurm_id)
        if not self.done:
            await run(scancel, self.slurm_id)
            self._wake.set()
        await self.wait()

    async def stop(self, *, checkpoint: bool = True, detail: str = "") -> None:
        await self._terminate("stopped", detail)

    async def abort(self, detail: str) -> None:
        # The Slurm job could outlive the agent, but the protocol says an aborted attempt is over
        # (the hub restarts it from its checkpoint), so it is cancelled like a stop.
        await self._terminate("infra_failure", detail)
