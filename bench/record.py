"""Benchmark: the replicated record on a 3-node loopback nats-server cluster (R3, sync_interval always).

Prints and writes ``bench/results/record.json``:

- compare-and-set writes: one writer in sequence (latency), then ``--concurrency`` writers
  (throughput, latency under load);
- atomic commits of three entities (job + attempt + usage, one decision) fenced by a leader epoch
  (one process's fenced commits go one at a time, see controlplane/replicated/kv.py);
- a leader's scheduler ticks: ``--decisions-per-tick`` decisions (job CAS + attempt create) in one
  fenced atomic batch each: decisions per second;
- the same-run baseline: SQLite WAL + ``synchronous=FULL`` commits of one row, one writer;
- takeover after a leader's SIGKILL (``--takeovers`` runs, candidate processes with the default
  lease 3 / 2 / 0.4 s).

Run: ``.venv/bin/python -m bench.record`` (the cluster and the candidates come from tests/support).

Not the same benchmark as ``cpn bench submissions`` (kept apart on purpose): this one measures the
record's adapter (``controlplane/replicated/kv.py``) alone, in one process, and the takeover;
``submissions`` measures whole hub processes answering ``POST /v1/jobs`` over HTTP (SQLite, the
record pipelined, the record one write at a time). The scheduler's decisions persisted through the
record are ``cpn bench scheduler --record``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common
from controlplane.replicated import kv
from controlplane.replicated.lease_rules import LeaseConfig
from tests.support.natscluster import NatsCluster

ROOT = Path(__file__).resolve().parents[1]


def summary(latencies_s: list[float], elapsed_s: float) -> dict[str, float]:
    lat = sorted(latencies_s)
    return {"ops": len(lat), "per_s": round(len(lat) / elapsed_s, 1),
            "p50_ms": round(common.percentile(lat, 50) * 1e3, 3), "p99_ms": round(common.percentile(lat, 99) * 1e3, 3)}


async def cas_writers(record: kv.Record, writers: int, writes_each: int, tag: str) -> dict[str, float]:
    latencies: list[float] = []

    async def one(w: int) -> None:
        key = kv.key("job", f"{tag}-{w}")
        revision = await record.create(key, b"0")
        for i in range(writes_each):
            t = time.perf_counter()
            revision = await record.update(key, f'{{"state":"running","n":{i}}}'.encode(), revision)
            latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(w) for w in range(writers)))
    return summary(latencies, time.perf_counter() - t0)


async def commits(record: kv.Record, writers: int, commits_each: int) -> dict[str, float]:
    fence = kv.Fence("bench", await record.create("sys.fence.bench", b"bench"))
    latencies: list[float] = []

    async def one(w: int) -> None:
        job = await record.create(kv.key("job", f"c-{w}"), b"queued")
        for i in range(commits_each):
            t = time.perf_counter()
            job, _, _ = await record.commit([
                kv.Write(kv.key("job", f"c-{w}"), f"placed {i}".encode(), job),
                kv.Write(kv.key("attempt", f"c-{w}-{i}"), b"starting", 0),
                kv.Write(kv.key("usage", f"c-{w}-{i}"), b"0", 0),
            ], fence=fence)
            latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(w) for w in range(writers)))
    return summary(latencies, time.perf_counter() - t0)


async def ticks(record: kv.Record, decisions_per_tick: int, ticks_n: int) -> dict[str, float]:
    """A leader's scheduler ticks: each commits its decisions (job placed by CAS + attempt created)
    as one fenced atomic batch."""
    fence = kv.Fence("ticks", await record.create("sys.fence.ticks", b"bench"))
    jobs = {}
    for j in range(decisions_per_tick):
        jobs[j] = await record.create(kv.key("job", f"t-{j}"), b"queued")
    latencies: list[float] = []
    t0 = time.perf_counter()
    for tick in range(ticks_n):
        writes = []
        for j in range(decisions_per_tick):
            writes.append(kv.Write(kv.key("job", f"t-{j}"), f"placed {tick}".encode(), jobs[j]))
            writes.append(kv.Write(kv.key("attempt", f"t-{j}-{tick}"), b"starting", 0))
        t = time.perf_counter()
        revisions = await record.commit(writes, fence=fence)
        latencies.append(time.perf_counter() - t)
        for j in range(decisions_per_tick):
            jobs[j] = revisions[2 * j]
    elapsed = time.perf_counter() - t0
    out = summary(latencies, elapsed)
    out["decisions_per_tick"] = decisions_per_tick
    out["decisions_per_s"] = round(decisions_per_tick * ticks_n / elapsed, 1)
    return out


def sqlite_full(path: Path, n: int) -> dict[str, float]:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, body TEXT, rev INTEGER)")
    db.execute("INSERT INTO jobs VALUES ('j', '{}', 0)")
    latencies = []
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        db.execute("BEGIN IMMEDIATE")
        db.execute("UPDATE jobs SET body = ?, rev = rev + 1 WHERE id = 'j' AND rev = ?", (f'{{"n":{i}}}', i))
        db.execute("COMMIT")
        latencies.append(time.perf_counter() - t)
    out = summary(latencies, time.perf_counter() - t0)
    db.close()
    return out


async def takeovers(cluster: NatsCluster, runs: int) -> list[float]:
    config = LeaseConfig()
    procs: list[tuple[asyncio.subprocess.Process, list[dict[str, Any]]]] = []

    async def spawn(identity: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.support.leasecandidate", "--servers", ",".join(cluster.urls),
            "--identity", identity, "--lease", str(config.lease_duration_s), "--renew", str(config.renew_deadline_s),
            "--retry", str(config.retry_period_s), cwd=ROOT, stdout=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
        lines: list[dict[str, Any]] = []
        procs.append((proc, lines))

        async def read() -> None:
            assert proc.stdout is not None
            async for raw in proc.stdout:
                lines.append(json.loads(raw))

        asyncio.create_task(read())

    def leader() -> tuple[float, asyncio.subprocess.Process] | None:
        found = [(e["t"], p) for p, lines in procs for e in lines if e["event"] == "leading" and p.returncode is None]
        return max(found, key=lambda x: x[0]) if found else None

    async def until(cond: Any, timeout_s: float) -> Any:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if (v := cond()):
                return v
            await asyncio.sleep(0.02)
        raise TimeoutError

    results: list[float] = []
    try:
        for i in range(3):
            await spawn(f"b{i}")
        await until(leader, 30)
        for run in range(runs):
            await asyncio.sleep(1.0)
            _, old = leader()  # type: ignore[misc]
            killed = time.time()
            old.send_signal(signal.SIGKILL)
            await old.wait()
            at, _ = await until(lambda: (lead := leader()) and lead[1] is not old and lead, 15)
            results.append(round(at - killed, 3))
            await spawn(f"b{3 + run}")  # keep three candidates
    finally:
        for proc, _ in procs:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
    return results


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        async with NatsCluster(Path(tmp) / "nats") as cluster:
            record = await kv.Record.open(cluster.urls)
            try:
                await cas_writers(record, 1, 50, "warm")
                out["cas_sequential"] = await cas_writers(record, 1, args.writes, "seq")
                out["cas_concurrent"] = await cas_writers(record, args.concurrency, args.writes // args.concurrency * 4,
                                                          "conc")
                out["commit3_fenced_concurrent"] = await commits(record, args.concurrency,
                                                                 args.writes // args.concurrency * 2)
                out["tick_fenced"] = await ticks(record, args.decisions_per_tick, 50)
            finally:
                await record.close()
            if args.takeovers:
                out["takeover_after_sigkill_s"] = await takeovers(cluster, args.takeovers)
        out["sqlite_full_sequential"] = sqlite_full(Path(tmp) / "bench.db", args.writes)
    out["concurrency"] = args.concurrency
    seq = out["cas_sequential"]["per_s"]
    out["ratio_concurrent_cas_to_sqlite_full"] = round(out["cas_concurrent"]["per_s"] / out["sqlite_full_sequential"]["per_s"], 3)
    out["ratio_sequential_cas_to_sqlite_full"] = round(seq / out["sqlite_full_sequential"]["per_s"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.record", description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--takeovers", type=int, default=5)
    parser.add_argument("--decisions-per-tick", type=int, default=200)
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    for name, value in result.items():
        print(f"{name:40s} {value}")
    print(f"wrote {common.write('record', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
