"""Hub processes of their own (``bench.submissions.HubProc``, ``cpn hub`` subprocesses) on one
replicated record, for the end-to-end tests of leadership under faults: the arguments each is
started with, the directory their logs go to, and what the tests read of them over HTTP.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.hubrig import DEMO3, Client


class HubArgs:
    """The command-line arguments of hub processes ``name`` on the record at ``urls``, each with
    its own directory under ``tmp`` and logs in ``tmp/logs`` (``CPN_BENCH_LOGS``, set for the test);
    ``CPN_TEST_HUB_LOG`` sets their log level (WARNING)."""

    def __init__(self, tmp: Path, urls: str, monkeypatch: pytest.MonkeyPatch, *, layout: Path = DEMO3) -> None:
        self.tmp = tmp
        self.urls = urls
        self.layout = layout
        self.logs = tmp / "logs"
        self.logs.mkdir()
        monkeypatch.setenv("CPN_BENCH_LOGS", str(self.logs))

    def __call__(self, name: str, *extra: str) -> list[str]:
        (self.tmp / name).mkdir(exist_ok=True)
        return ["--listen", "127.0.0.1:0", "--record", "nats", "--nats", self.urls,
                "--db", str(self.tmp / name / "hub.db"), "--hub-id", name, "--layout", str(self.layout),
                "--log-level", os.environ.get("CPN_TEST_HUB_LOG", "WARNING"), *extra]


async def cluster_view(session: aiohttp.ClientSession, port: int, admin: str) -> dict[str, Any] | None:
    """``GET /v1/cluster`` of the process at ``port``; None while it does not answer 200."""
    try:
        status, body, _ = await Client(session, f"http://127.0.0.1:{port}", admin).call("GET", "/v1/cluster")
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None
    return body if status == 200 else None


async def scrape(session: aiohttp.ClientSession, port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a process's /metrics, by (name, sorted labels)."""
    async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}
