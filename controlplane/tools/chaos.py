"""``cpn chaos``: a bounded chaos loop against a real network, then invariant checks.

Everything runs on loopback: an embedded nats-server with per-site identities, the hub as a real
child process (so it can be SIGKILLed), one agent per site of the demo-3 layout in this process,
each reaching NATS through its own fault proxy. A workload of inference requests and training
jobs (submitted with idempotency keys, retried until accepted) runs while faults are injected in a
seeded order: nats-server killed and restarted, nats-server paused, a site partitioned for less
than the detection period, a site partitioned for longer, an agent killed and restarted, the hub
SIGKILLed and restarted.

Invariants checked at the end (each must be 0): accepted-then-lost jobs, duplicate jobs for one
idempotency key, results accepted from a stale attempt. Figures: site-loss detection time, time to
re-dispatch training after a loss, inference error rate inside and outside fault windows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import aiohttp

from controlplane.tools.faultproxy import FaultProxy
from controlplane.nats.natsserver import NatsServer, default_gomaxprocs
from controlplane.tools.up import nats_identities
from topology import loader

log = logging.getLogger("cpn.chaos")

MODEL = "chat"


@dataclass
class ChaosOptions:
    seconds: float = 60.0
    seed: int = 1
    jobs: int = 8
    time_scale: float = 600.0
    """Simulated training seconds per wall second (a 3-hour job takes 18 s)."""
    data_dir: Path | None = None


@dataclass
class Report:
    faults: list[dict[str, Any]] = field(default_factory=list)
    detection_s: list[float] = field(default_factory=list)
    redispatch_s: list[float] = field(default_factory=list)
    infer_in_fault: list[int] = field(default_factory=lambda: [0, 0])
    """[requests, errors] while a fault was active."""
    infer_outside: list[int] = field(default_factory=lambda: [0, 0])
    """[requests, errors] wholly outside faults (begun and ended with none active, none in between)."""
    infer_outside_errors: dict[str, int] = field(default_factory=dict)
    infer_by_fault: dict[str, list[int]] = field(default_factory=dict)
    """Fault kind -> [requests, errors] of requests that began during a fault of that kind."""
    """What the errors outside faults were: "<status> <error code>" -> count."""
    accepted: int = 0
    lost: int = 0
    duplicates: int = 0
    stale_accepted: int = 0
    unfinished: int = 0
    succeeded: int = 0
    stale_events_ignored: int = 0

    def as_dict(self) -> dict[str, Any]:
        def rate(pair: list[int]) -> float:
            return round(pair[1] / pair[0], 4) if pair[0] else 0.0

        def stats(xs: list[float]) -> dict[str, float] | None:
            if not xs:
                return None
            ys = sorted(xs)
            return {"n": len(ys), "min": round(ys[0], 2), "median": round(ys[len(ys) // 2], 2), "max": round(ys[-1], 2)}

        return {
            "invariants": {"accepted_then_lost": self.lost, "duplicate_side_effects": self.duplicates,
                           "stale_results_accepted": self.stale_accepted},
            "jobs": {"accepted": self.accepted, "succeeded": self.succeeded, "unfinished": self.unfinished},
            "site_loss_detection_s": stats(self.detection_s),
            "redispatch_s": stats(self.redispatch_s),
            "inference": {"in_faults": {"requests": self.infer_in_fault[0], "error_rate": rate(self.infer_in_fault)},
                          "outside": {"requests": self.infer_outside[0], "error_rate": rate(self.infer_outside),
                                      "errors": dict(sorted(self.infer_outside_errors.items()))},
                          "by_fault": {k: {"requests": v[0], "error_rate": rate(v)}
                                       for k, v in sorted(self.infer_by_fault.items())}},
            "stale_events_ignored": self.stale_events_ignored,
            "faults": self.faults,
        }


class Rig:
    """The network under test and handles to break it."""

    def __init__(self, opts: ChaosOptions, root: Path) -> None:
        self.opts = opts
        self.root = root
        self.layout_path = loader.data_path("demo-3")
        self.layout = loader.load(self.layout_path)
        self.nats: NatsServer | None = None
        self.proxies: dict[str, FaultProxy] = {}
        self.agents: dict[str, Any] = {}
        self.hub_proc: asyncio.subprocess.Process | None = None
        self.hub_url = ""
        self.hub_port = 0
        self.admin_key = ""
        self.tenant_key = ""
        self.identities: Any = None
        self.fault_active = False
        self.fault_epoch = 0
        """Bumped when a fault begins and when it ends: a request that saw it change overlapped one."""
        self.fault_kind = ""

    def set_fault(self, kind: str) -> None:
        """``kind`` of the fault beginning now; "" when it has ended (and the network settled)."""
        self.fault_active = bool(kind)
        self.fault_kind = kind
        self.fault_epoch += 1

    async def start(self) -> None:
        site_ids = [s.id for s in self.layout.sites]
        self.identities = nats_identities(self.root, site_ids)
        self.nats = NatsServer(self.root / "jetstream", config=self.identities.config_path,
                               gomaxprocs=default_gomaxprocs())  # as `cpn up` starts it
        await self.nats.start()
        for sid in site_ids:
            self.proxies[sid] = FaultProxy(self.nats.url)
            await self.proxies[sid].start()
        await self.start_hub()
        for site in self.layout.sites:
            await self.start_agent(site.id)

    async def start_hub(self) -> None:
        assert self.nats is not None
        cfg = self.root / "hub.toml"
        cfg.write_text("\n".join([
            f'nats_url = "{self.nats.url}"',
            f'nats_user = "{self.identities.hub_user}"',
            f'nats_password = "{self.identities.hub_password}"',
            f'db_path = "{self.root / "hub.db"}"',
            f'layout = "{self.layout_path}"',
            f"listen_port = {self.hub_port}",
            f"sim_time_scale = {self.opts.time_scale}",
            "strict_inboxes = true",
            "scheduler_tick_s = 0.25",
            "default_rate_per_s = 100000.0",
            "default_burst = 100000",
            # the sites serve their own model (no deployment): to the chaos tenant too
            'local_model_tenants = ["chaos"]',
            "",
        ]))
        self.hub_proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controlplane.cli", "hub", "--config", str(cfg),
            *(["--create-admin-key"] if not self.admin_key else []),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            env={**os.environ, "CPN_LOG": "WARNING"},
        )
        assert self.hub_proc.stdout is not None
        while True:
            line = (await asyncio.wait_for(self.hub_proc.stdout.readline(), 60)).decode()
            if not line:
                raise RuntimeError("the hub exited during start-up")
            if line.startswith("admin key: "):
                self.admin_key = line.split(": ", 1)[1].strip()
            if "listening on" in line:
                self.hub_url = line.strip().rsplit(" ", 1)[1]
                self.hub_port = int(self.hub_url.rsplit(":", 1)[1])
                break

    async def kill_hub(self) -> None:
        if self.hub_proc is not None and self.hub_proc.returncode is None:
            self.hub_proc.kill()
            await self.hub_proc.wait()

    async def stop_hub(self) -> None:
        if self.hub_proc is not None and self.hub_proc.returncode is None:
            self.hub_proc.terminate()
            try:
                await asyncio.wait_for(self.hub_proc.wait(), 10)
            except asyncio.TimeoutError:
                await self.kill_hub()

    async def start_agent(self, site_id: str) -> None:
        from edge_agent.agent import Agent
        from edge_agent.config import AgentConfig, BackendConfig, ExecutorsConfig, ModelConfig, SimBackendConfig

        site = self.layout.site(site_id)
        user, password = self.identities.site_credentials[site_id]
        models = [ModelConfig(name=MODEL, cards=0.5, slots=16)] if site.tier == "edge" else []
        agent = Agent(AgentConfig(
            site=site.id, nats=self.proxies[site.id].url, user=user, password=password, tier=site.tier,
            city=site.city, provider=site.provider, region=site.region, accelerators=dict(site.accelerators),
            data_dir=str(self.root / "agents" / site.id), models=models,
            backend=BackendConfig(sim=SimBackendConfig(ttft_ms=2, per_token_ms=1, slots=16)),
            executors=ExecutorsConfig(enabled=["sim"]),
        ))
        await agent.start()
        self.agents[site.id] = agent

    async def stop_agent(self, site_id: str) -> None:
        agent = self.agents.pop(site_id, None)
        if agent is not None:
            await agent.stop()

    async def stop(self) -> None:
        for sid in list(self.agents):
            with contextlib.suppress(Exception):
                await self.stop_agent(sid)
        await self.stop_hub()
        for proxy in self.proxies.values():
            await proxy.close()
        if self.nats is not None:
            await self.nats.stop()


class Api:
    def __init__(self, rig: Rig, session: aiohttp.ClientSession) -> None:
        self.rig = rig
        self.session = session

    async def call(self, method: str, path: str, key: str, body: Any = None,
                   headers: dict[str, str] | None = None, timeout_s: float = 5.0) -> tuple[int, Any]:
        hdrs = {"Authorization": f"Bearer {key}", **(headers or {})}
        try:
            async with self.session.request(method, self.rig.hub_url + path, json=body, headers=hdrs,
                                            timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                try:
                    return resp.status, await resp.json()
                except (aiohttp.ContentTypeError, ValueError):
                    return resp.status, None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return 0, None


async def _inference(api: Api, report: Report, stop: asyncio.Event, rng: random.Random) -> None:
    origins = ["shanghai", "hangzhou", "nanjing"]
    while not stop.is_set():
        rig = api.rig
        began_in_fault, epoch, kind = rig.fault_active, rig.fault_epoch, rig.fault_kind
        status, body = await api.call("POST", "/v1/infer", rig.tenant_key,
                                      {"model": MODEL, "input": "ping", "origin": rng.choice(origins), "max_tokens": 2},
                                      timeout_s=3.0)
        outside = not began_in_fault and not rig.fault_active and rig.fault_epoch == epoch
        bucket = report.infer_outside if outside else report.infer_in_fault
        per_kind = report.infer_by_fault.setdefault(kind, [0, 0]) if began_in_fault else [0, 0]
        bucket[0] += 1
        per_kind[0] += 1
        if status != 200:
            bucket[1] += 1
            per_kind[1] += 1
            if outside:
                code = (body or {}).get("error", {}).get("code", "") if isinstance(body, dict) else ""
                what = f"{status} {code}".strip() if status else "no answer"
                report.infer_outside_errors[what] = report.infer_outside_errors.get(what, 0) + 1
            await asyncio.sleep(0.05)
        else:
            await asyncio.sleep(0.01)


async def _submit(api: Api, key: str, body: dict[str, Any], deadline: float) -> str | None:
    """Submit until accepted (the hub may be down): the same key every time."""
    while time.monotonic() < deadline:
        status, answer = await api.call("POST", "/v1/jobs", api.rig.tenant_key, body, headers={"Idempotency-Key": key})
        if status in (200, 201) and answer:
            return str(answer["id"])
        await asyncio.sleep(0.3)
    return None


async def _training(api: Api, report: Report, accepted: dict[str, str], opts: ChaosOptions, rng: random.Random,
                    until: float) -> None:
    spacing = max(0.5, opts.seconds / max(1, opts.jobs) / 2)
    for i in range(opts.jobs):
        key = f"chaos-{opts.seed}-{i}"
        body = {"name": key, "cards": 2, "accelerators": ["910B", "H20", "L20", "A800"], "est_hours": 3.0,
                "checkpoint_interval_min": 10, "checkpoint_cost_s": 30}
        job_id = await _submit(api, key, body, until)
        if job_id is not None:
            accepted[key] = job_id
            if rng.random() < 0.5:  # a client retry of an accepted submission must change nothing
                again = await _submit(api, key, body, until)
                if again != job_id:
                    report.duplicates += 1
        await asyncio.sleep(spacing)


async def _site_state(api: Api, site: str) -> str:
    status, body = await api.call("GET", f"/v1/sites/{site}", api.rig.admin_key, timeout_s=2.0)
    return str(body.get("state")) if status == 200 and body else "?"


async def _jobs_at(api: Api, site: str, accepted: dict[str, str]) -> dict[str, int]:
    out = {}
    for job_id in accepted.values():
        status, body = await api.call("GET", f"/v1/jobs/{job_id}", api.rig.tenant_key, timeout_s=2.0)
        if status == 200 and body and body.get("pool") == site and body.get("state") in ("starting", "running", "placed"):
            out[job_id] = int(body.get("attempt") or 0)
    return out


async def _target(api: Api, accepted: dict[str, str], edges: list[str], rng: random.Random) -> str:
    """A site running training if there is one (so re-dispatch gets measured), else an edge pool."""
    pools: list[str] = []
    for job_id in accepted.values():
        status, body = await api.call("GET", f"/v1/jobs/{job_id}", api.rig.tenant_key, timeout_s=2.0)
        if status == 200 and body and body.get("state") == "running" and body.get("pool"):
            pools.append(str(body["pool"]))
    return rng.choice(sorted(set(pools))) if pools else rng.choice(edges)


async def _measure_loss(api: Api, report: Report, site: str, t0: float, running: dict[str, int]) -> None:
    deadline = t0 + 15
    while time.monotonic() < deadline:
        if await _site_state(api, site) == "lost":
            detected = time.monotonic()
            report.detection_s.append(detected - t0)
            pending = dict(running)
            while pending and time.monotonic() < detected + 20:
                for job_id, attempt in list(pending.items()):
                    status, body = await api.call("GET", f"/v1/jobs/{job_id}", api.rig.tenant_key, timeout_s=2.0)
                    if status == 200 and body and (int(body.get("attempt") or 0) > attempt or body.get("state") in ("succeeded", "failed", "cancelled")):
                        report.redispatch_s.append(time.monotonic() - detected)
                        pending.pop(job_id)
                await asyncio.sleep(0.1)
            return
        await asyncio.sleep(0.1)


async def _faults(rig: Rig, api: Api, report: Report, accepted: dict[str, str], rng: random.Random, until: float) -> None:
    assert rig.nats is not None
    edges = [s.id for s in rig.layout.sites if s.tier == "edge"]
    kinds = ["nats_kill", "nats_pause", "short_partition", "long_partition", "agent_kill", "hub_kill"]
    order = kinds[:]
    rng.shuffle(order)
    while time.monotonic() < until - 12:
        if not order:
            order = kinds[:]
            rng.shuffle(order)
        kind = order.pop(0)
        site = await _target(api, accepted, edges, rng)
        started = time.monotonic()
        rig.set_fault(kind)
        running = await _jobs_at(api, site, accepted)
        if kind == "nats_kill":
            await rig.nats.kill()
            await asyncio.sleep(1.0)
            await rig.nats.start()
        elif kind == "nats_pause":
            await rig.nats.pause()
            await asyncio.sleep(1.5)
            await rig.nats.resume()
        elif kind == "short_partition":
            rig.proxies[site].set_blackhole()
            await asyncio.sleep(1.5)
            rig.proxies[site].set_pass()
        elif kind == "long_partition":
            rig.proxies[site].set_blackhole()
            t0 = time.monotonic()
            await _measure_loss(api, report, site, t0, running)
            rig.proxies[site].set_pass()
        elif kind == "agent_kill":
            await rig.stop_agent(site)
            t0 = time.monotonic()
            await _measure_loss(api, report, site, t0, running)
            await rig.start_agent(site)
        elif kind == "hub_kill":
            await rig.kill_hub()
            await asyncio.sleep(0.5)
            await rig.start_hub()
        report.faults.append({"kind": kind, "site": site if "partition" in kind or kind == "agent_kill" else None,
                              "at_s": round(started - (until - rig.opts.seconds), 2), "lasted_s": round(time.monotonic() - started, 2)})
        # Let the network settle before the next fault (and count inference outside faults).
        await asyncio.sleep(1.0)
        rig.set_fault("")
        await asyncio.sleep(rng.uniform(2.0, 4.0))


async def _check(api: Api, report: Report, accepted: dict[str, str], settle_s: float) -> None:
    report.accepted = len(accepted)
    deadline = time.monotonic() + settle_s
    final: dict[str, dict[str, Any]] = {}
    while True:
        final.clear()
        for key, job_id in accepted.items():
            status, body = await api.call("GET", f"/v1/jobs/{job_id}", api.rig.tenant_key)
            if status == 200 and body:
                final[key] = body
        done = all(b.get("state") in ("succeeded", "failed", "cancelled") for b in final.values())
        if done or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    report.lost = len(accepted) - len(final)
    report.succeeded = sum(1 for b in final.values() if b.get("state") == "succeeded")
    report.unfinished = sum(1 for b in final.values() if b.get("state") not in ("succeeded", "failed", "cancelled"))
    status, listing = await api.call("GET", "/v1/jobs?limit=1000", api.rig.tenant_key)
    if status == 200 and listing:
        names: dict[str, int] = {}
        for job in listing.get("data", []):
            names[job.get("name", "")] = names.get(job.get("name", ""), 0) + 1
        report.duplicates += sum(n - 1 for n in names.values() if n > 1)
    for body in final.values():
        if body.get("state") != "succeeded":
            continue
        status, events = await api.call("GET", f"/v1/jobs/{body['id']}/events", api.rig.tenant_key)
        if status != 200 or not events:
            continue
        done_by = [e.get("attempt") for e in events.get("data", []) if e.get("kind") == "attempt_exited"
                   and (e.get("body") or {}).get("reason") == "completed"]
        if done_by and max(done_by) != body.get("attempt"):  # (events come in arrival order)
            report.stale_accepted += 1


async def run(opts: ChaosOptions) -> Report:
    rng = random.Random(opts.seed)
    report = Report()
    with tempfile.TemporaryDirectory(prefix="cpn-chaos-") as tmp:
        root = opts.data_dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        rig = Rig(opts, root)
        await rig.start()
        try:
            async with aiohttp.ClientSession() as session:
                api = Api(rig, session)
                status, body = await api.call("POST", "/v1/tenants", rig.admin_key, {"id": "chaos", "default_origin": "shanghai"})
                if status != 201:
                    raise RuntimeError(f"could not create the chaos tenant: {status} {body}")
                rig.tenant_key = body["api_key"]
                # Wait until inference is served before breaking anything.
                deadline = time.monotonic() + 20
                while (await api.call("POST", "/v1/infer", rig.tenant_key, {"model": MODEL, "input": "x"}))[0] != 200:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the network never served inference")
                    await asyncio.sleep(0.2)
                until = time.monotonic() + opts.seconds
                stop = asyncio.Event()
                accepted: dict[str, str] = {}
                workers = [asyncio.create_task(_inference(api, report, stop, random.Random(opts.seed + i))) for i in range(3)]
                trainer = asyncio.create_task(_training(api, report, accepted, opts, rng, until))
                from controlplane.progress import Progress

                show = Progress("cpn chaos")
                ticker = asyncio.create_task(_progress(show, report, until, opts.seconds))
                try:
                    await _faults(rig, api, report, accepted, rng, until)
                    await trainer
                finally:
                    ticker.cancel()
                show(1.0, f"{len(report.faults)} faults; checking invariants")
                stop.set()
                await asyncio.gather(*workers)
                await _check(api, report, accepted, settle_s=60)
                async with session.get(rig.hub_url + "/metrics") as resp:
                    for line in (await resp.text()).splitlines():
                        if line.startswith("cpn_stale_events_total "):
                            report.stale_events_ignored = int(float(line.split()[1]))
        finally:
            await rig.stop()
    return report


async def _progress(show: Callable[[float, str], None], report: Report, until: float, seconds: float) -> None:
    """A line on stderr as the fault phase goes (plain lines when not on a terminal)."""
    while True:
        left = max(0.0, until - time.monotonic())
        kinds = ", ".join(f["kind"] for f in report.faults[-3:])
        show(1 - left / seconds if seconds > 0 else 1.0, f"{len(report.faults)} faults" + (f", last {kinds}" if kinds else ""))
        await asyncio.sleep(1.0)


def _seconds(stats: dict[str, float] | None) -> str:
    """``median 2.5, max 3.1 (n=4)`` from a stats dict, ``none measured`` for None."""
    if not stats:
        return "none measured"
    return f"median {stats['median']:g}, max {stats['max']:g} (n={stats['n']:g})"


def render(report: Report, wall_s: float) -> str:
    d = report.as_dict()
    inv = d["invariants"]
    errors = d["inference"]["outside"]["errors"]
    outside_errors = f" ({', '.join(f'{k}: {v}' for k, v in errors.items())})" if errors else ""
    by_fault = ", ".join(f"{k} {v['error_rate']:.1%} of {v['requests']}" for k, v in d["inference"]["by_fault"].items())
    lines = [
        f"cpn chaos: {len(report.faults)} faults over the run ({', '.join(f['kind'] for f in report.faults)}), {wall_s:.0f} s wall",
        "",
        "| check | value | want |",
        "|---|---|---|",
        f"| accepted-then-lost jobs | {inv['accepted_then_lost']} | 0 |",
        f"| duplicate side effects | {inv['duplicate_side_effects']} | 0 |",
        f"| stale results accepted | {inv['stale_results_accepted']} | 0 |",
        f"| jobs accepted / succeeded / unfinished | {report.accepted} / {report.succeeded} / {report.unfinished} | all succeed |",
        f"| site-loss detection (s) | {_seconds(d['site_loss_detection_s'])} | ≤ 3.5 |",
        f"| time to re-dispatch training (s) | {_seconds(d['redispatch_s'])} | ≤ 1 after detection |",
        f"| inference error rate in faults | {d['inference']['in_faults']['error_rate']:.2%} of {d['inference']['in_faults']['requests']} | low |",
        f"| inference error rate outside faults | {d['inference']['outside']['error_rate']:.2%} of {d['inference']['outside']['requests']}"
        f"{outside_errors} | 0 |",
        f"| inference error rate by fault | {by_fault} | 0 for partitions and agent kills (failover) |",
        f"| stale events ignored by the hub | {report.stale_events_ignored} | (counted) |",
    ]
    return "\n".join(lines)


def ok(report: Report) -> bool:
    return report.lost == 0 and report.duplicates == 0 and report.stale_accepted == 0


def main(opts: ChaosOptions, as_json: bool = False, *, results: Path | None = None, readme: bool = False) -> int:
    """Run, print the table (or JSON), and write results only where asked.

    Args:
        results: write the results JSON to this file.
        readme: record the run as the chaos benchmark (bench/results/chaos.json) and rewrite the
            benchmark table of the project's README.md (the one next to the ``bench`` package,
            never a README in the current directory).
    """
    started = time.monotonic()
    report = asyncio.run(run(opts))
    wall = time.monotonic() - started
    data = {**report.as_dict(), "seed": opts.seed, "seconds": opts.seconds}
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(render(report, wall))
    if results is not None:
        results.write_text(json.dumps({**data, "wall_s": round(wall, 1)}, indent=2, sort_keys=True) + "\n")
    if readme:
        from bench import common, table

        common.write("chaos", {**data, "wall_s": round(wall, 1)})
        table.update_readme()
    return 0 if ok(report) else 1
