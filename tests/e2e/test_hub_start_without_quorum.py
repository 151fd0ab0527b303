"""A hub process started while its record has no quorum waits for it instead of exiting.

Real parts: a 3-node nats-server cluster on loopback and ``cpn hub --record nats`` subprocesses. The
record is made by a first process, which then stops; two of the three NATS nodes are killed and the
process is started again (a restart during a NATS fault, as ``cpn chaos --ha`` does). Before, it
exited once the record's write deadline passed (``record_unavailable``: 2 s here) and the chaos run
failed with it. Now it says once a second that it is waiting (a clear log line naming the reason),
does not listen, and once a node returns (quorum: 2 of 3) it starts, listens and is ready.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support.hubrig import DEMO3
from tests.support.natscluster import NatsCluster
from tests.support.waiting import until

LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")


async def _start(tmp_path: Path, urls: str, log: Path) -> asyncio.subprocess.Process:
    config = tmp_path / "hub.toml"
    config.write_text("record_write_deadline_s = 2.0\n")
    with log.open("ab") as err:  # the child holds its own copy
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controlplane.cli", "hub", "--config", str(config), "--listen", "127.0.0.1:0",
            "--record", "nats", "--nats", urls, "--db", str(tmp_path / "hub.db"), "--hub-id", "p1",
            "--layout", str(DEMO3), "--log-level", "INFO",
            stdout=asyncio.subprocess.PIPE, stderr=err, env={**os.environ})


async def _port(proc: asyncio.subprocess.Process, timeout_s: float) -> int:
    assert proc.stdout is not None
    async with asyncio.timeout(timeout_s):
        while True:
            line = (await proc.stdout.readline()).decode()
            if not line:
                raise AssertionError(f"the hub exited with {await proc.wait()}")
            if m := LISTENING.search(line):
                return int(m.group(1))


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(20):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


@pytest.mark.serial
@pytest.mark.timeout(150)
async def test_a_hub_started_without_quorum_waits_and_is_ready_once_quorum_returns(tmp_path: Path) -> None:
    log = tmp_path / "hub.log"
    async with NatsCluster(tmp_path / "nats") as cluster:
        urls = ",".join(cluster.urls)
        first = await _start(tmp_path, urls, log)
        try:
            await _port(first, 60)  # the record exists now
        finally:
            await _stop(first)
        await cluster.kill("n2")
        await cluster.kill("n3")

        proc = await _start(tmp_path, urls, log)
        listening = asyncio.ensure_future(_port(proc, 120))
        try:
            # Past the write deadline (2 s) it says it waits for the record, and it is still there,
            # waiting, not listening: through its second try too.
            def waiting() -> list[str]:
                return [line for line in log.read_text().splitlines() if "event=hub_waiting" in line]

            await until(lambda: len(waiting()) >= 2, 60, "the hub's second wait for the record",
                        last=lambda: log.read_text()[-3000:])
            assert "record" in waiting()[0], waiting()
            assert proc.returncode is None, log.read_text()[-3000:]
            assert not listening.done(), log.read_text()[-3000:]

            restarted = time.monotonic()
            await cluster.restart("n2")
            port = await listening
            ready_s = time.monotonic() - restarted
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    body = await resp.json()
                    assert resp.status == 200, body
            print(f"ready {ready_s:.1f} s after quorum returned")
        finally:
            await _stop(proc)
            listening.cancel()
            await asyncio.gather(listening, return_exceptions=True)
