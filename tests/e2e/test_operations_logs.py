"""The log an operator reads: ``cpn hub`` and ``cpn agent`` as real subprocesses with ``--log-json``.

Every line of both is one JSON object with the same keys; an agent stopped with SIGTERM is an INFO
``site_left`` at the hub, not a WARNING ``site_lost``; with NATS gone the hub says so, and then
does not repeat the warning twice a second.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from pathlib import Path

from controlplane.nats.natsserver import NatsServer
from tests.support.waiting import until
from topology import loader

ROOT = Path(__file__).resolve().parents[2]


class Proc:
    """A cpn subprocess whose stderr lines are collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.stdout: list[str] = []
        self._tasks = [asyncio.create_task(self._read(proc.stderr, self.lines)),
                       asyncio.create_task(self._read(proc.stdout, self.stdout))]

    @staticmethod
    async def _read(stream: asyncio.StreamReader | None, into: list[str]) -> None:
        assert stream is not None
        async for raw in stream:
            into.append(raw.decode().rstrip("\n"))

    @classmethod
    async def start(cls, *args: str) -> Proc:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controlplane.cli", *args, cwd=ROOT, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        return cls(proc)

    def events(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.lines if line.startswith("{")]

    async def wait_for(self, pred, timeout_s: float, what: str) -> dict[str, object]:  # type: ignore[no-untyped-def]
        found: list[dict[str, object]] = []

        def logged() -> bool:
            found[:] = [e for e in self.events() if pred(e)][:1]
            assert found or self.proc.returncode is None, f"exited: {self.lines[-20:]}"
            return bool(found)

        await until(logged, timeout_s, what, interval_s=0.05, last=lambda: f"log tail: {self.lines[-15:]}")
        return found[0]

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.proc.wait(), 30)
        except asyncio.TimeoutError:
            self.proc.kill()
            code = await self.proc.wait()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        return code


async def test_one_json_log_a_graceful_stop_is_info_and_a_nats_outage_is_not_repeated(tmp_path: Path) -> None:
    nats = NatsServer(tmp_path / "js")
    await nats.start()
    hub = await Proc.start("hub", "--nats", nats.url, "--db", str(tmp_path / "hub.db"), "--listen", "127.0.0.1:0",
                           "--layout", str(loader.data_path("demo-3")), "--log-json", "--log-level", "INFO")
    agent = None
    try:
        await hub.wait_for(lambda e: e["event"] == "hub_started", 30, "hub started")
        agent = await Proc.start("agent", "--site", "sh-edge", "--nats", nats.url, "--cards", "H20=4", "--city", "shanghai",
                                 "--data-dir", str(tmp_path / "agent"), "--log-json")
        await hub.wait_for(lambda e: e["event"] == "site_registered" and e.get("site") == "sh-edge", 30, "registration")
        await agent.wait_for(lambda e: e["event"] == "registered", 10, "agent registered")

        assert await agent.stop() == 0
        left = await hub.wait_for(lambda e: e["event"] in ("site_left", "site_lost"), 10, "the hub noticing")
        assert left["event"] == "site_left" and left["level"] == "INFO" and left["site"] == "sh-edge", left

        await nats.stop()
        await hub.wait_for(lambda e: e["level"] == "WARNING" and "nats" in str(e["event"]), 10, "NATS loss logged")
        outage_started = len(hub.lines)
        await asyncio.sleep(6)  # the behaviour: an outage of many reconnect attempts (0.5 s apart), logged once
        during = [json.loads(line) for line in hub.lines[outage_started:]]
        warnings = [e for e in during if e["level"] in ("WARNING", "ERROR")]
        assert len(warnings) <= 2, warnings  # before: nats_error twice a second
    finally:
        code = await hub.stop()
        if agent is not None:
            await agent.stop()
        await nats.stop()
    assert code == 0, hub.lines[-10:]
    for proc in (hub, agent):
        assert proc is not None and proc.lines
        for line in proc.lines:
            obj = json.loads(line)  # every line, not only ours
            assert {"ts", "level", "logger", "event"} <= obj.keys() and re.match(r"\d{4}-\d\d-\d\dT.*Z$", obj["ts"]), obj
    assert not any(e["event"] == "site_lost" for e in hub.events())
