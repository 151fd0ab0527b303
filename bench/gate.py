"""``cpn bench gateway --market``: what the market's gate costs on the inference path, same run.

One ``cpn hub`` and one ``cpn agent`` (real processes, ``sim`` backend with zero service time, as
``cpn bench gateway``) serve two tenants the same request (``POST /v1/infer``, 2 bytes of prompt,
1 token out) under wrk:

- **off**: tenant ``plain`` calls model ``m``, which is not in the catalogue; the tenant has no
  budget and is not public-facing. The gate answers at its first dictionary lookups.
- **on**: tenant ``gated`` is public-facing with a monthly budget and calls model ``filed``, which
  is priced and filed for public service: every request passes the filing rule, reads what the
  tenant spent this period (its ledger entries in SQLite plus its unflushed usage), takes a hold
  and releases it, and answers with ``X-CPN-Model-Filing``; each usage flush prices its lines and
  posts them to the ledger.

The loads alternate off/on ``rounds`` times. The figure is the hub process's CPU (user + system,
``/proc/<pid>/stat``) per answered request, each side, and the median over rounds of the paired
difference on − off: the µs of CPU the gate adds to a request. CPU per request is what load on a
shared machine distorts least; latencies are reported too but are noise at this size.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from bench import common, cpu, systems, wrk
from bench.gateway import DEMO3, _load, _median, _site_and_hub
from controlplane.nats.natsserver import NatsServer

PY = sys.executable
SIDES = ("off", "on")


async def _cli(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(PY, "-m", "controlplane.cli", *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"cpn {' '.join(args)}: {err.decode().strip()}")
    return out.decode().strip()


async def run(seconds: float = 3.0, rounds: int = 5, conns: int = 4) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        db = str(tmp / "hub.db")
        keys = {}
        for side, tenant in zip(SIDES, ("plain", "gated")):
            keys[side] = await _cli("tenant", "create", tenant, "--default-origin", "shanghai", "--rate", "1000000",
                                    "--db", db)
        await _cli("market", "model", "set", "filed", "--owner", "gated", "--input-fen-per-mtok", "80",
                   "--output-fen-per-mtok", "200", "--filing-number", "Bench-GenAI-0001", "--filing-scope", "public",
                   "--filed-on", "2024-05-01", "--db", db)
        await _cli("market", "tenant", "gated", "--public-facing", "--db", db)
        await _cli("market", "budget", "set", "gated", "--limit-fen", str(10**12), "--db", db)
        bodies = {"off": '{"model":"m","input":"hi","max_tokens":1}',
                  "on": '{"model":"filed","input":"hi","max_tokens":1}'}
        async with NatsServer(tmp / "js") as nats:
            procs: list[asyncio.subprocess.Process] = []
            try:
                # the site's own models serve both tenants
                hub, base = await _site_and_hub(tmp, nats.url, db, ["m", "filed"], ["plain", "gated"], procs)
                url = base + "/v1/infer"
                for side in SIDES:
                    await systems.wait_ready(url, bodies[side].encode(), {"Authorization": f"Bearer {keys[side]}"},
                                             hub, 30, f"cpn hub ({side})")
                runs: dict[str, list[dict[str, float]]] = {s: [] for s in SIDES}
                for _ in range(rounds):
                    for side in SIDES:
                        before = cpu.sample({"hub": hub.pid})["hub"]
                        res = await _load(url, conns, seconds, keys[side], bodies[side], tmp)
                        after = cpu.sample({"hub": hub.pid})["hub"]
                        used = cpu.seconds_used({hub.pid: before.get(hub.pid, 0)}, {hub.pid: after.get(hub.pid, 0)})
                        res["hub_cpu_us_per_request"] = used * 1e6 / res["requests"] if res["requests"] else float("nan")
                        runs[side].append(res)
            finally:
                for p in reversed(procs):
                    await systems.stop(p)
        micro = _in_process(db, DEMO3, rounds)
    diffs = [on["hub_cpu_us_per_request"] - off["hub_cpu_us_per_request"] for off, on in zip(runs["off"], runs["on"])]
    out: dict[str, object] = {}
    for side in SIDES:
        rs = runs[side]
        out[side] = {
            "hub_cpu_us_per_request": round(_median([r["hub_cpu_us_per_request"] for r in rs]), 1),
            "rps": round(_median([r["rps"] for r in rs])), "p50_ms": _median([r["p50_ms"] for r in rs]),
            "errors": sum(int(r["errors"]) for r in rs),
            "rounds_cpu_us": [round(r["hub_cpu_us_per_request"], 1) for r in rs],
        }
    off_cpu = out["off"]["hub_cpu_us_per_request"]  # type: ignore[index]
    out["gate_cpu_us_per_request"] = round(_median(diffs), 1)
    out["rounds_gate_cpu_us"] = [round(d, 1) for d in diffs]
    out["gate_share_of_request_cpu"] = round(_median(diffs) / off_cpu, 3) if off_cpu else None
    out["in_process"] = micro
    out["conns"] = conns
    out["note"] = (f"{rounds} alternating off/on rounds of {seconds:g} s at {conns} connections (wrk); the gate's cost is "
                   "the median of the rounds' paired differences in the hub process's CPU per answered request; "
                   "wrk, hub, agent and nats-server share the machine's cores")
    return out


def _in_process(db: str, layout: Path, rounds: int, calls: int = 20_000) -> dict[str, object]:
    """The gate alone, in this process, on the bench's own database: ``MarketService.admit`` and
    ``release`` per request, off and on alternating, CPU time (``time.process_time``) per call."""
    from controlplane.compose import build
    from controlplane.config import HubConfig
    from edge_agent import wire

    proc = build(HubConfig(nats_url="nats://127.0.0.1:1", db_path=db, layout=str(layout), listen_port=0))
    proc.services.market.store.open()
    market = proc.services.market
    market.refresh()
    reqs = {"off": [wire.InferRequest(request_id=f"off-{i}", model="m", prompt="hi", max_tokens=1, tenant="plain")
                    for i in range(calls)],
            "on": [wire.InferRequest(request_id=f"on-{i}", model="filed", prompt="hi", max_tokens=1, tenant="gated")
                   for i in range(calls)]}
    per: dict[str, list[float]] = {s: [] for s in SIDES}
    for _ in range(rounds):
        for side in SIDES:
            now = market.clock.time()
            admit, release = market.admit, market.release
            t = time.process_time()
            for r in reqs[side]:
                admit(r, now)
                release(r.request_id)
            per[side].append((time.process_time() - t) * 1e6 / calls)
    market.store.db.conn.close()
    diffs = [on - off for off, on in zip(per["off"], per["on"])]
    return {"off_us": round(_median(per["off"]), 2), "on_us": round(_median(per["on"]), 2),
            "gate_us": round(_median(diffs), 2), "calls_per_round": calls}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cpn bench gateway --market")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--conns", type=int, default=4)
    args = p.parse_args(argv)
    try:
        wrk.binary()
    except wrk.WrkMissing as exc:
        print(f"cpn bench gateway --market: {exc}")
        return 2
    res = asyncio.run(run(args.seconds, args.rounds, args.conns))
    off, on = res["off"], res["on"]
    print(f"market gate: off {off['hub_cpu_us_per_request']} µs CPU/request ({off['rps']} req/s, p50 {off['p50_ms']:.2f} ms) | "  # type: ignore[index]
          f"on {on['hub_cpu_us_per_request']} µs ({on['rps']} req/s, p50 {on['p50_ms']:.2f} ms) | "  # type: ignore[index]
          f"gate adds {res['gate_cpu_us_per_request']} µs CPU per request (rounds {res['rounds_gate_cpu_us']}); "
          f"errors {off['errors']}/{on['errors']}")  # type: ignore[index]
    micro = res["in_process"]
    print(f"  in process: admit + release {micro['off_us']} µs CPU off, {micro['on_us']} µs on: "  # type: ignore[index]
          f"+{micro['gate_us']} µs")  # type: ignore[index]
    print(f"  wrote {common.write('gate', res)}")
    return 0
