"""``python -m bench.siteflood``: tenants' chat latency while one site floods the hub with heartbeats.

A real ``cpn up`` (demo-3 layout, per-site NATS identities) runs as its own process, from this
tree or from ``--code DIR`` (another checkout, to compare). The load generator (``wrk``, :mod:`bench.wrk`)
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
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from bench import wrk

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = ROOT / "topology" / "data" / "demo-3.toml"


def read_banner(up: subprocess.Popen[str], deadline: float) -> tuple[str, str]:
    """The gateway's and the NATS server's URLs from ``cpn up``'s banner (it binds port 0 for both
    and prints what it got), once it is up; its stdout is then drained for as long as it runs."""
    found: dict[str, str] = {}
    done = threading.Event()

    def read() -> None:
        assert up.stdout is not None
        with up.stdout:
            for line in up.stdout:
                if "hub gateway at " in line:
                    found["http"] = line.rsplit(" ", 1)[1].strip()
                elif line.strip().startswith("NATS:"):
                    found["nats"] = line.split()[-1]
                if len(found) == 2:
                    done.set()
        done.set()  # exited

    threading.Thread(target=read, daemon=True).start()
    while not done.wait(0.2):
        if time.time() > deadline:
            raise SystemExit("cpn up did not start")
    if len(found) < 2:  # its stdout closed: it is exiting
        try:
            code = up.wait(10)
        except subprocess.TimeoutExpired:
            code = None
        raise SystemExit(f"cpn up exited (code {code}) before printing its banner")
    return found["http"], found["nats"]


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
    env = {**os.environ, "PYTHONPATH": a.code}
    up = subprocess.Popen([sys.executable, "-m", "controlplane.cli", "up", "--data-dir", str(data), "--port", "0",
                           "--nats-port", "0", "--layout", a.layout], cwd=a.code, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.time() + 180
        base, nats_url = read_banner(up, deadline)  # printed once up: the credentials are written by then
        key = json.loads((data / "demo-credentials.json").read_text())["tenant_key"]
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

        script = data / "chat.lua"
        script.write_text(wrk.lua_script(body, {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}))

        def chat() -> dict[str, float]:
            return asyncio.run(wrk.run(f"{base}/v1/chat/completions", conns=a.conns, seconds=a.seconds,
                                       script_path=str(script)))

        quiet = chat()
        flooder = subprocess.Popen([sys.executable, "-m", "bench.siteflood", "--kb", str(a.kb), "--shape", a.shape, "--flood",
                                    nats_url, a.site, creds.user, creds.password,
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
