"""``python -m bench.siteflood``: tenants' chat latency while one site floods the hub with heartbeats.

A real ``cpn up`` (demo-3 layout, per-site NATS identities) runs as its own process, from this
tree or from ``--code DIR`` (another checkout, to compare). The load generator (``bench.loadgen``)
sends chat completions with the demo tenant's key for ``--seconds``, first quietly, then while a
flooding process, holding only one site's own NATS credentials (derived from ``cpn up``'s secret
as ``cpn up`` derives them), publishes ``--kb`` KB heartbeats on that site's subject as fast as it
can. Prints one JSON line: p50/p99 before and during, and how many heartbeats were sent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = ROOT / "topology" / "data" / "demo-3.toml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def heartbeat_body(site: str, seq: int, kb: int, shape: str = "attempts") -> bytes:
    """A valid heartbeat of about ``kb`` KB listing attempts or model replicas."""
    from edge_agent import wire

    hb = wire.Heartbeat(site=site, seq=seq)
    n = 0
    while len(wire.encode(hb)) < kb * 1024:
        n += 50
        if shape == "models":
            hb = wire.Heartbeat(site=site, seq=seq, models=[
                wire.ReplicaStatus(model=f"m-{i:05d}", deployment=f"d-{i:05d}", cards=1.0, slots=4) for i in range(n)])
        else:
            hb = wire.Heartbeat(site=site, seq=seq, attempts=[wire.AttemptRef(job=f"job-{i:06d}", attempt=1)
                                                               for i in range(n)])
    return wire.encode(hb)


async def flood(url: str, site: str, user: str, password: str, seconds: float, kb: int, shape: str) -> int:
    import nats

    from edge_agent import wire

    nc = await nats.connect(url, user=user, password=password, inbox_prefix=wire.inbox_prefix(site),
                            pending_size=64 * 1024 * 1024)
    body = heartbeat_body(site, 10**9, kb, shape)
    subject = wire.heartbeat_subject(site)
    sent = 0
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        for _ in range(200):
            await nc.publish(subject, body)
        sent += 200
        await nc.flush()
    await nc.close()
    return sent


def get(url: str, key: str) -> dict[str, object]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--code", default=str(ROOT), help="checkout whose `cpn up` to run (default: this tree)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--kb", type=int, default=17)
    p.add_argument("--conns", type=int, default=4)
    p.add_argument("--shape", choices=["attempts", "models"], default="models",
                   help="what the heartbeats list: model replicas (default) or training attempts")
    p.add_argument("--site", default="", help="the flooding site (default: the layout's first)")
    p.add_argument("--layout", default=str(LAYOUT), help="layout for cpn up (default demo-3)")
    p.add_argument("--flood", nargs=5, metavar=("URL", "SITE", "USER", "PASSWORD", "SECONDS"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.flood:
        url, site, user, password, seconds = a.flood
        print(asyncio.run(flood(url, site, user, password, float(seconds), a.kb, a.shape)))
        return
    data = Path(tempfile.mkdtemp(prefix="cpn-flood-"))
    http, nport = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": a.code}
    up = subprocess.Popen([sys.executable, "-m", "controlplane.cli", "up", "--data-dir", str(data), "--port", str(http),
                           "--nats-port", str(nport), "--layout", a.layout], cwd=a.code, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        creds_path = data / "demo-credentials.json"
        deadline = time.time() + 180
        while not creds_path.exists():
            if time.time() > deadline or up.poll() is not None:
                raise SystemExit("cpn up did not start")
            time.sleep(0.2)
        key = json.loads(creds_path.read_text())["tenant_key"]
        base = f"http://127.0.0.1:{http}"
        while not (models := get(f"{base}/v1/models", key)["data"]):  # the demo deployment comes up
            if time.time() > deadline + 60:
                raise SystemExit("no model became ready")
            time.sleep(0.5)
        model = models[0]["id"]  # type: ignore[index]
        time.sleep(3)
        from controlplane.nats import natsconf
        from topology import loader

        sites = [s.id for s in loader.load(a.layout).sites]
        a.site = a.site or sites[0]
        creds = natsconf.derive_credentials(sites, (data / "nats-secret").read_bytes()).sites[a.site]
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16})

        def chat() -> dict[str, float]:
            out = subprocess.run([sys.executable, "-m", "bench.loadgen", f"{base}/v1/chat/completions", "--conns",
                                  str(a.conns), "--seconds", str(a.seconds), "--key", key, "--body", body],
                                 cwd=ROOT, capture_output=True, text=True, check=True)
            return json.loads(out.stdout)  # type: ignore[no-any-return]

        quiet = chat()
        flooder = subprocess.Popen([sys.executable, "-m", "bench.siteflood", "--kb", str(a.kb), "--shape", a.shape, "--flood",
                                    f"nats://127.0.0.1:{nport}", a.site, creds.user, creds.password,
                                    str(a.seconds + 2)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        time.sleep(1)
        loud = chat()
        sent = int((flooder.communicate(timeout=120)[0] or "0").strip() or 0)
        print(json.dumps({"code": a.code, "model": model, "quiet": quiet, "flood": loud, "heartbeats_sent": sent,
                          "heartbeat_bytes": len(heartbeat_body(a.site, 10**9, a.kb, a.shape)), "shape": a.shape}))
    finally:
        up.terminate()
        try:
            up.wait(20)
        except subprocess.TimeoutExpired:
            up.kill()


if __name__ == "__main__":
    main()
