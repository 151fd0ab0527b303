"""``wrk`` as the gateway benchmarks' load generator: the Lua script, running it, reading its answer.

wrk (C, epoll, keep-alive) is the generator because a Python one caps the figure it measures: the
former ``bench/loadgen.py`` (an aiohttp client, removed) topped out near 5.4 k req/s against one
mock replica that wrk drove at 29-38 k in the same minute, so a floor that could do more looked
slower than it was and anything behind it looked close to it. On this machine wrk drives
the mock backend (bench/mockopenai.py) at ~45-55 k req/s on 2 cores, several times what any
router in the peers table reaches, and the bench records wrk's own CPU per cell to show it.

The script makes every request a POST with the same body and headers; its ``done()`` prints one
``WRK_JSON {...}`` line (requests, duration, error counts, latency percentiles in µs), which
:func:`parse` reads. Pure parts (:func:`lua_script`, :func:`parse`, :func:`summarise`) have unit
tests; :func:`run` is the subprocess.
"""

from __future__ import annotations

import asyncio
import json
import resource
import shutil
from typing import Any

PACKAGE = "wrk"  # the Debian/Ubuntu package that provides the binary

_DONE = r"""
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""


class WrkMissing(RuntimeError):
    """wrk is not on PATH; the message names the package to install."""


def binary() -> str:
    """Path of ``wrk``; raises :class:`WrkMissing` with the package name when it is not installed."""
    path = shutil.which("wrk")
    if path is None:
        raise WrkMissing(f"wrk not found on PATH: install the '{PACKAGE}' package (apt-get install -y {PACKAGE})")
    return path


def _lua_string(s: str) -> str:
    """A Lua long-bracket literal that cannot be closed by ``s`` itself."""
    level = 0
    while f"]{'=' * level}]" in s:
        level += 1
    eq = "=" * level
    return f"[{eq}[{s}]{eq}]"


def lua_script(body: str, headers: dict[str, str]) -> str:
    """The wrk script: POST ``body`` with ``headers`` and print a ``WRK_JSON`` line when done."""
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_string(body)}"]
    lines += [f"wrk.headers[ {_lua_string(k)} ] = {_lua_string(v)}" for k, v in headers.items()]  # "[ [[" not "[[["
    return "\n".join(lines) + "\n" + _DONE


def parse(stdout: str) -> dict[str, Any]:
    """The ``WRK_JSON`` line of wrk's output as a dict; raises ``ValueError`` naming what wrk printed
    when the line is missing (wrk could not connect at all, or the script failed)."""
    for line in stdout.splitlines():
        if line.startswith("WRK_JSON "):
            return json.loads(line[len("WRK_JSON "):])  # type: ignore[no-any-return]
    tail = " | ".join(stdout.strip().splitlines()[-3:])
    raise ValueError(f"no WRK_JSON line in wrk's output: {tail or '(empty)'}")


def summarise(raw: dict[str, Any]) -> dict[str, float]:
    """Requests/s of good answers, errors, and latency in ms from a parsed ``WRK_JSON`` line.

    wrk counts non-2xx answers in ``requests`` and again in ``status``; they are errors here, not
    throughput."""
    seconds = raw["duration_us"] / 1e6
    errors = raw["connect"] + raw["read"] + raw["write"] + raw["status"] + raw["timeout"]
    good = raw["requests"] - raw["status"]
    return {
        "requests": good, "errors": errors, "rps": good / seconds if seconds > 0 else 0.0,
        "p50_ms": raw["p50_us"] / 1000, "p90_ms": raw["p90_us"] / 1000, "p99_ms": raw["p99_us"] / 1000,
        "mean_ms": raw["mean_us"] / 1000, "max_ms": raw["max_us"] / 1000, "seconds": seconds,
    }


def threads_for(conns: int) -> int:
    """wrk threads: two (this is a 2-core machine and a second thread lifts wrk's own ceiling from
    ~45 k to ~55 k req/s against the mock) unless there is only one connection."""
    return max(1, min(2, conns))


async def run(url: str, *, conns: int, seconds: float, script_path: str, timeout_s: float = 10.0) -> dict[str, float]:
    """Run wrk once and return :func:`summarise` plus ``generator_cpu_s`` (wrk's own user+system CPU)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = await asyncio.create_subprocess_exec(
        binary(), f"-t{threads_for(conns)}", f"-c{conns}", f"-d{max(1, round(seconds))}s",
        f"--timeout={max(1, round(timeout_s))}s", "-s", script_path, url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = summarise(parse(out.decode(errors="replace")))
    res["generator_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return res
