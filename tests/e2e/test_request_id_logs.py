"""The request id on every log line a request causes, read from a real ``cpn hub --log-json``.

The lines checked are written by the training service (``job_submitted``, ``job_cancelled``),
which knows nothing of HTTP and does not name the request: the gateway binds the id to the
request's context and the log handler adds it to each line.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import aiohttp

from controlplane.nats.natsserver import NatsServer
from tests.e2e.test_operations_logs import ROOT, Proc
from topology import loader

JOB = {"name": "j", "cards": 4, "accelerators": ["910B"], "est_hours": 1.0}


async def test_every_line_of_a_request_carries_its_request_id(tmp_path: Path) -> None:
    db = tmp_path / "hub.db"
    key = subprocess.run(
        [sys.executable, "-m", "controlplane.cli", "tenant", "create", "acme", "--db", str(db)],
        cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    nats = NatsServer(tmp_path / "js")
    await nats.start()
    hub = await Proc.start("hub", "--nats", nats.url, "--db", str(db), "--listen", "127.0.0.1:0",
                           "--layout", str(loader.data_path("demo-3")), "--log-json", "--log-level", "INFO")
    try:
        await hub.wait_for(lambda e: e["event"] == "hub_started", 30, "hub started")
        for _ in range(200):
            if any("listening on" in line for line in hub.stdout):
                break
            await asyncio.sleep(0.05)
        (banner,) = [line for line in hub.stdout if "listening on" in line]
        port = re.search(r":(\d+)$", banner).group(1)  # type: ignore[union-attr]
        base = f"http://127.0.0.1:{port}"
        auth = {"Authorization": f"Bearer {key}"}
        async with aiohttp.ClientSession() as session:
            # Without an X-Request-Id of its own, the client is answered with the hub's id.
            async with session.post(f"{base}/v1/jobs", json=JOB, headers=auth) as resp:
                assert resp.status == 201, await resp.text()
                job_id = (await resp.json())["id"]
                rid = resp.headers["X-Request-Id"]
            submitted = await hub.wait_for(lambda e: e["event"] == "job_submitted" and e.get("job") == job_id, 10,
                                           "job_submitted logged")
            assert submitted["request_id"] == rid and "client_request_id" not in submitted, submitted
            # With its own id, the client's id is logged beside the hub's.
            async with session.delete(f"{base}/v1/jobs/{job_id}",
                                      headers={**auth, "X-Request-Id": "trace-42"}) as resp:
                assert resp.status == 200 and resp.headers["X-Request-Id"] == "trace-42"
            cancelled = await hub.wait_for(lambda e: e["event"] == "job_cancelled" and e.get("job") == job_id, 10,
                                           "job_cancelled logged")
            assert cancelled["client_request_id"] == "trace-42", cancelled
            assert cancelled["request_id"] not in ("", rid, "trace-42"), cancelled
        # Lines written outside any request (start-up, the scheduler's ticks) carry none.
        lines = [json.loads(line) for line in hub.lines if line.startswith("{")]
        assert not [e for e in lines if e["event"] == "hub_started" and "request_id" in e]
        with_ids = [e for e in lines if "request_id" in e]
        assert {e["event"] for e in with_ids} <= {"job_submitted", "job_cancelled", "http"}, with_ids
    finally:
        code = await hub.stop()
        await nats.stop()
    assert code == 0, hub.lines[-10:]
