"""The systems the peers benchmark puts in front of one mock backend, each started as real processes.

- ``mock``: bench/mockopenai.py, two replica processes; each has its own port (given to the
  routers as two workers) and both share one ``SO_REUSEPORT`` port (the direct path and cpn's
  agent use that one URL; the kernel spreads connections between the replicas).
- ``direct``: no router, the load goes to the shared port: the ceiling for everything else.
- ``vllm-router`` (PyPI ``vllm-router``, Rust): ``vllm-router --worker-urls R1 R2``.
- ``sglang-router`` (PyPI ``sglang-router``, Rust): ``python -m sglang_router.launch_router --worker-urls R1 R2``.
- ``cpn``: nats-server + ``cpn hub`` + one ``cpn agent`` whose ``openai-http`` backend points at
  the shared port (one agent, as in issue #18's run; the two replicas are behind it).

Both routers get the same policy (``round_robin`` by default: the cheapest one each offers, so the
peers are at their fastest; their own default, cache-aware, was 3-4x slower here). Each starter
is an async context manager yielding a :class:`System` (base URL, headers, the pids whose CPU is
counted) or raising :class:`Unavailable` with a one-line reason, which the bench prints and skips.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

PY = sys.executable
CHAT = "/v1/chat/completions"


class Unavailable(RuntimeError):
    """A system cannot run here (not installed, failed to start); the message is one line."""


@dataclass
class System:
    name: str
    base_url: str
    pids: dict[str, int]
    """Process name -> pid; CPU of each and of its descendants is counted."""
    headers: dict[str, str] = field(default_factory=dict)
    model: str = "mock"

    @property
    def url(self) -> str:
        return self.base_url + CHAT


@dataclass
class Mock:
    replica_urls: list[str]
    shared_url: str
    pids: list[int]


def _free_port() -> int:
    """A port free right now, for a server that refuses port 0 (vllm-router and sglang-router both
    answer "Port must be > 0"). Another process may take it before the server binds it: the server
    then exits with "Address already in use" and is started again on new ports (:func:`router`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


ROUTER_ATTEMPTS = 3
"""Starts of a router on freshly picked ports before giving up."""


async def _spawn(*args: str, env: dict[str, str] | None = None, log: Path | None = None,
                 cwd: Path | None = None) -> asyncio.subprocess.Process:
    out = open(log, "ab") if log else None  # noqa: SIM115 - the child keeps its own copy of the fd
    try:
        return await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=out or asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd,
        )
    finally:
        if out is not None:
            out.close()


async def stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 10 s."""
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


async def _first_line(proc: asyncio.subprocess.Process, marker: str, timeout_s: float = 30) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), max(0.1, deadline - time.monotonic()))).decode()
        if not line:
            raise Unavailable(f"exited before printing '{marker}'")
        if marker in line:
            return line.strip()


async def _drain(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdout is not None
    while await proc.stdout.read(65536):
        pass


async def wait_ready(url: str, body: bytes, headers: dict[str, str], proc: asyncio.subprocess.Process | None,
                     timeout_s: float = 60, what: str = "") -> None:
    """Poll ``url`` with one POST until it answers 200 (the system routes to the mock)."""
    import aiohttp

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc is not None and proc.returncode is not None:
                raise Unavailable(f"{what or url} exited with {proc.returncode} while starting")
            try:
                async with s.post(url, data=body, headers={"Content-Type": "application/json", **headers},
                                  timeout=aiohttp.ClientTimeout(total=2)) as r:
                    await r.read()
                    if r.status == 200:
                        return
                    last = f"HTTP {r.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                last = type(exc).__name__
            await asyncio.sleep(0.2)
    raise Unavailable(f"{what or url} not ready within {timeout_s:g} s ({last})")


READY_BODY = b'{"model":"mock","messages":[{"role":"user","content":"hi"}],"max_tokens":4}'


@asynccontextmanager
async def mock(chunks: int = 4) -> AsyncIterator[Mock]:
    """Two mock replicas sharing one ``SO_REUSEPORT`` port."""
    procs: list[asyncio.subprocess.Process] = []
    try:
        shared = 0
        urls = []
        for _ in range(2):
            p = await asyncio.create_subprocess_exec(
                PY, "-m", "bench.mockopenai", "--shared-port", str(shared), "--chunks", str(chunks),
                stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
            procs.append(p)
            line = await _first_line(p, "port=", 15)
            fields = dict(kv.split("=") for kv in line.split())
            shared = int(fields["shared"])
            urls.append(f"http://127.0.0.1:{fields['port']}")
        m = Mock(replica_urls=urls, shared_url=f"http://127.0.0.1:{shared}", pids=[p.pid for p in procs])
        await wait_ready(m.shared_url + CHAT, READY_BODY, {}, None, 10, "mock")
        yield m
    finally:
        for p in procs:
            await stop(p)


@asynccontextmanager
async def direct(m: Mock) -> AsyncIterator[System]:
    yield System("direct", m.shared_url, pids={})


def _router_command(name: str) -> list[str]:
    if name == "vllm-router":
        exe = shutil.which("vllm-router") or str(Path(PY).parent / "vllm-router")
        if importlib.util.find_spec("vllm_router") is None or not Path(exe).exists():
            raise Unavailable("vllm-router not installed (pip install 'cpn[bench]' or pip install vllm-router)")
        return [exe]
    if importlib.util.find_spec("sglang_router") is None:
        raise Unavailable("sglang-router not installed (pip install 'cpn[bench]' or pip install sglang-router)")
    return [PY, "-m", "sglang_router.launch_router"]


@asynccontextmanager
async def router(name: str, m: Mock, tmp: Path, policy: str = "round_robin") -> AsyncIterator[System]:
    """``vllm-router`` or ``sglang-router`` in front of the two replicas (started again on new ports
    when a port picked free was taken before it bound it: it refuses port 0)."""
    log = tmp / f"{name}.log"
    for attempt in range(ROUTER_ATTEMPTS):
        port = _free_port()
        args = [*_router_command(name), "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
                "--prometheus-port", str(_free_port()), "--worker-urls", *m.replica_urls,
                "--log-level", "warning" if name == "vllm-router" else "warn"]
        start = log.stat().st_size if log.exists() else 0  # the log is appended to, one start after another
        proc = await _spawn(*args, log=log, env={"RUST_LOG": "warn", "HF_HUB_OFFLINE": "1"})
        try:
            await wait_ready(f"http://127.0.0.1:{port}{CHAT}", READY_BODY, {}, proc, 60, name)
            break
        except BaseException as exc:
            await stop(proc)
            if not isinstance(exc, Unavailable):
                raise
            with open(log, "rb") as f:
                f.seek(start)
                text = f.read().decode(errors="replace")
            if "Address already in use" in text and attempt < ROUTER_ATTEMPTS - 1:
                continue
            tail = text.strip().splitlines()[-1:]
            raise Unavailable(f"{exc}{': ' + tail[0][:200] if tail else ''}") from None
    try:
        yield System(name, f"http://127.0.0.1:{port}", pids={name: proc.pid})
    finally:
        await stop(proc)


@asynccontextmanager
async def cpn(m: Mock, tmp: Path, *, name: str = "cpn", hub_extra: str = "", src: Path | None = None) -> AsyncIterator[System]:
    """nats-server, ``cpn hub`` and one ``cpn agent`` (openai-http -> the mock's shared port);
    ``hub_extra``: more of the hub's config (a same-run comparison of two settings, ``name`` apart);
    ``src``: run the hub and the agent from the cpn source in that directory (another checkout, for
    a same-run before/after) instead of this one."""
    from controlplane.nats.natsserver import NatsServer, default_gomaxprocs
    from topology import loader

    env = {"CPN_LOG": "WARNING"}
    if src is not None:  # ``python -m`` puts the working directory first on the path: both point at src
        env["PYTHONPATH"] = str(src)
    async with NatsServer(tmp / "js", gomaxprocs=default_gomaxprocs()) as nats:  # as ``cpn up`` starts it
        procs: list[asyncio.subprocess.Process] = []
        try:
            db = tmp / "hub.db"
            layout = Path(loader.default_path()).parent / "demo-3.toml"
            tenant = await asyncio.create_subprocess_exec(
                PY, "-m", "controlplane.cli", "tenant", "create", "bench", "--default-origin", "shanghai",
                "--rate", "100000000", "--db", str(db), stdout=asyncio.subprocess.PIPE,
                env={**os.environ, **env}, cwd=src)
            key = (await tenant.communicate())[0].decode().strip()
            agent_toml = tmp / "agent.toml"
            agent_toml.write_text(
                f'site = "sh-edge"\nnats = "{nats.url}"\ncity = "shanghai"\naccelerators = {{ H20 = 4 }}\n'
                '[[models]]\nname = "mock"\ncards = 1.0\nslots = 1024\n'
                f'[backend]\nkind = "openai-http"\n[backend.openai-http]\nurl = "{m.shared_url}"\nslots = 1024\n'
            )
            agent = await _spawn(PY, "-m", "controlplane.cli", "agent", "--config", str(agent_toml),
                                 env=env, log=tmp / "agent.log", cwd=src)
            procs.append(agent)
            hub_toml = tmp / "hub.toml"  # the site's own model ("mock") serves the bench tenant
            hub_toml.write_text('local_model_tenants = ["bench"]\n' + hub_extra)
            hub = await asyncio.create_subprocess_exec(
                PY, "-m", "controlplane.cli", "hub", "--config", str(hub_toml), "--nats", nats.url, "--db", str(db),
                "--listen", "127.0.0.1:0", "--layout", str(layout), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
                stdin=asyncio.subprocess.DEVNULL, env={**os.environ, **env}, cwd=src)
            procs.append(hub)
            base = (await _first_line(hub, "listening on", 30)).rsplit(" ", 1)[1]
            drain = asyncio.create_task(_drain(hub))  # a full stdout pipe would stall the hub mid-run
            headers = {"Authorization": f"Bearer {key}"}
            await wait_ready(base + CHAT, READY_BODY, headers, hub, 60, "cpn")
            assert nats.proc is not None
            yield System(name, base, pids={"hub": hub.pid, "agent": agent.pid, "nats-server": nats.proc.pid},
                         headers=headers)
        finally:
            for p in reversed(procs):
                await stop(p)
            if "drain" in locals():
                await drain
