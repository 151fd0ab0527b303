"""The ``process`` executor (development): an allow-listed command in a bubblewrap sandbox.

The command (``StartAttempt.command``, an argv list, no shell) runs only if its program resolves
to one the site allow-listed (``executors.process.commands``), and then only inside
``bwrap`` with, per attempt:

- new network, PID, IPC and UTS namespaces: no host network (not even loopback), no host processes;
- the host filesystem read-only, an empty ``/tmp``, and empty tmpfs over the agent's data dir (its
  credentials, outbox and every other job's checkpoints) and over the ``hide`` paths; only this
  job's checkpoint dir is bound writable (at the same path as on the host);
- ``prlimit`` limits (address space, processes, open files: bwrap has none of its own), then
  ``setpriv`` drops to the configured unprivileged user with no capabilities and no-new-privs;
- a minimal environment: ``PATH``, ``HOME`` (the checkpoint dir), ``LANG`` and the ``CPN_*``
  variables (see :func:`edge_agent.executors.piped.attempt_env`).

Without ``bwrap`` (or ``prlimit``/``setpriv``), or when the user cannot be switched to, every
attempt is refused with that reason: it never runs unsandboxed. The stdout protocol and exit
mapping are those of :mod:`edge_agent.executors.piped`. Stop: SIGTERM to the group, ``grace_s``,
SIGKILL -> ``stopped``.
"""

from __future__ import annotations

import os
import pwd
import shutil
from collections.abc import Callable
from pathlib import Path

from edge_agent import wire
from edge_agent.config import ProcessExecutorConfig
from edge_agent.executors import EventSink, RunningAttempt
from edge_agent.executors.piped import PipedAttempt, attempt_env, parse_line

__all__ = ["ProcessExecutor", "parse_line", "sandbox_argv"]

SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
ALWAYS_HIDDEN = ("/root", "/home", "/run")


def resolve_program(program: str) -> str | None:
    """``argv[0]`` as the real file it runs (``PATH`` lookup, symlinks followed), or None."""
    found = program if "/" in program else shutil.which(program, path=SANDBOX_PATH)
    if found is None or not os.path.isabs(found):
        return None
    real = os.path.realpath(found)
    return real if os.path.isfile(real) and os.access(real, os.X_OK) else None


def resolve_user(user: str) -> tuple[int, int]:
    """``"nobody"`` or ``"65534"`` -> (uid, gid of its primary group). Raises KeyError if unknown."""
    entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


def sandbox_argv(argv: list[str], *, bwrap: str, uid: int, gid: int, checkpoint_dir: Path, cwd: Path,
                 hidden: list[Path], memory_mib: int, nproc: int, nofile: int, drop: bool = True) -> list[str]:
    """The full command line running ``argv`` sandboxed (pure: no file is touched).

    ``hidden`` paths get an empty tmpfs (outermost first); the checkpoint dir is then bound back
    writable, with the directories above it (inside a hidden path) recreated 0755 so the
    unprivileged user can reach it.
    """
    # bwrap ignores SIGTERM (a stop's SIGTERM to the group is the program's, which gets the default
    # disposition back just before it runs); SIGKILL of bwrap ends the whole PID namespace.
    out = ["env", "--ignore-signal=TERM", bwrap, "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
           # No --new-session: the agent starts bwrap in a session of its own already (no terminal
           # to inject into), and the program must stay in that process group so a stop reaches it.
           "--die-with-parent",
           "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    for path in sorted(set(hidden), key=lambda p: len(p.parts)):
        out += ["--perms", "0755", "--tmpfs", str(path)]
    covering = [h for h in hidden if checkpoint_dir.is_relative_to(h)]
    if covering:
        top = min(covering, key=lambda p: len(p.parts))
        for parent in reversed(checkpoint_dir.parents):
            if parent.is_relative_to(top) and parent != top:
                out += ["--perms", "0755", "--dir", str(parent)]
    out += ["--bind", str(checkpoint_dir), str(checkpoint_dir), "--chdir", str(cwd), "--",
            "prlimit", f"--as={memory_mib * 1024 * 1024}", f"--nproc={nproc}", f"--nofile={nofile}", "--"]
    if drop:
        out += ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--inh-caps=-all",
                "--bounding-set=-all", "--no-new-privs", "--"]
    return [*out, "env", "--default-signal=TERM", *argv]


class ProcessExecutor:
    """Runs allow-listed commands sandboxed, checkpoints under ``<data_dir>/checkpoints/<job>``."""

    name = "process"

    def __init__(self, config: ProcessExecutorConfig, data_dir: Path) -> None:
        self._config = config
        self.data_dir = data_dir
        self.work_dir = Path(config.work_dir) if config.work_dir else None
        self.allowed = {real for c in config.commands if (real := resolve_program(c)) is not None}
        self.bwrap = shutil.which(config.bwrap) or ""
        self.uid, self.gid = -1, -1
        self.unavailable = self._setup_problem()
        """Why no attempt can run here at all ("" when the sandbox is ready); logged at agent start."""

    def __repr__(self) -> str:
        state = self.unavailable or "ready"
        return f"<ProcessExecutor allowed={len(self.allowed)} user={self._config.user} {state}>"

    def _setup_problem(self) -> str:
        if not self.bwrap:
            return f"bubblewrap ({self._config.bwrap!r}) is not installed: the process executor never runs unsandboxed"
        for tool in ("prlimit", "setpriv"):
            if shutil.which(tool) is None:
                return f"{tool} (util-linux) is not installed: the process executor cannot set limits or drop privileges"
        try:
            self.uid, self.gid = resolve_user(self._config.user)
        except (KeyError, ValueError):
            return f"user {self._config.user!r} does not exist on this host"
        if self.uid == 0:
            return f"user {self._config.user!r} is root: the process executor needs an unprivileged user"
        if os.geteuid() != 0 and os.geteuid() != self.uid:
            return (f"the agent runs as uid {os.geteuid()}, not root: it cannot switch to user "
                    f"{self._config.user!r} (run the agent as root or set user to its own)")
        return ""

    def checkpoint_dir(self, job: str) -> Path:
        return self.data_dir / "checkpoints" / job

    def hidden(self) -> list[Path]:
        paths = {Path(p) for p in (*ALWAYS_HIDDEN, *self._config.hide)} | {self.data_dir}
        return [p for p in paths if p.is_absolute() and p != Path("/")]

    def refusal(self, command: wire.StartAttempt) -> str:
        if self.unavailable:
            return f"process executor unavailable at this site: {self.unavailable}"
        if not command.command:
            return "StartAttempt.command is empty"
        program = command.command[0]
        real = resolve_program(program)
        if real is None or real not in self.allowed:
            allowed = ", ".join(sorted(self._config.commands)) or "none"
            return f"command {program!r} is not allowed at this site (allowed programs: {allowed})"
        return ""

    def argv(self, command: wire.StartAttempt) -> list[str]:
        checkpoint_dir = self.checkpoint_dir(command.job)
        cfg = self._config
        return sandbox_argv(list(command.command), bwrap=self.bwrap, uid=self.uid, gid=self.gid,
                            checkpoint_dir=checkpoint_dir, cwd=self.work_dir or checkpoint_dir,
                            hidden=self.hidden(), memory_mib=cfg.memory_mib, nproc=cfg.nproc, nofile=cfg.nofile,
                            drop=os.geteuid() != self.uid)

    async def start(self, command: wire.StartAttempt, sink: EventSink,
                    on_exit: Callable[[RunningAttempt], None]) -> RunningAttempt:
        attempt = ProcessAttempt(command, sink, on_exit, grace_s=self._config.grace_s,
                                 stderr_lines=self._config.stderr_lines)
        checkpoint_dir = self.checkpoint_dir(command.job)
        attempt.cwd = self.work_dir or checkpoint_dir
        why = self.refusal(command)  # the agent asked already; a direct caller may not have
        if why:
            attempt.fail_to_start(why)
            return attempt
        try:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                os.chown(checkpoint_dir, self.uid, self.gid)
            checkpoint_dir.chmod(0o700)
        except OSError as exc:
            attempt.fail_to_start(f"cannot prepare checkpoint dir: {exc.strerror or exc}")
            return attempt
        env = {"PATH": SANDBOX_PATH, "HOME": str(checkpoint_dir), "LANG": "C.UTF-8",
               **attempt_env(command, str(checkpoint_dir), attempt.progress)}
        await attempt.spawn(self.argv(command), env=env)
        return attempt


class ProcessAttempt(PipedAttempt):
    """One sandboxed attempt; checkpoint paths are host paths (the dir is bound at the same path)
    and a relative one is taken from the directory the command started in."""

    cwd: Path = Path("/")

    def resolve(self, path: str) -> str:
        where = Path(path)
        return str(where if where.is_absolute() else self.cwd / where)
