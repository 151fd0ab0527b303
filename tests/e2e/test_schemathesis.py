"""Schemathesis against /openapi.json: generated requests for every operation, bounded in count.

Checks: no 5xx (``not_a_server_error``) and every response matches the documented schema
(``response_schema_conformance``). The hub runs in this process with one agent serving a model.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

import pytest

from controlplane.nats.natsserver import NatsServer
from edge_agent.agent import Agent
from tests.e2e.test_foundation import agent_config
from tests.support.waiting import until
from tests.support.hubrig import hub_config, running_hub

SCHEMATHESIS = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")


@pytest.mark.timeout(600)  # schemathesis is CPU-bound: minutes on a loaded machine
@pytest.mark.skipif(SCHEMATHESIS is None, reason="schemathesis is a test extra: pip install -e '.[test]'")
async def test_generated_requests_cause_no_5xx_and_match_the_schema(tmp_path: Path, nats_server: NatsServer) -> None:
    async with running_hub(hub_config(tmp_path, nats_server.url)) as hub:
        key = hub.create_tenant("fuzz", default_origin="shanghai", rate_per_s=10_000, burst=10_000)
        agent = Agent(agent_config("sh-edge", nats_server.url, tmp_path))
        await agent.start()
        try:
            await until(lambda: "m" in hub.known_models(), 10, "agent ready")
            base = f"http://127.0.0.1:{hub.http_port}"
            proc = await asyncio.create_subprocess_exec(
                str(SCHEMATHESIS), "run", f"{base}/openapi.json", "--url", base,
                "--checks", "not_a_server_error,response_schema_conformance",
                "--max-examples", "8", "--seed", "1", "--workers", "1", "--request-timeout", "10",
                "--phases", "examples,coverage,fuzzing",
                "-H", f"Authorization: Bearer {key}",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, "SCHEMATHESIS_HOOKS": "", "NO_COLOR": "1"}, cwd=tmp_path,
            )
            out, _ = await asyncio.wait_for(proc.communicate(), 540)
            text = out.decode(errors="replace")
            assert proc.returncode == 0, text[-6000:]
            assert "operations" in text.lower() or "passed" in text.lower(), text[-2000:]
            print(text[-1500:])
        finally:
            await agent.stop()
