"""Benchmark: durable job submissions (``POST /v1/jobs``, 201 only once the job is durable) per second
and their latency, a single hub on SQLite vs hubs on the replicated record, in the same run.

- ``sqlite``: one ``cpn hub`` process, ``--record sqlite`` (WAL, ``synchronous=FULL``);
- ``nats``: ``--hubs`` ``cpn hub`` processes, ``--record nats``, on a 3-node loopback nats-server
  cluster (R3, ``sync_interval: always``); the clients spread their submissions over every hub;
- ``nats_blocking``: the same with ``record_pipelined_writes = false`` (each process's writes one at
  a time, its loop blocked while the record answers: the write path before pipelining).

Every setup runs at once (each replicated one on a cluster of its own, so each has its own leader
and scheduler); for each client count (``--concurrency 1,16``) the ``--jobs`` measured
submissions of each setup go in ``--rounds`` interleaved rounds (sqlite, nats, nats_blocking, again),
after a warm-up, so a loaded machine's changing load falls on all alike. Every answer must be a
201. Also counted: CPU milliseconds per submission of the setup's hub processes and of the
nats-server nodes (the SQLite hub's bus shares the first cluster; from /proc, which load does not distort the way it does latency). Prints and
writes ``bench/results/submissions.json`` (targets, issue #13: the replicated figure >= 0.25x the
SQLite one, its p99 <= 50 ms on loopback).

Run: ``cpn bench submissions [--jobs N] [--concurrency 1,16] [--hubs H] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from controlplane.nats.natsserver import default_gomaxprocs

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
    async def start(cls, args: list[str], timeout_s: float = 60.0, source: str | None = None) -> HubProc:
        """``source``: run the cpn found in that directory rather than this one."""
        hub_id = args[args.index('--hub-id') + 1]
        profile = os.environ.get("CPN_BENCH_PROFILE")  # --profile: each hub under bench/sampler.py
        sampled = [str(Path(__file__).with_name("sampler.py")), f"{profile}/{hub_id}.stacks"] if profile else []
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *sampled, "-m", "controlplane.cli", "hub", *args, stdout=asyncio.subprocess.PIPE,
            stderr=open(os.environ["CPN_BENCH_LOGS"] + f"/{hub_id}.log", "ab")
            if os.environ.get("CPN_BENCH_LOGS") else asyncio.subprocess.DEVNULL,
            env={**os.environ, "CPN_LOG": "WARNING", **({"PYTHONPATH": source} if source else {})},
            cwd=source)
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


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds the processes ``pids`` have used so far (Linux /proc)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


async def submit(session: aiohttp.ClientSession, ports: list[int], key: str, jobs: int, concurrency: int,
                 latencies: list[float], errors: list[str], by_port: dict[int, list[float]] | None = None) -> float:
    """``jobs`` submissions from ``concurrency`` clients; appends their latencies (also ``by_port``,
    per hub); the seconds taken."""
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
            if by_port is not None:
                by_port.setdefault(port, []).append(latencies[-1])

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return time.perf_counter() - started


class Setup:
    """One system under test: its hub processes, a tenant's key, and what it measured."""

    def __init__(self, name: str, hubs: list[HubProc]) -> None:
        self.name = name
        self.hubs = hubs
        self.key = ""
        self.latencies: list[float] = []
        self.by_port: dict[int, list[float]] = {}
        self.errors: list[str] = []
        self.seconds = 0.0
        self.rounds: list[float] = []
        self.hub_cpu_s = 0.0
        self.nats_cpu_s = 0.0
        self.each_cpu_s = [0.0] * len(hubs)

    async def prepare(self, session: aiohttp.ClientSession, admin: tuple[int, str]) -> None:
        async with session.post(f"http://127.0.0.1:{admin[0]}/v1/tenants", headers={"Authorization": f"Bearer {admin[1]}"},
                                json={"id": self.name, "rate_per_s": 1e6, "burst": 1_000_000}) as resp:
            made = await resp.json()
            assert resp.status == 201, made
        self.key = made["api_key"]
        for hub in self.hubs:  # every hub knows the tenant (the record replicated it)
            async with asyncio.timeout(10):
                while True:
                    async with session.get(f"http://127.0.0.1:{hub.port}/v1/usage",
                                           headers={"Authorization": f"Bearer {self.key}"}) as resp:
                        if resp.status == 200:
                            break
                    await asyncio.sleep(0.05)

    async def run(self, session: aiohttp.ClientSession, jobs: int, concurrency: int, nats_pids: list[int],
                  measured: bool = True) -> None:
        pids = [h.proc.pid for h in self.hubs]
        hub0, nats0 = cpu_s(pids), cpu_s(nats_pids)
        each0 = [cpu_s([p]) for p in pids]
        latencies: list[float] = []
        seconds = await submit(session, [h.port for h in self.hubs], self.key, jobs, concurrency, latencies,
                               self.errors if measured else [], self.by_port if measured else None)
        if measured:
            self.latencies += latencies
            self.seconds += seconds
            self.rounds.append(round(len(latencies) / seconds, 1) if seconds else 0.0)
            self.hub_cpu_s += cpu_s(pids) - hub0
            self.nats_cpu_s += cpu_s(nats_pids) - nats0
            self.each_cpu_s = [t + cpu_s([p]) - t0 for t, p, t0 in zip(self.each_cpu_s, pids, each0)]

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        n = len(lat)
        return {
            "submissions": n, "errors": len(self.errors), "first_errors": self.errors[:3],
            "per_s": round(n / self.seconds, 1) if self.seconds else 0.0,
            "per_s_rounds": self.rounds,
            "p50_ms": round(common.percentile(lat, 50) * 1000, 2),
            "p99_ms": round(common.percentile(lat, 99) * 1000, 2),
            "hub_cpu_ms_per_submission": round(self.hub_cpu_s * 1000 / n, 3) if n else None,
            "nats_cpu_ms_per_submission": round(self.nats_cpu_s * 1000 / n, 3) if n else None,
            "each_hub_cpu_ms_per_submission": [round(t * 1000 / n, 3) for t in self.each_cpu_s] if n else None,
            "each_hub_p99_ms": [round(common.percentile(sorted(self.by_port.get(h.port, [])), 99) * 1000, 2)
                                for h in self.hubs],
        }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every setup runs at once; the measured submissions go in interleaved rounds (each setup in
    turn), so the machine's changing load falls on all of them alike."""
    levels = [int(c) for c in str(args.concurrency).split(",")]
    out: dict[str, Any] = {"jobs": args.jobs, "concurrency": levels, "hubs": args.hubs, "rounds": args.rounds,
                           "load_before": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        blocking_toml = base / "blocking.toml"
        blocking_toml.write_text("record_pipelined_writes = false\n")
        replicated = [("nats", [], None), ("nats_blocking", ["--config", str(blocking_toml)], None)]
        if args.base:  # the same hubs from another checkout of cpn (a same-run before/after)
            replicated.append(("nats_base", [], str(Path(args.base).resolve())))
        for variant in args.variant:  # the same hubs with a setting changed (a same-run A/B of a setting)
            name, _, toml = variant.partition("=")
            (base / f"{name}.toml").write_text(toml.replace(";", "\n") + "\n")
            replicated.append((name, ["--config", str(base / f"{name}.toml")], None))
        if args.gomaxprocs_variant is not None:  # the same hubs on nats-servers with another GOMAXPROCS
            replicated.append((f"nats_gomaxprocs{args.gomaxprocs_variant}", [], None))
        replicated = [r for r in replicated if r[0] in args.setups or r[0] in args.variants]
        # Each replicated setup on a cluster of its own: one record, one leader (its scheduler) each.
        async with contextlib.AsyncExitStack() as stack:
            clusters = [await stack.enter_async_context(NatsCluster(
                base / f"nats{i}", gomaxprocs=(args.gomaxprocs_variant if name.startswith("nats_gomaxprocs")
                                               else args.gomaxprocs) or None))  # 0: Go's own
                for i, (name, _, _) in enumerate(replicated or [("nats", [], None)])]
            session = await stack.enter_async_context(aiohttp.ClientSession())
            cluster = clusters[0]
            common_args = ["--listen", "127.0.0.1:0"]
            procs: list[HubProc] = []
            try:
                single = await HubProc.start([*common_args, "--record", "sqlite", "--nats", cluster.urls[0],
                                              "--db", str(base / "sqlite" / "hub.db"), "--hub-id", "bench-sqlite",
                                              "--create-admin-key"])
                procs.append(single)
                setups = [Setup("sqlite", [single])]
                nats_pids: dict[str, list[int]] = {"sqlite": [n.pid for n in cluster.nodes if n.pid is not None]}
                for (name, extra, source), c in zip(replicated, clusters):
                    hubs = []
                    for i in range(args.hubs):
                        hub_id = f"bench-{name}-{i}"
                        hubs.append(await HubProc.start([
                            *extra, *common_args, "--record", "nats", "--nats", ",".join(c.urls),
                            "--db", str(base / hub_id / "hub.db"), "--hub-id", hub_id,
                            *(["--create-admin-key"] if i == 0 else [])], source=source))
                        procs.append(hubs[-1])
                    setups.append(Setup(name, hubs))
                    nats_pids[name] = [n.pid for n in c.nodes if n.pid is not None]
                for setup in setups:
                    await setup.prepare(session, (setup.hubs[0].port, setup.hubs[0].admin_key))
                for level in levels:
                    measured = [Setup(s.name, s.hubs) for s in setups]
                    for m, s in zip(measured, setups):
                        m.key = s.key
                        await m.run(session, max(50, args.jobs // 20), level, nats_pids[m.name], measured=False)  # warm-up
                    for _ in range(args.rounds):
                        for m in measured:
                            await m.run(session, max(1, args.jobs // args.rounds), level, nats_pids[m.name])
                    result = {m.name: m.summary() for m in measured}
                    sq = result["sqlite"]["per_s"]
                    if "nats" in result:
                        result["ratio_nats_to_sqlite"] = round(result["nats"]["per_s"] / sq, 3) if sq else None
                    if "nats_blocking" in result:
                        result["ratio_blocking_to_sqlite"] = round(result["nats_blocking"]["per_s"] / sq, 3) if sq else None
                    if "nats" in result and "nats_blocking" in result:
                        result["ratio_pipelined_to_blocking"] = round(
                            result["nats"]["per_s"] / result["nats_blocking"]["per_s"], 3) if result["nats_blocking"]["per_s"] else None
                    if "nats" in result and "nats_base" in result and result["nats_base"]["per_s"]:
                        result["ratio_nats_to_base"] = round(result["nats"]["per_s"] / result["nats_base"]["per_s"], 3)
                    for name in sorted(args.variants):
                        if sq and name in result:
                            result[f"ratio_{name}_to_sqlite"] = round(result[name]["per_s"] / sq, 3)
                    out[f"c{level}"] = result
            finally:
                for hub in procs:
                    await hub.stop()
    out["load_after"] = round(os.getloadavg()[0], 2)
    out["targets"] = ">= 0.25x the SQLite figure; p99 <= 50 ms"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cpn bench submissions", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000, help="measured submissions per setup and client count")
    parser.add_argument("--concurrency", default="1,16", help="client counts, comma-separated (default 1,16)")
    parser.add_argument("--hubs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds the submissions are split into")
    parser.add_argument("--profile", metavar="DIR", help="run each hub under bench/sampler.py (stack samples of "
                        "where its CPU goes) and write DIR/<hub id>.stacks and .stacks.top")
    parser.add_argument("--base", metavar="DIR", help="also run the replicated hubs from the cpn source in DIR "
                        "(e.g. `git archive main`, unpacked), as setup nats_base: a same-run before/after")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=TOML",
                        help="also run the replicated hubs with these hub settings (TOML, ';' between lines), "
                        "as setup NAME: a same-run A/B of a setting, e.g. nats_nofull='scheduler_full_plan_s = 3600'")
    parser.add_argument("--gomaxprocs", type=int, default=None, help="GOMAXPROCS of every nats-server "
                        "(default: as `cpn up --ha` starts them, 1 on a host of 2 CPUs or fewer, else Go's own; "
                        "0: Go's own)")
    parser.add_argument("--gomaxprocs-variant", type=int, default=None, metavar="N",
                        help="also run the replicated hubs on nats-servers with GOMAXPROCS=N (0: Go's own; "
                        "setup nats_gomaxprocsN)")
    parser.add_argument("--setups", default="sqlite,nats,nats_blocking",
                        help="which setups besides sqlite run (default sqlite,nats,nats_blocking)")
    args = parser.parse_args(argv)
    if args.gomaxprocs is None:
        args.gomaxprocs = default_gomaxprocs() or 0
    args.setups = set(args.setups.split(",")) | {"sqlite"} | ({"nats_base"} if args.base else set())
    args.variants = {v.partition("=")[0] for v in args.variant} | (
        {f"nats_gomaxprocs{args.gomaxprocs_variant}"} if args.gomaxprocs_variant is not None else set())
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        os.environ["CPN_BENCH_PROFILE"] = str(Path(args.profile).resolve())
    common.install_uvloop()  # the tenant's client on the loop cpn's own tools use: less of the two cores for the harness
    result = asyncio.run(run(args))
    for name, value in result.items():
        print(f"{name:24s} {value}")
    print(f"wrote {common.write('submissions', result)}")
    failed = any(r[s]["errors"] for k, r in result.items() if k.startswith("c") and isinstance(r, dict)
                 for s in ("sqlite", "nats", "nats_blocking", "nats_base", *args.variants) if s in r)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
