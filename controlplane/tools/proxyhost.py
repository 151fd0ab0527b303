"""Fault proxies in a child process of their own, so the delays they add are real.

A :class:`~controlplane.tools.faultproxy.FaultProxy` sharing an event loop with hubs and agents delays
its bytes by *at least* the asked delay: every stall of that loop (a hub's commit, forty agents'
heartbeats) is added on top, and the proxies' own timers stall the hubs in turn. :class:`ProxyHost`
runs the proxies in ``python -m controlplane.tools.proxyhost``, driven by one JSON line per command
on the child's stdin and one JSON answer per line on its stdout:

- ``{"op": "add", "upstream": "nats://host:port"}`` -> ``{"id": N, "port": P}``
- ``{"op": "mode", "ids": [N, ...], "mode": "pass"|"delay"|"blackhole"|"reset", "ms": 0.0}`` -> ``{}``
- ``{"op": "remove", "ids": [N, ...]}`` -> ``{}`` (those proxies closed, their ids not reused; their
  lateness still counted in ``stats``)
- ``{"op": "stats"}`` -> ``{"delayed": N, "late_ms_p50": x, "late_ms_p99": y, "late_ms_max": z}``: how
  late the delayed chunks of every proxy left, past their due time (the proxies' own error);
  ``{"op": "stats", "ids": [N, ...]}``: of those live proxies only
- ``{"op": "close"}`` -> ``{}`` (every proxy closed; the child exits)

The child's event loop waits with ``select``, not asyncio's default epoll: epoll's timeout is whole
milliseconds (rounded up), so on it a 0.25 ms delay became about a millisecond, on every hop;
``select`` takes microseconds. ``select`` watches descriptors below 1024 only: a few hundred proxies
open at once (remove those no longer used).

A bad command is answered ``{"error": "..."}`` and the child goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import selectors
import sys
from typing import Any

from controlplane.runtime import end_child
from controlplane.tools.faultproxy import FaultProxy

PY = sys.executable


class ProxyHostError(RuntimeError):
    """The child refused a command or went away."""


class ProxyHost:
    """The parent's handle on the child process holding the proxies."""

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            PY, "-m", "controlplane.tools.proxyhost", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE)

    async def _call(self, command: dict[str, Any]) -> dict[str, Any]:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            raise ProxyHostError("the proxy host is not running")
        async with self._lock:
            proc.stdin.write(json.dumps(command).encode() + b"\n")
            await proc.stdin.drain()
            line = await proc.stdout.readline()
        if not line:
            raise ProxyHostError(f"the proxy host exited (code {proc.returncode})")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise ProxyHostError(str(answer["error"]))
        return answer

    async def add(self, upstream_url: str) -> tuple[int, int]:
        """A new proxy in front of ``upstream_url``: its id and its port on 127.0.0.1."""
        answer = await self._call({"op": "add", "upstream": upstream_url})
        return int(answer["id"]), int(answer["port"])

    async def set_mode(self, ids: list[int], mode: str, ms: float = 0.0) -> None:
        """Switch the proxies ``ids`` to ``mode`` (``delay``: ``ms`` each way)."""
        await self._call({"op": "mode", "ids": ids, "mode": mode, "ms": ms})

    async def remove(self, ids: list[int]) -> None:
        """Close the proxies ``ids`` (a child on ``select`` holds at most ~1000 descriptors)."""
        await self._call({"op": "remove", "ids": ids})

    async def stats(self, ids: list[int] | None = None) -> dict[str, float]:
        """How late the proxies' delayed chunks left (``delayed`` chunks, ``late_ms_p50/p99/max``):
        of every proxy of the run, or of the live proxies ``ids`` only."""
        command: dict[str, Any] = {"op": "stats"} if ids is None else {"op": "stats", "ids": ids}
        return {k: float(v) for k, v in (await self._call(command)).items()}

    async def close(self) -> None:
        """Close every proxy and end the child (killed if it does not exit within 10 s)."""
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProxyHostError, OSError, ValueError, asyncio.TimeoutError):
            await asyncio.wait_for(self._call({"op": "close"}), 10)
        self._proc = None
        await end_child(proc)


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, round(q / 100 * (len(sorted_values) - 1)))]


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    proxies: list[FaultProxy | None] = []
    removed_lateness: list[float] = []

    def live(i: Any) -> FaultProxy:
        p = proxies[int(i)]
        if p is None:
            raise ValueError(f"proxy {i} was removed")
        return p

    def answer(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    try:
        while line := await reader.readline():
            try:
                cmd = json.loads(line)
                op = cmd.get("op")
                if op == "add":
                    proxy = FaultProxy(str(cmd["upstream"]))
                    await proxy.start()
                    proxies.append(proxy)
                    answer({"id": len(proxies) - 1, "port": proxy.port})
                elif op == "mode":
                    for i in cmd["ids"]:
                        p = live(i)
                        mode = cmd["mode"]
                        if mode == "pass":
                            p.set_pass()
                        elif mode == "delay":
                            p.set_delay(float(cmd.get("ms", 0.0)))
                        elif mode == "blackhole":
                            p.set_blackhole()
                        elif mode == "reset":
                            p.set_reset()
                        else:
                            raise ValueError(f"mode {mode!r}: want pass, delay, blackhole or reset")
                    answer({})
                elif op == "remove":
                    for i in cmd["ids"]:
                        p = live(i)
                        removed_lateness.extend(p.lateness_ms)
                        proxies[int(i)] = None
                        await p.close()
                    answer({})
                elif op == "stats" and "ids" in cmd:
                    late = sorted(x for i in cmd["ids"] for x in live(i).lateness_ms)
                    answer({"delayed": len(late), "late_ms_p50": _pct(late, 50), "late_ms_p99": _pct(late, 99),
                            "late_ms_max": late[-1] if late else 0.0})
                elif op == "stats":
                    late = sorted([x for p in proxies if p is not None for x in p.lateness_ms] + removed_lateness)
                    answer({"delayed": len(late), "late_ms_p50": _pct(late, 50), "late_ms_p99": _pct(late, 99),
                            "late_ms_max": late[-1] if late else 0.0})
                elif op == "close":
                    break
                else:
                    raise ValueError(f"op {op!r}: want add, mode, remove, stats or close")
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                answer({"error": str(exc)})
    finally:
        for left in proxies:
            if left is not None:
                await left.close()
        answer({})


def main() -> None:
    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(selectors.SelectSelector())) as runner:
        runner.run(_serve())


if __name__ == "__main__":
    main()
