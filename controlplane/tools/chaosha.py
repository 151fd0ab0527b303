"""``cpn chaos --ha``: the chaos loop on the rig of ``cpn up --ha`` (no single hub).

The network: a 3-node NATS cluster, three ``cpn hub --record nats`` processes (each gateway and
controller; one leads) and the demo-3 layout's agents
(:class:`controlplane.tools.upha.HaNetwork`). Under load (inference and training submissions spread
over the three gateways; a client whose gateway does not answer retries at another, as a client
behind DNS or a load balancer would), faults in a seeded order, every kind at least once:

- ``leader_kill``: SIGKILL of the leading hub process (restarted after the takeover);
- ``gateway_kill``: SIGKILL of a hub process that does not lead (restarted 1.5 s later);
- ``nats_kill``: SIGKILL of a NATS node (restarted 2 s later, same store);
- ``nats_pause``: SIGSTOP of a NATS node for 2 s, then SIGCONT.

Invariants checked at the end (each must be 0): acknowledged submissions lost (a 2xx job missing at
any gateway), duplicates (two jobs for one idempotency key, or a retry answered with another id),
stale attempts' results accepted, attempts started twice for one job (two sites running one job at
once, or one attempt number at two sites: sampled from the agents every 0.1 s). Figures: the
takeover time per fault (kill to a newer epoch in ``GET /v1/cluster``, where the leader changed),
inference errors per fault kind, inside and outside fault windows.
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from controlplane.tools import chaos
from controlplane.tools.upha import HaNetwork, HubChild

KINDS = ["leader_kill", "gateway_kill", "nats_kill", "nats_pause"]


@dataclass
class HaChaosOptions(chaos.ChaosOptions):
    """:class:`chaos.ChaosOptions` with fewer jobs; ``seconds`` is the length of the fault phase (a
    first round of every kind runs whatever it is)."""

    jobs: int = 6


@dataclass
class HaReport(chaos.Report):
    double_started: int = 0
    lost_at_gateways: dict[str, int] = field(default_factory=dict)
    retried_elsewhere: int = 0
    """Requests a client moved to another gateway because its own did not answer."""
    unfinished_jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Job id -> its state, attempt and pool, of the jobs not finished when the run ended."""
    infer_errors_in_faults: dict[str, dict[str, int]] = field(default_factory=dict)
    """Fault kind -> "<status> <error code>" -> count, of the failed requests that overlapped it."""
    infer_failures: list[dict[str, Any]] = field(default_factory=list)
    """Each failed inference request: when (s into the fault phase), the fault window it overlapped
    ("" outside), and every gateway tried with its status, error code, seconds taken and message."""

    def as_dict(self) -> dict[str, Any]:
        out = super().as_dict()
        out["invariants"]["attempts_started_twice"] = self.double_started
        out["invariants"]["accepted_then_lost"] = self.lost + sum(self.lost_at_gateways.values())
        out["lost_at_gateways"] = self.lost_at_gateways
        out["retried_elsewhere"] = self.retried_elsewhere
        out["unfinished_jobs"] = self.unfinished_jobs
        out["inference"]["errors_in_faults"] = self.infer_errors_in_faults
        out["inference"]["failures"] = self.infer_failures
        takeovers = [f["takeover_s"] for f in self.faults if f.get("takeover_s") is not None]
        out["takeover_s"] = {"n": len(takeovers), "max": round(max(takeovers), 2) if takeovers else None,
                             "each": takeovers}
        for name in ("site_loss_detection_s", "redispatch_s"):  # no site faults here
            out.pop(name, None)
        return out


class Clients:
    """Tenants' and the operator's HTTP calls, spread over the live gateways with failover."""

    def __init__(self, net: HaNetwork, session: aiohttp.ClientSession, report: HaReport) -> None:
        self.net = net
        self.session = session
        self.report = report
        self.tenant_key = ""
        self.rig = self  # chaos._check reads ``api.rig.tenant_key``
        self._next = 0

    async def call(self, method: str, path: str, key: str, body: Any = None, headers: dict[str, str] | None = None,
                   timeout_s: float = 5.0, trail: list[list[Any]] | None = None) -> tuple[int, Any]:
        """One request: at the next gateway in turn; on no answer (or 502/503) at each other gateway once
        (``trail``: gets [hub id, status, error code, seconds, error message] of each gateway tried)."""
        hubs = list(self.net.hubs)
        self._next += 1
        status, answer = 0, None
        for i in range(len(hubs)):
            hub = hubs[(self._next + i) % len(hubs)]
            began = time.monotonic()
            status, answer = await self._one(hub, method, path, key, body, headers, timeout_s)
            error = (answer or {}).get("error", {}) if isinstance(answer, dict) else {}
            if trail is not None:
                trail.append([hub.hub_id, status, error.get("code", ""), round(time.monotonic() - began, 2),
                              str(error.get("message", ""))[:200]])
            if status not in (0, 502, 503):
                if i:
                    self.report.retried_elsewhere += 1
                return status, answer
        return status, answer

    async def at(self, hub: HubChild, method: str, path: str, key: str) -> tuple[int, Any]:
        return await self._one(hub, method, path, key, None, None, 5.0)

    async def _one(self, hub: HubChild, method: str, path: str, key: str, body: Any, headers: dict[str, str] | None,
                   timeout_s: float) -> tuple[int, Any]:
        hdrs = {"Authorization": f"Bearer {key}", **(headers or {})}
        try:
            async with self.session.request(method, hub.url(self.net.opts.host) + path, json=body, headers=hdrs,
                                            timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                try:
                    return resp.status, await resp.json(content_type=None)
                except ValueError:
                    return resp.status, None
        except (aiohttp.ClientError, TimeoutError, OSError):
            return 0, None


class Window:
    """Which fault is on (a request that saw it change overlapped one)."""

    def __init__(self) -> None:
        self.kind = ""
        self.epoch = 0
        self.began = time.monotonic()
        """When the fault phase began (failures and faults are timed from it)."""

    def set(self, kind: str) -> None:
        self.kind = kind
        self.epoch += 1


async def _inference(api: Clients, report: HaReport, window: Window, stop: asyncio.Event) -> None:
    from controlplane.tools.up import DEMO_MODEL

    body = {"model": DEMO_MODEL, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 4}
    while not stop.is_set():
        kind, epoch = window.kind, window.epoch
        trail: list[list[Any]] = []
        status, answer = await api.call("POST", "/v1/chat/completions", api.tenant_key, body, timeout_s=3.0,
                                        trail=trail)
        outside = not kind and not window.kind and window.epoch == epoch
        bucket = report.infer_outside if outside else report.infer_in_fault
        per_kind = report.infer_by_fault.setdefault(kind or window.kind or "overlapped", [0, 0]) if not outside else [0, 0]
        bucket[0] += 1
        per_kind[0] += 1
        if status != 200:
            bucket[1] += 1
            per_kind[1] += 1
            code = (answer or {}).get("error", {}).get("code", "") if isinstance(answer, dict) else ""
            what = f"{status} {code}".strip() if status else "no answer"
            errors = report.infer_outside_errors if outside else \
                report.infer_errors_in_faults.setdefault(kind or window.kind or "overlapped", {})
            errors[what] = errors.get(what, 0) + 1
            report.infer_failures.append({"at_s": round(time.monotonic() - window.began, 2), "window": kind or window.kind,
                                          "gateways": trail})
            await asyncio.sleep(0.05)
        else:
            await asyncio.sleep(0.01)


async def _submit(api: Clients, key: str, body: dict[str, Any], deadline: float) -> str | None:
    """Submit under one Idempotency-Key until a 2xx (any gateway; a write waits out a stream election)."""
    while time.monotonic() < deadline:
        status, answer = await api.call("POST", "/v1/jobs", api.tenant_key, body, headers={"Idempotency-Key": key},
                                        timeout_s=15.0)
        if status in (200, 201) and answer:
            return str(answer["id"])
        await asyncio.sleep(0.2)
    return None


async def _training(api: Clients, report: HaReport, accepted: dict[str, str], opts: HaChaosOptions,
                    rng: random.Random, until: float) -> None:
    spacing = max(0.5, opts.seconds / max(1, opts.jobs) / 2)
    for i in range(opts.jobs):
        key = f"chaos-ha-{opts.seed}-{i}"
        body = {"name": key, "cards": 1, "accelerators": ["910B", "H20", "L20", "A800"], "est_hours": 2.0,
                "checkpoint_interval_min": 10, "checkpoint_cost_s": 30}
        job_id = await _submit(api, key, body, until + 30)
        if job_id is not None:
            accepted[key] = job_id
            if rng.random() < 0.5:  # a retry at (likely) another gateway must return the same job
                if await _submit(api, key, body, until + 30) != job_id:
                    report.duplicates += 1
        await asyncio.sleep(spacing)


async def _watch_attempts(net: HaNetwork, stop: asyncio.Event, double: set[str]) -> None:
    """Every 0.1 s: no job runs at two sites at once, no attempt number runs at two sites."""
    where: dict[tuple[str, int], str] = {}
    while not stop.is_set():
        now: dict[str, str] = {}
        for agent in net.agents:
            for job, handle in list(agent.training.attempts.items()):
                if now.setdefault(job, agent.site) != agent.site:
                    double.add(job)
                if where.setdefault((job, handle.attempt), agent.site) != agent.site:
                    double.add(job)
        await asyncio.sleep(0.1)


async def _fault(net: HaNetwork, kind: str, rng: random.Random, window: Window) -> dict[str, Any]:
    """Inject one fault, undo it, and say what happened (with the takeover time if the leader changed)."""
    leader, epoch = await net.wait_leader(30)
    started = time.monotonic()
    window.set(kind)
    target = ""
    takeover: list[float] = []
    live = [h for h in net.hubs if h.hub_id != leader]

    async def watch() -> None:
        while True:
            got = await net.leader(among=live)
            if got is not None and got[1] > epoch:
                takeover.append(time.monotonic() - started)
                return
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    try:
        if kind == "leader_kill":
            target = leader
            await net.kill_hub(leader)
            await asyncio.wait_for(asyncio.shield(watcher), 30)
            await net.restart_hub(leader)
        elif kind == "gateway_kill":
            target = rng.choice([h.hub_id for h in live])
            await net.kill_hub(target)
            await asyncio.sleep(1.5)
            await net.restart_hub(target)
        elif kind == "nats_kill":
            target = rng.choice(sorted(net.servers))
            await net.kill_node(target)
            await asyncio.sleep(2.0)
            await net.restart_node(target)
        elif kind == "nats_pause":
            target = rng.choice(sorted(net.servers))
            await net.pause_node(target)
            await asyncio.sleep(2.0)
            await net.resume_node(target)
        await asyncio.sleep(1.0)  # settle before the window closes
    finally:
        watcher.cancel()
        window.set("")
    # A leader lost late (a NATS node's pause or loss can outlast the lease's renew deadline): wait
    # for one, and time its takeover from the fault's start too.
    after = await net.wait_leader(30)
    if not takeover and after[1] > epoch:
        takeover.append(time.monotonic() - started)
    return {"kind": kind, "target": target, "at_s": round(started - window.began, 2), "leader_before": [leader, epoch], "leader_after": list(after),
            "lasted_s": round(time.monotonic() - started, 2),
            "takeover_s": round(takeover[0], 2) if takeover else None}


async def _faults(net: HaNetwork, report: HaReport, rng: random.Random, window: Window, until: float) -> None:
    order = KINDS[:]
    rng.shuffle(order)
    first_round = True
    while first_round or time.monotonic() < until - 8:
        if not order:
            first_round = False
            order = KINDS[:]
            rng.shuffle(order)
            continue
        kind = order.pop(0)
        report.faults.append(await _fault(net, kind, rng, window))
        await asyncio.sleep(rng.uniform(1.5, 3.0))


async def run(opts: HaChaosOptions) -> HaReport:
    from controlplane.tools.up import DEMO_MODEL, UpOptions
    from topology import loader

    rng = random.Random(opts.seed)
    report = HaReport()
    with tempfile.TemporaryDirectory(prefix="cpn-chaos-ha-") as tmp:
        root = opts.data_dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        up_opts = UpOptions(data_dir=root, port=0, layout=str(loader.data_path("demo-3")), sim_time_scale=opts.time_scale)
        net = HaNetwork(up_opts, hub_overrides={"scheduler_tick_s": 0.25, "default_rate_per_s": 100000.0,
                                                "default_burst": 100000})
        try:
            await net.start()
            async with aiohttp.ClientSession() as session:
                api = Clients(net, session, report)
                api.tenant_key = net.credentials["tenant_key"]
                probe = {"model": DEMO_MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
                deadline = time.monotonic() + 30
                while (await api.call("POST", "/v1/chat/completions", api.tenant_key, probe))[0] != 200:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the network never served inference")
                    await asyncio.sleep(0.2)
                until = time.monotonic() + opts.seconds
                stop = asyncio.Event()
                window = Window()
                accepted: dict[str, str] = {}
                double: set[str] = set()
                workers = [asyncio.create_task(_inference(api, report, window, stop)) for _ in range(3)]
                watcher = asyncio.create_task(_watch_attempts(net, stop, double))
                trainer = asyncio.create_task(_training(api, report, accepted, opts, rng, until))
                try:
                    await _faults(net, report, rng, window, until)
                    await trainer
                finally:
                    stop.set()
                    await asyncio.gather(*workers, watcher, return_exceptions=True)
                await chaos._check(api, report, accepted, settle_s=60)  # type: ignore[arg-type]
                report.double_started = len(double)
                for job_id in accepted.values():
                    status, job = await api.call("GET", f"/v1/jobs/{job_id}", api.tenant_key)
                    if status == 200 and job and job.get("state") not in ("succeeded", "failed", "cancelled"):
                        report.unfinished_jobs[job_id] = {k: job.get(k) for k in ("state", "attempt", "pool", "progress")}
                        report.unfinished_jobs[job_id]["at_sites"] = [
                            (a.site, h.attempt) for a in net.agents for j, h in a.training.attempts.items() if j == job_id]
                for hub in net.hubs:  # every acknowledged job is there at every gateway
                    missing = 0
                    for job_id in accepted.values():
                        status, _ = await api.at(hub, "GET", f"/v1/jobs/{job_id}", api.tenant_key)
                        missing += status != 200
                    report.lost_at_gateways[hub.hub_id] = missing
        finally:
            await net.stop()
    return report


def render(report: HaReport, wall_s: float) -> str:
    d = report.as_dict()
    inv = d["invariants"]
    by_fault = ", ".join(f"{k} {v['error_rate']:.1%} of {v['requests']}" for k, v in d["inference"]["by_fault"].items())
    takeovers = ", ".join(f"{f['kind']} {f['takeover_s']} s" for f in report.faults if f.get("takeover_s") is not None)
    return "\n".join([
        f"cpn chaos --ha: {len(report.faults)} faults ({', '.join(f['kind'] for f in report.faults)}), {wall_s:.0f} s wall",
        "",
        "| check | value | want |",
        "|---|---|---|",
        f"| acknowledged submissions lost (any gateway) | {inv['accepted_then_lost']} | 0 |",
        f"| duplicates | {inv['duplicate_side_effects']} | 0 |",
        f"| stale results accepted | {inv['stale_results_accepted']} | 0 |",
        f"| attempts started twice for one job | {inv['attempts_started_twice']} | 0 |",
        f"| jobs accepted / succeeded / unfinished | {report.accepted} / {report.succeeded} / {report.unfinished} | all succeed |",
        f"| takeover where the leader changed (s) | {takeovers or 'none'} | ≤ 5 |",
        f"| inference error rate in faults | {d['inference']['in_faults']['error_rate']:.2%} of {d['inference']['in_faults']['requests']} | 0 (clients fail over) |",
        f"| inference error rate outside faults | {d['inference']['outside']['error_rate']:.2%} of {d['inference']['outside']['requests']} | 0 |",
        f"| inference error rate by fault | {by_fault} | |",
        f"| requests moved to another gateway | {report.retried_elsewhere} | (counted) |",
    ])


def ok(report: HaReport) -> bool:
    inv = report.as_dict()["invariants"]
    return not any(inv.values())


def main(opts: HaChaosOptions, as_json: bool = False, *, results: Path | None = None, readme: bool = False) -> int:
    """Run, print the table (or JSON); ``results``: also write the JSON there; ``readme``: record the
    run as ``bench/results/chaos_ha.json`` and rewrite the README's benchmark table."""
    started = time.monotonic()
    report = asyncio.run(run(opts))
    wall = time.monotonic() - started
    data = {**report.as_dict(), "seed": opts.seed, "seconds": opts.seconds, "wall_s": round(wall, 1)}
    print(json.dumps(data, indent=2, sort_keys=True) if as_json else render(report, wall))
    if results is not None:
        results.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    if readme:
        from bench import common, table

        common.write("chaos_ha", data)
        table.update_readme()
    return 0 if ok(report) else 1
