"""Benchmark: durable job submissions (``POST /v1/jobs``, 201 only once the job is durable) per second
and their latency, a single hub on SQLite vs hubs on the replicated record, in the same run.

- ``sqlite``: one ``cpn hub`` process, ``--record sqlite`` (WAL, ``synchronous=FULL``);
- ``nats``: ``--hubs`` ``cpn hub`` processes, ``--record nats``, on a 3-node loopback nats-server
  cluster (R3, ``sync_interval: always``); the clients spread their submissions over every hub.

Both runs: the same ``--jobs`` submissions from ``--concurrency`` HTTP clients in this process,
after a warm-up; every answer must be a 201. Prints and writes ``bench/results/submissions.json``
(targets, issue #13: the replicated figure >= 0.25x the SQLite one, its p99 <= 50 ms on loopback).

Run: ``cpn bench submissions [--jobs N] [--concurrency C] [--hubs H]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench import common

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # `cpn bench` runs from the installed script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.natscluster import NatsCluster  # noqa: E402  (the test cluster: 3 nodes, sync_interval always)

JOB = {"name": "bench", "cards": 1, "accelerators": ["A800", "910B"], "est_hours": 1.0, "checkpoint_cost_s": 60}
LISTENING = re.compile(r"listening on https?://([^:\s]+):(\d+)")


class HubProc:
    """One ``cpn hub`` subprocess; its port and (first hub only) its admin key read from stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.port = 0
        self.admin_key = ""

    @classmethod
    async def start(cls, args: list[str], timeout_s: float = 60.0) -> HubProc:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controlplane.cli", "hub", *args, stdout=asyncio.subprocess.PIPE,
            stderr=open(os.environ["CPN_BENCH_LOGS"] + f"/{args[args.index('--hub-id') + 1]}.log", "ab")
            if os.environ.get("CPN_BENCH_LOGS") else asyncio.subprocess.DEVNULL,
            env={**os.environ, "CPN_LOG": "WARNING"})
        hub = cls(proc)
        assert proc.stdout is not None
        async with asyncio.timeout(timeout_s):
            while not hub.port:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    raise RuntimeError(f"cpn hub {' '.join(args)} exited with {await proc.wait()}")
                if line.startswith("admin key: "):
                    hub.admin_key = line.split(": ", 1)[1].strip()
                if m := LISTENING.search(line):
                    hub.port = int(m.group(2))
        return hub

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(20):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def submit(session: aiohttp.ClientSession, ports: list[int], key: str, jobs: int, concurrency: int) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(jobs))
    headers = {"Authorization": f"Bearer {key}"}

    async def worker(w: int) -> None:
        for i in counter:
            port = ports[(w + i) % len(ports)]
            t0 = time.perf_counter()
            async with session.post(f"http://127.0.0.1:{port}/v1/jobs", json=JOB, headers=headers) as resp:
                body = await resp.read()
                if resp.status != 201:
                    errors.append(f"{resp.status} {body[:200]!r}")
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "submissions": jobs, "errors": len(errors), "first_errors": errors[:3],
        "per_s": round(jobs / elapsed, 1),
        "p50_ms": round(common.percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(common.percentile(latencies, 99) * 1000, 2),
    }


async def one_setup(session: aiohttp.ClientSession, hubs: list[HubProc], args: argparse.Namespace,
                    tenant: str) -> dict[str, Any]:
    admin = hubs[0].admin_key
    async with session.post(f"http://127.0.0.1:{hubs[0].port}/v1/tenants", headers={"Authorization": f"Bearer {admin}"},
                            json={"id": tenant, "rate_per_s": 1e6, "burst": 1_000_000}) as resp:
        made = await resp.json()
        assert resp.status == 201, made
    key = made["api_key"]
    for hub in hubs:  # every hub knows the tenant (the record replicated it)
        async with asyncio.timeout(10):
            while True:
                async with session.get(f"http://127.0.0.1:{hub.port}/v1/usage",
                                       headers={"Authorization": f"Bearer {key}"}) as resp:
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.05)
    ports = [h.port for h in hubs]
    await submit(session, ports, key, max(50, args.jobs // 20), args.concurrency)  # warm-up
    return await submit(session, ports, key, args.jobs, args.concurrency)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"jobs": args.jobs, "concurrency": args.concurrency, "hubs": args.hubs}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        async with NatsCluster(base / "nats") as cluster, aiohttp.ClientSession() as session:
            common_args = ["--listen", "127.0.0.1:0"]
            single = await HubProc.start([*common_args, "--record", "sqlite", "--nats", cluster.urls[0],
                                          "--db", str(base / "sqlite" / "hub.db"), "--hub-id", "bench-sqlite",
                                          "--create-admin-key"])
            try:
                out["sqlite"] = await one_setup(session, [single], args, "sqlite")
            finally:
                await single.stop()
            urls = ",".join(cluster.urls)
            hubs: list[HubProc] = []
            try:
                for i in range(args.hubs):
                    hubs.append(await HubProc.start([
                        *common_args, "--record", "nats", "--nats", urls, "--db", str(base / f"hub{i}" / "hub.db"),
                        "--hub-id", f"bench-{i}", *(["--create-admin-key"] if i == 0 else [])]))
                out["nats"] = await one_setup(session, hubs, args, "nats")
            finally:
                for hub in hubs:
                    await hub.stop()
    out["ratio_nats_to_sqlite"] = round(out["nats"]["per_s"] / out["sqlite"]["per_s"], 3)
    out["targets"] = ">= 0.25x the SQLite figure; p99 <= 50 ms"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cpn bench submissions", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--hubs", type=int, default=3)
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    for name, value in result.items():
        print(f"{name:24s} {value}")
    print(f"wrote {common.write('submissions', result)}")
    return 0 if not (result["sqlite"]["errors"] or result["nats"]["errors"]) else 1


if __name__ == "__main__":
    sys.exit(main())
