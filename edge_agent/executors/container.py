"""The ``container`` executor: a job's image under podman, one locked-down container per attempt.

An attempt runs only if its image (``StartAttempt.image``) is on the site's allow-list
(``executors.container.images``: exact references or prefixes ending in ``*``). Its container:

- ``--network none`` (only its own loopback), ``--read-only`` image, ``--cap-drop all``,
  ``--security-opt no-new-privileges``, runs as the configured non-root ``uid:gid``;
- cgroup limits: ``--memory`` (= ``--memory-swap``, so no swap) and ``--cpus`` per card held,
  ``--pids-limit`` per attempt;
- one writable mount: the job's checkpoint dir ``<data_dir>/checkpoints/<job>`` (owned by that
  user) at ``checkpoint_mount``; nothing else of the host, so nothing of the agent;
- ``--device`` only for the cards it was given: indices picked from the site's cards of that
  accelerator, nodes from the ``devices`` pattern (plus that type's shared nodes);
- ``--pull never`` unless configured otherwise: the site pulls images it allows ahead of time.

Its name, ``cpn-<site>-<job>-<attempt>``, lets a restarted agent find it; ``--rm`` removes it on
exit. Stop: ``podman stop -t grace_s`` (SIGTERM, then SIGKILL) -> ``stopped``. Exit 137 that we did
not cause -> ``user_error`` "killed: memory limit N MiB exceeded"; other exits as in
:mod:`edge_agent.executors.piped` (the container's stdout speaks the same protocol).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

from edge_agent import wire
from edge_agent.config import ContainerExecutorConfig
from edge_agent.executors import EventSink, RunningAttempt
from edge_agent.executors.piped import PipedAttempt, attempt_env
from edge_agent.logs import log

_IMAGE_RE = re.compile(r"^[a-z0-9][a-z0-9._/:@-]{0,254}$", re.IGNORECASE)


def image_allowed(image: str, allowed: list[str]) -> bool:
    """True when ``image`` equals an entry, or starts with an entry's text before its final ``*``."""
    if not _IMAGE_RE.match(image) or ".." in image:
        return False
    return any(image.startswith(a[:-1]) if a.endswith("*") else image == a for a in allowed)


def pick_cards(total: int, used: set[int], cards: int) -> list[int] | None:
    """The ``cards`` lowest indices in ``range(total)`` not in ``used``, or None if too few are free."""
    free = [i for i in range(total) if i not in used]
    return free[:cards] if len(free) >= cards else None


class ContainerExecutor:
    """Runs allow-listed images under podman; see the module docstring for the sandbox."""

    name = "container"

    def __init__(self, config: ContainerExecutorConfig, data_dir: Path, site: str,
                 accelerators: dict[str, int]) -> None:
        self.config = config
        self.data_dir = data_dir
        self.site = site
        self.accelerators = dict(accelerators)
        self.podman_path = shutil.which(config.podman) or ""
        self.unavailable = "" if self.podman_path else f"podman ({config.podman!r}) is not installed"
        """Why no attempt can run here at all ("" when ready); logged at agent start."""
        self.cards_in_use: dict[str, tuple[str, list[int]]] = {}
        """job -> (accelerator, card indices) of its running attempt."""

    def __repr__(self) -> str:
        return (f"<ContainerExecutor images={len(self.config.images)} running={len(self.cards_in_use)} "
                f"{self.unavailable or 'ready'}>")

    def checkpoint_dir(self, job: str) -> Path:
        return self.data_dir / "checkpoints" / job

    def container_name(self, job: str, attempt: int) -> str:
        return f"cpn-{self.site}-{job}-{attempt}"

    def refusal(self, command: wire.StartAttempt) -> str:
        if self.unavailable:
            return f"container executor unavailable at this site: {self.unavailable}"
        if not command.image:
            return "StartAttempt.image is empty: the container executor runs a named image"
        if not image_allowed(command.image, self.config.images):
            allowed = ", ".join(self.config.images) or "none"
            return f"image {command.image!r} is not allowed at this site (allowed: {allowed})"
        return ""

    def podman_base(self) -> list[str]:
        """``podman`` and its global options (storage dirs, extra args)."""
        out = [self.podman_path or self.config.podman]
        if self.config.root:
            out += ["--root", self.config.root]
        if self.config.runroot:
            out += ["--runroot", self.config.runroot]
        return out + list(self.config.podman_args)

    def podman_env(self) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")}
        if self.config.containers_conf:
            env["CONTAINERS_CONF"] = self.config.containers_conf
        for key in ("HOME", "XDG_RUNTIME_DIR", "TMPDIR"):
            if key in os.environ:
                env[key] = os.environ[key]
        return env

    def devices(self, accelerator: str, indices: list[int]) -> list[str]:
        dev = self.config.devices.get(accelerator)
        if dev is None:
            return []
        return [*(dev.per_card.format(index=i) for i in indices), *dev.shared]

    def run_argv(self, command: wire.StartAttempt, *, indices: list[int], progress: float) -> list[str]:
        """The ``podman run`` command line of one attempt (pure: nothing is started or created)."""
        cfg = self.config
        memory_mib = cfg.memory_mib_per_card * command.cards
        cpus = min(cfg.cpus_per_card * command.cards, float(os.cpu_count() or 1))
        env = attempt_env(command, cfg.checkpoint_mount, progress)
        env["CPN_CARDS"] = ",".join(str(i) for i in indices)
        out = [*self.podman_base(), "run", "--rm", "--name", self.container_name(command.job, command.attempt),
               "--pull", cfg.pull, "--network", "none", "--user", cfg.user, "--read-only",
               "--cap-drop", "all", "--security-opt", "no-new-privileges",
               "--memory", f"{memory_mib}m", "--memory-swap", f"{memory_mib}m", "--cpus", f"{cpus:g}",
               "--pids-limit", str(cfg.pids_limit),
               "--mount", f"type=bind,src={self.checkpoint_dir(command.job)},dst={cfg.checkpoint_mount}",
               "--label", f"cpn.site={self.site}", "--label", f"cpn.job={command.job}",
               "--label", f"cpn.attempt={command.attempt}"]
        for key, value in env.items():
            out += ["--env", f"{key}={value}"]
        for node in self.devices(command.accelerator, indices):
            out += ["--device", node]
        return [*out, command.image, *command.command]

    async def start(self, command: wire.StartAttempt, sink: EventSink,
                    on_exit: Callable[[RunningAttempt], None]) -> RunningAttempt:
        def release(handle: RunningAttempt) -> None:
            held = self.cards_in_use.get(command.job)
            if held is not None and handle is attempt:
                del self.cards_in_use[command.job]
            on_exit(handle)

        attempt = ContainerAttempt(command, sink, release, executor=self)
        why = self.refusal(command)
        if why:
            attempt.fail_to_start(why)
            return attempt
        used = {i for acc, held in self.cards_in_use.values() if acc == command.accelerator for i in held}
        indices = pick_cards(self.accelerators.get(command.accelerator, 0), used, command.cards)
        if indices is None:
            attempt.fail_to_start(f"no free {command.accelerator} card indices for {command.cards} cards")
            return attempt
        checkpoint_dir = self.checkpoint_dir(command.job)
        uid, _, gid = self.config.user.partition(":")
        try:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                os.chown(checkpoint_dir, int(uid), int(gid or uid))
            checkpoint_dir.chmod(0o700)
        except OSError as exc:
            attempt.fail_to_start(f"cannot prepare checkpoint dir: {exc.strerror or exc}")
            return attempt
        self.cards_in_use[command.job] = (command.accelerator, indices)
        await self.podman("rm", "--force", "--ignore", "--time", "0", attempt.name)  # left by an earlier agent
        try:
            shutil.rmtree(attempt.scratch, ignore_errors=True)
            attempt.scratch.mkdir(parents=True, mode=0o700)
        except OSError as exc:
            attempt.fail_to_start(f"cannot prepare {attempt.scratch}: {exc.strerror or exc}")
            return attempt
        await attempt.spawn(self.run_argv(command, indices=indices, progress=attempt.progress),
                            env=self.podman_env(), cwd=str(attempt.scratch))
        return attempt

    async def podman(self, *args: str) -> tuple[int, str]:
        """Run one podman command to completion: (exit code, stderr)."""
        proc = await asyncio.create_subprocess_exec(
            *self.podman_base(), *args, env=self.podman_env(),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            _, err = await proc.communicate()
        except asyncio.CancelledError:
            # Cancelled (the agent is stopping): end the client now and reap it in this loop, or it
            # outlives the loop and its pipe is closed at garbage collection, unowned.
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            raise
        finally:
            transport = getattr(proc, "_transport", None)
            if transport is not None and proc.returncode is not None:
                transport.close()
        code = proc.returncode if proc.returncode is not None else -1
        if code != 0:
            log(logging.WARNING, "podman_failed", site=self.site, args=" ".join(args[:2]), code=code,
                error=err.decode(errors="replace").strip()[-300:])
        return code, err.decode(errors="replace")


class ContainerAttempt(PipedAttempt):
    """One attempt as ``podman run`` (attached: the container's stdout and stderr are its pipes)."""

    def __init__(self, command: wire.StartAttempt, sink: EventSink, on_exit: Callable[[RunningAttempt], None],
                 *, executor: ContainerExecutor) -> None:
        cfg = executor.config
        super().__init__(command, sink, on_exit, grace_s=cfg.grace_s, stderr_lines=cfg.stderr_lines)
        self.executor = executor
        self.name = executor.container_name(command.job, command.attempt)
        self.memory_mib = cfg.memory_mib_per_card * command.cards
        self.scratch = executor.data_dir / "containers" / self.name
        """podman's working directory: conmon leaves a file ``oom`` here when the kernel's OOM
        killer ended the container."""

    def resolve(self, path: str) -> str:
        if path.startswith("/"):
            return path
        return f"{self.executor.config.checkpoint_mount.rstrip('/')}/{path}"

    def explain(self, code: int) -> str:
        if code == 137 and (self.scratch / "oom").exists():
            return f"killed: memory limit {self.memory_mib} MiB exceeded (out of memory, exit code 137)"
        if code == 137:
            return (f"killed by SIGKILL (exit code 137), not by the agent: most likely the memory limit "
                    f"of {self.memory_mib} MiB")
        if code == 125:
            return "podman could not run the container (exit code 125)"
        return super().explain(code)

    async def halt(self) -> None:
        await self.executor.podman("stop", "--time", str(int(self.grace_s + 0.999)), self.name)
        try:
            async with asyncio.timeout(5.0):
                await self._finished.wait()
        except TimeoutError:  # podman itself hung: take the container and its client down
            await self.cleanup()
            self.kill_group(signal.SIGKILL)

    async def cleanup(self) -> None:
        await self.executor.podman("rm", "--force", "--ignore", "--time", "0", self.name)

    async def _run(self) -> None:
        try:
            await super()._run()
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)
