"""``cpn bench gateway``: the full tenant path against its floor, measured in the same run.

Full path: HTTP in -> auth -> route -> NATS request to a ``sim`` agent with zero service time -> back
(``cpn hub`` and ``cpn agent`` as real processes, ``POST /v1/infer``). Floor: a bare aiohttp
handler doing one bare NATS request to a bare responder (bench/floor_server.py). Each server and
each responder is its own process; the load generator is ``wrk`` (bench/wrk.py; the Debian package
``wrk``, exit 2 with that reason when it is missing). Until issue #18 it was bench/loadgen.py
(removed), an aiohttp client that tops out near the floor's own rate, so it capped the floor and
the ratio flattered the hub. The machine has 2 cores, so wrk, servers, responders and nats-server share them:
the ratios are what this benchmark is for, each the median of paired floor/hub rounds. Targets
(architecture §10, 32 connections): p50 ≤ 1.25× the floor, throughput ≥ 0.8× the floor.

``cpn bench gateway --peers`` is the other half (bench/peers.py): cpn next to vllm-router and
sglang-router in front of one fast mock OpenAI backend. ``cpn bench gateway --market``
(bench/gate.py) measures what the market's gate adds to a request on this path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

from bench import common, systems, wrk
from controlplane.nats.natsserver import NatsServer
from topology import loader

PY = sys.executable
DEMO3 = Path(loader.default_path()).parent / "demo-3.toml"


async def _spawn(*args: str, ready: str, env: dict[str, str] | None = None) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        PY, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "CPN_LOG": "WARNING", **(env or {})},
    )
    assert proc.stdout is not None
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        if not line:
            raise RuntimeError(f"{args} exited before '{ready}'")
        if ready in line:
            return proc, line.strip()


async def _site_and_hub(tmp: Path, nats_url: str, db: str, models: list[str], tenants: list[str],
                        procs: list[asyncio.subprocess.Process]) -> tuple[asyncio.subprocess.Process, str]:
    """sh-edge's agent (sim backend, no service time, 1024 slots of each of ``models``) and a hub on the
    demo-3 layout whose site's own models serve ``tenants``, started as processes (added to
    ``procs``, to be stopped by the caller). Returns the hub's process and base URL."""
    agent_toml = tmp / "agent.toml"
    agent_toml.write_text(
        f'site = "sh-edge"\nnats = "{nats_url}"\ncity = "shanghai"\naccelerators = {{ H20 = 4 }}\n'
        + "".join(f'[[models]]\nname = "{m}"\ncards = 1.0\nslots = 1024\n' for m in models)
        + "[backend.sim]\nttft_ms = 0\nper_token_ms = 0\nslots = 1024\n"
    )
    procs.append(await asyncio.create_subprocess_exec(
        PY, "-m", "controlplane.cli", "agent", "--config", str(agent_toml),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, env={**os.environ, "CPN_LOG": "WARNING"},
    ))
    hub_toml = tmp / "hub.toml"
    hub_toml.write_text(f"local_model_tenants = {json.dumps(tenants)}\n")
    hub, line = await _spawn("-m", "controlplane.cli", "hub", "--config", str(hub_toml), "--nats", nats_url, "--db", db,
                             "--listen", "127.0.0.1:0", "--layout", str(DEMO3), ready="listening on")
    procs.append(hub)
    return hub, line.rsplit(" ", 1)[1]


async def _load(url: str, conns: int, seconds: float, key: str | None, body: str, tmp: Path) -> dict[str, float]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    script = tmp / f"load-{abs(hash((url, body)))}.lua"
    if not script.exists():
        script.write_text(wrk.lua_script(body, headers))
    return await wrk.run(url, conns=conns, seconds=seconds, script_path=str(script))


async def run(seconds: float = 3.0, conns_list: tuple[int, ...] = (1, 32), rounds: int = 5) -> dict[str, object]:
    """Both paths stay up for the whole run; loads alternate floor/hub ``rounds`` times per
    concurrency. A ratio is the median of the rounds' ratios (each round pairs a floor load with
    the hub load right after it, so drift in the machine's speed hits both sides of a pair alike);
    the absolute figures are the median rounds."""
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        async with NatsServer(tmp / "js") as nats:
            procs: list[asyncio.subprocess.Process] = []
            try:
                responder, _ = await _spawn("-m", "bench.floor_server", nats.url, "--responder", ready="ready")
                procs.append(responder)
                floor, line = await _spawn("-m", "bench.floor_server", nats.url, ready="port=")
                procs.append(floor)
                floor_url = f"http://127.0.0.1:{line.split('=')[1]}/floor"
                db = tmp / "hub.db"
                proc = await asyncio.create_subprocess_exec(
                    PY, "-m", "controlplane.cli", "tenant", "create", "bench", "--default-origin", "shanghai",
                    "--rate", "1000000", "--db", str(db), stdout=asyncio.subprocess.PIPE,
                )
                key = (await proc.communicate())[0].decode().strip()
                hub, base = await _site_and_hub(tmp, nats.url, str(db), ["m"], ["bench"], procs)
                hub_url = base + "/v1/infer"
                body = '{"model":"m","input":"hi","max_tokens":1}'
                # until the agent's replica is ready at the hub
                await systems.wait_ready(hub_url, body.encode(), {"Authorization": f"Bearer {key}"}, hub, 30, "cpn hub")
                runs: dict[str, list[dict[str, float]]] = {}
                for _ in range(rounds):
                    for c in conns_list:
                        runs.setdefault(f"floor_c{c}", []).append(await _load(floor_url, c, seconds, None, '{"input":"hi"}', tmp))
                        runs.setdefault(f"hub_c{c}", []).append(await _load(hub_url, c, seconds, key, body, tmp))
            finally:
                for p in reversed(procs):
                    await systems.stop(p)
    results: dict[str, object] = {}
    for name, rs in runs.items():
        results[name] = {
            "rps": _median([r["rps"] for r in rs]), "p50_ms": _median([r["p50_ms"] for r in rs]),
            "p99_ms": _median([r["p99_ms"] for r in rs]), "errors": sum(int(r["errors"]) for r in rs),
            "rounds_rps": [round(r["rps"]) for r in rs],
            "generator_cores": round(_median([r["generator_cpu_s"] / r["seconds"] for r in rs]), 3),
        }
    for c in conns_list:
        pairs = list(zip(runs[f"floor_c{c}"], runs[f"hub_c{c}"]))
        p50s = [h["p50_ms"] / f["p50_ms"] for f, h in pairs]
        tputs = [h["rps"] / f["rps"] for f, h in pairs]
        results[f"ratio_c{c}"] = {
            "p50": round(_median(p50s), 3), "throughput": round(_median(tputs), 3),
            "rounds_p50": [round(x, 3) for x in p50s], "rounds_throughput": [round(x, 3) for x in tputs],
        }
    results["targets"] = {"p50": 1.25, "throughput": 0.8}
    results["generator"] = "wrk"
    results["note"] = (f"{rounds} alternating floor/hub rounds of {seconds:g} s; ratios are the median of the rounds' "
                       "ratios; wrk is the load generator; it, the servers, responders and nats-server share the machine's 2 cores")
    return results


def _median(xs: list[float]) -> float:
    ys = sorted(xs)
    return ys[len(ys) // 2]


def main(argv: list[str] | None = None) -> int:
    if argv and "--peers" in argv:
        from bench import peers

        return peers.main([a for a in argv if a != "--peers"])
    if argv and "--market" in argv:  # the market gate's cost on this path (bench/gate.py)
        from bench import gate

        return gate.main([a for a in argv if a != "--market"])
    p = argparse.ArgumentParser(
        prog="cpn bench gateway",
        description="The hub against its floor (a bare aiohttp handler doing one nats-py request), driven by wrk.",
        epilog="--peers: cpn next to vllm-router and sglang-router (its own options: --peers --help); "
               "--market: the market gate's cost on the inference path (--market --help).")
    p.add_argument("--seconds", type=float, default=3.0, help="length of each measured cell")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    args = p.parse_args(argv)
    try:
        wrk.binary()
    except wrk.WrkMissing as exc:
        print(f"cpn bench gateway: {exc}")
        return 2
    res = asyncio.run(run(args.seconds, rounds=args.rounds))
    for c in (1, 32):
        f, h, r = res[f"floor_c{c}"], res[f"hub_c{c}"], res[f"ratio_c{c}"]
        print(f"gateway c={c}: floor p50 {f['p50_ms']:.2f} ms p99 {f['p99_ms']:.2f} ms {f['rps']:.0f} req/s | "  # type: ignore[index]
              f"hub p50 {h['p50_ms']:.2f} ms p99 {h['p99_ms']:.2f} ms {h['rps']:.0f} req/s errors {h['errors']} | "  # type: ignore[index]
              f"ratio p50 {r['p50']} (≤ 1.25) throughput {r['throughput']} (≥ 0.8)")  # type: ignore[index]
    print(f"  wrote {common.write('gateway', res)}")
    return 0
