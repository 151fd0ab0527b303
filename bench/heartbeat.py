"""``cpn bench heartbeat``: the hub's CPU while 5,000 sites heartbeat at 1 Hz (target ≤ 25% of a core).

The hub runs as a real ``cpn hub`` process on a synthetic layout holding the sites; one publisher
process registers every site and then publishes each site's heartbeat once a second, paced in
slices. The hub's CPU time is read from /proc over the measuring window.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from bench import common
from controlplane.nats.natsserver import NatsServer
from edge_agent.nats_barrier import barrier
from topology import synth

PY = sys.executable


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def publisher(url: str, sites: list[str], seconds: float, hub_pid: int) -> dict[str, float]:
    import nats

    from edge_agent import wire

    nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
    for i in range(0, len(sites), 250):
        batch = sites[i:i + 250]
        await asyncio.gather(*(nc.request(wire.register_subject(s), wire.encode(
            wire.Register(site=s, accelerators={"H20": 8}, models=[wire.ReplicaStatus(model="m", slots=8)])), timeout=30)
            for s in batch))
    payloads = {s: wire.heartbeat_subject(s) for s in sites}
    slices = 10
    per_slice = (len(sites) + slices - 1) // slices
    seq = 0
    sent = 0
    cpu0 = wall0 = 0.0
    start = time.perf_counter()
    warm = 2.0
    while True:
        now = time.perf_counter() - start
        if now > warm + seconds:
            break
        if cpu0 == 0.0 and now >= warm:
            cpu0, wall0, sent0 = cpu_seconds(hub_pid), time.perf_counter(), sent
        seq += 1
        for k in range(slices):
            chunk = sites[k * per_slice:(k + 1) * per_slice]
            for s in chunk:
                hb = wire.Heartbeat(site=s, seq=seq, free_cards={"H20": 7.0}, models=[wire.ReplicaStatus(model="m", slots=8, busy=seq % 3)])
                await nc.publish(payloads[s], wire.encode(hb))
                sent += 1
            await barrier(nc)
            target = (seq - 1) + (k + 1) / slices
            delay = target - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
    cpu1, wall1 = cpu_seconds(hub_pid), time.perf_counter()
    await nc.close()
    return {"hub_cpu_pct": 100 * (cpu1 - cpu0) / (wall1 - wall0), "sent_per_s": (sent - sent0) / (wall1 - wall0)}


async def run(n_sites: int = 5000, seconds: float = 10.0) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        doc = synth.document(n_sites, 300, 0)
        layout_path = tmp / "synth.toml"
        layout_path.write_bytes(msgspec.toml.encode(doc))
        sites = [s["id"] for s in doc["sites"]]
        async with NatsServer(tmp / "js") as nats:
            hub = await asyncio.create_subprocess_exec(
                PY, "-m", "controlplane.cli", "hub", "--nats", nats.url, "--db", str(tmp / "hub.db"),
                "--listen", "127.0.0.1:0", "--layout", str(layout_path),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env={**os.environ, "CPN_LOG": "WARNING"},
            )
            assert hub.stdout is not None
            while b"listening on" not in (await asyncio.wait_for(hub.stdout.readline(), 120)):
                pass
            try:
                res = await publisher(nats.url, sites, seconds, hub.pid)
            finally:
                hub.terminate()
                await hub.wait()
    return {"sites": n_sites, "seconds": seconds, "hub_cpu_pct": round(res["hub_cpu_pct"], 1),
            "received_per_s": round(res["sent_per_s"]), "target_cpu_pct": 25}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cpn bench heartbeat")
    p.add_argument("--sites", type=int, default=5000)
    p.add_argument("--seconds", type=float, default=10.0)
    a = p.parse_args(argv)
    res = asyncio.run(run(a.sites, a.seconds))
    print(f"heartbeat: {res['sites']} sites at 1 Hz ({res['received_per_s']}/s): hub CPU {res['hub_cpu_pct']}% of one core (target ≤ 25%)")
    print(f"  wrote {common.write('heartbeat', res)}")
    return 0
