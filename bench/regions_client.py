"""The tenant of ``cpn bench regions``, in a process of its own.

In the bench's own process the client shared one event loop with four hubs and the agents: an
answer written by a gateway waited behind whatever else that loop had queued (another hub's
commit, a heartbeat) before the client read it, a delay no tenant has. Here the client waits on
nothing but its own requests. Driven like :mod:`controlplane.tools.proxyhost`: one JSON line per
origin on stdin, one JSON line of samples on stdout; an empty line or EOF ends it. The same job
measures the bench's floor (:mod:`bench.regions_floor`), with its own legs.

- in: ``{"key": ..., "origin": ..., "legs": {"regional": url, "central": url}, "warmup": n,
  "requests": n, "body": {...}}``
- out: ``{"samples": [[mode, i, status, took_ms, service_ms, site, rtt_ms, overhead_ms, request_id, sent_s,
  received_s], ...]}`` (warm-up requests included, with their index: the parent leaves them out;
  ``sent_s``, ``received_s``: ``time.monotonic()`` when the request was sent and its answer read,
  a clock every process of the machine shares, so the parent can place the gateway's and the agent's
  own times between them)
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import aiohttp

from controlplane.runtime import end_child


async def _origin(session: aiohttp.ClientSession, job: dict[str, Any]) -> list[list[Any]]:
    out: list[list[Any]] = []
    headers = {"Authorization": f"Bearer {job['key']}"}
    modes = list(job["legs"])  # ("regional", "central"), or the floor's ("delayed", "undelayed")
    for i in range(int(job["warmup"]) + int(job["requests"])):
        for mode in (modes if i % 2 == 0 else modes[::-1]):
            started = time.monotonic()
            async with session.post(job["legs"][mode] + "/v1/infer", json=job["body"], headers=headers) as resp:
                data = await resp.json()
                received = time.monotonic()
            took_ms = (received - started) * 1000
            ok = resp.status == 200
            out.append([mode, i, resp.status, took_ms, float(data["service_ms"]) if ok else 0.0,
                        data["site"] if ok else "", float(data["rtt_ms"]) if ok else 0.0,
                        float(data.get("overhead_ms", 0.0)) if ok else 0.0, data.get("id", "") if ok else "",
                        started, received])
    return out


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with aiohttp.ClientSession() as session:
        while (line := await reader.readline()).strip():
            samples = await _origin(session, json.loads(line))
            sys.stdout.write(json.dumps({"samples": samples}) + "\n")
            sys.stdout.flush()


class Client:
    """The parent's handle on the client process."""

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.regions_client", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE)

    async def origin(self, job: dict[str, Any]) -> list[list[Any]]:
        """Run one origin's requests in the client process; its samples."""
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(job).encode() + b"\n")
        await proc.stdin.drain()
        line = await proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the bench's client exited (code {proc.returncode})")
        samples: list[list[Any]] = json.loads(line)["samples"]
        return samples

    async def close(self) -> None:
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        await end_child(proc)


class InlineClient:
    """The same client in the caller's own event loop (``cpn bench regions --client inline``: how the
    bench measured before, for comparison)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()

    async def origin(self, job: dict[str, Any]) -> list[list[Any]]:
        assert self._session is not None
        return await _origin(self._session, job)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


if __name__ == "__main__":
    asyncio.run(_serve())
