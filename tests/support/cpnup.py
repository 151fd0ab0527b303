"""``cpn up`` run as a user runs it: a real subprocess, its banner read line by line, its gateway called
as a script would, and a clean stop checked (exit 0, no child process left running). Shared by the
``cpn up`` tests (plain, ``--ha``, ``--regions``, readiness)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


def environ_of(pid: int) -> dict[str, str]:
    """A running process's environment, as it was started."""
    pairs = [kv.split(b"=", 1) for kv in (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0") if b"=" in kv]
    return {k.decode(): v.decode() for k, v in pairs}


def command_of(pid: int) -> str:
    """A process's command name (``/proc/PID/comm``); "" once it has gone."""
    try:
        return (Path("/proc") / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@contextmanager
def cpn_up(*args: str) -> Iterator[subprocess.Popen[str]]:
    """``cpn up ARGS`` (warnings only on its log); killed and its pipes closed however the test ends."""
    proc = subprocess.Popen([*CPN, "up", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "CPN_LOG": "WARNING"})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def banner(proc: subprocess.Popen[str], timeout_s: float) -> list[str]:
    """The banner's lines, up to and including the one that says how to stop (``Ctrl-C``)."""
    started = time.monotonic()
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "Ctrl-C" in line:
            return lines
        assert time.monotonic() - started < timeout_s, f"no banner in {timeout_s} s: {''.join(lines)}"
    stderr = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
    raise AssertionError(f"cpn up ended before its banner: {''.join(lines)}; stderr: {stderr}")


def stops_cleanly(proc: subprocess.Popen[str], kids: set[int], sig: int = signal.SIGTERM,
                  timeout_s: float = 60) -> None:
    """``sig`` ends ``cpn up`` with exit 0 and none of ``kids`` (its children, listed while it ran) is left."""
    proc.send_signal(sig)
    assert proc.wait(timeout=timeout_s) == 0
    for pid in kids:
        deadline = time.monotonic() + 5
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid), f"child {pid} left running"


def call(method: str, url: str, key: str | None = None, body: object = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
    """One JSON request to a gateway: (status, body decoded, headers), a 4xx or 5xx answer included
    (its body decoded when it is JSON, else the bytes). A gateway not listening raises ``OSError``."""
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw), dict(exc.headers)
        except ValueError:
            return exc.code, raw, dict(exc.headers)
