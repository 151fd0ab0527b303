"""A small HTTP load generator run as its own process (so it does not share the server's event loop).

``python -m bench.loadgen URL --conns 32 --seconds 5 [--key K] [--body JSON]`` prints one JSON line:
requests, errors, rps, p50/p99 in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp


async def run(url: str, conns: int, seconds: float, key: str | None, body: bytes, headers: dict[str, str]) -> dict[str, float]:
    hdrs = {"Content-Type": "application/json", **headers}
    if key:
        hdrs["Authorization"] = f"Bearer {key}"
    lat: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=conns, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one() -> None:
            async with session.post(url, data=body, headers=hdrs) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(r.status)

        for _ in range(50):  # warm up
            try:
                await one()
            except Exception:
                pass
        stop_at = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                t = time.perf_counter()
                try:
                    await one()
                    lat.append(time.perf_counter() - t)
                except Exception:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conns)))
        elapsed = time.perf_counter() - started
    lat.sort()
    pick = lambda q: lat[min(len(lat) - 1, int(q * (len(lat) - 1)))] * 1000 if lat else float("nan")  # noqa: E731
    return {"requests": len(lat), "errors": errors, "rps": len(lat) / elapsed, "p50_ms": pick(0.5), "p99_ms": pick(0.99)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--conns", type=int, default=1)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--key")
    p.add_argument("--body", default="{}")
    p.add_argument("--header", action="append", default=[])
    a = p.parse_args()
    headers = dict(h.split(":", 1) for h in a.header)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(run(a.url, a.conns, a.seconds, a.key, a.body.encode(), headers))))


if __name__ == "__main__":
    main()
