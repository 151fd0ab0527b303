"""``cpn up`` as a user runs it: a real subprocess, its printed banner and credentials file, SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.support.waiting import until_blocking
from topology import loader

CPN = [sys.executable, "-m", "controlplane.cli"]


def children_of(pid: int) -> set[int]:
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                out.add(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def http(method: str, url: str, key: str | None = None, body: dict | None = None) -> tuple[int, dict, dict]:  # type: ignore[type-arg]
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, json.loads(resp.read()), dict(resp.headers)


def test_cpn_up_serves_the_printed_curl_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "cpn"
    layout = loader.default_path()
    proc = subprocess.Popen(
        [*CPN, "up", "--data-dir", str(data), "--port", "0", "--nats-port", "0", "--layout", str(layout)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "CPN_LOG": "WARNING"},
    )
    try:
        started = time.monotonic()
        url = None
        assert proc.stdout is not None
        for line in proc.stdout:
            m = re.search(r"hub gateway at (http://127\.0\.0\.1:\d+)", line)
            if m:
                url = m.group(1)
            if "Ctrl-C" in line:
                break
            assert time.monotonic() - started < 60, "no banner"
        assert url, f"banner not printed; stderr: {proc.stderr.read() if proc.poll() is not None else ''}"
        ready_s = time.monotonic() - started
        creds = json.loads((data / "demo-credentials.json").read_text())
        assert set(creds) == {"admin_key", "tenant_key"}
        assert (data / "demo-credentials.json").stat().st_mode & 0o077 == 0

        status, health, _ = http("GET", url + "/healthz")
        assert status == 200 and health["sites"]["up"] >= 40
        answer: list[object] = []

        def answered() -> bool:  # the demo model loads on the edge pools (sim load time 1 s)
            try:
                answer[:] = http("POST", url + "/v1/chat/completions", creds["tenant_key"],
                                 {"model": "demo-chat", "messages": [{"role": "user", "content": "hello"}]})
                return True
            except urllib.error.HTTPError as exc:
                answer[:] = [exc.code, exc.read()]
                return False

        until_blocking(answered, 15, "an answer", interval_s=0.2, last=lambda: answer)
        status, body, headers = answer  # type: ignore[misc]
        assert status == 200 and body["choices"][0]["message"]["content"]
        assert headers["X-CPN-Site"] and float(headers["X-CPN-RTT-Ms"]) <= 10
        print(f"cpn up ready in {ready_s:.1f} s")

        kids = children_of(proc.pid)
        assert kids, "the embedded nats-server should be a child"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        for pid in kids:
            until_blocking(lambda: not alive(pid), 5, f"child {pid} to end", interval_s=0.05)  # noqa: B023
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()
