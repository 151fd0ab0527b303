"""Readiness as a script sees it: ``cpn up`` as a real subprocess, polled from outside.

``/readyz`` is 503 (naming what is missing) until the demo model is served; the credentials file
appears only then, and on a restart it disappears first and comes back only when ready again. The
moment it appears, a chat request with its tenant key is answered: no 404 or 503 first.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests.support.cpnup import call
from tests.support.waiting import until_blocking
from topology import loader

CPN = [sys.executable, "-m", "controlplane.cli"]
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hello"}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(data: Path, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CPN, "up", "--data-dir", str(data), "--port", str(port), "--nats-port", "0", "--layout", str(loader.default_path())],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "CPN_LOG": "WARNING"},
    )


def wait_for_credentials(proc: subprocess.Popen[str], creds: Path, url: str) -> list[int]:
    """Poll /readyz until the credentials file appears; returns the /readyz statuses seen before."""
    seen: list[int] = []

    def appeared() -> bool:
        if creds.exists():
            return True
        assert proc.poll() is None, f"cpn up exited: {proc.stderr.read() if proc.stderr else ''}"
        try:
            status, body, _ = call("GET", url + "/readyz")
        except OSError:  # gateway not listening yet
            return False
        seen.append(status)
        if status == 503:
            assert body["ready"] is False and any(v != "ok" for v in body["checks"].values()), body
        else:  # ready is said only once the file is there (the check above and this request may straddle it)
            assert status == 200 and creds.exists(), (status, body)
        return False

    until_blocking(appeared, 90, "the credentials file")
    return seen


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr:
        proc.stderr.close()


def test_credentials_appear_only_when_a_chat_request_is_served_also_after_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "cpn"
    creds_path = data / "demo-credentials.json"
    for round_ in ("first start", "restart"):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start(data, port)
        try:
            if round_ == "restart":
                # The old file goes before the gateway answers anything, so nobody reads it too early.
                until_blocking(lambda: not creds_path.exists(), 30, "the previous run's credentials file to go",
                               interval_s=0.01)
            seen = wait_for_credentials(proc, creds_path, url)
            creds = json.loads(creds_path.read_text())
            status, body, _ = call("POST", url + "/v1/chat/completions", creds["tenant_key"], CHAT)
            assert status == 200, (round_, status, body)
            assert body["choices"][0]["message"]["content"]
            assert 503 in seen, (round_, seen)  # not ready was visible (and never a 200 without the file, above)
            status, body, _ = call("GET", url + "/readyz")
            assert status == 200 and body == {"ready": True, "checks": {
                "store": "ok", "nats": "ok", "layout": "ok"}}, body
            assert call("GET", url + "/healthz")[0] == 200
        finally:
            stop(proc)
        assert proc.returncode == 0, round_
