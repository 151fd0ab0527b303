"""``cpn bench gateway --peers``: cpn next to the routers people would otherwise deploy, one mock behind all.

Method (README "How the gateway is measured"):

- One mock OpenAI backend, two replica processes (bench/mockopenai.py). In front of it, all up for
  the whole run: nothing (``direct``), ``vllm-router``, ``sglang-router`` (both Rust, from PyPI;
  a peer that is not installed is skipped with a line saying so) and ``cpn`` (nats-server + hub +
  one ``openai-http`` agent). See bench/systems.py.
- Cells: wrk at 32 connections and at 1 connection (non-streaming chat completions), then the
  streaming client (bench/ttfc.py) at 8 connections for time to first chunk. In every round each
  cell runs once per system, back to back, the system order rotated each round, so drift in the
  shared machine's speed hits every system alike. Figures are the median over rounds.
- CPU: user+system seconds of every process of a system (cpn: hub + agent + nats-server), read
  from /proc before and after each cell, per 1,000 answered requests (bench/cpu.py). The mock's
  and the generator's CPU are not a system's; wrk's own CPU is recorded to show it is not the limit.
- Targets (issue #18), all against vllm-router in the same run: c=32 req/s ≥ 0.5×; CPU per 1,000
  requests ≤ 3×; c=1 p50 ≤ vllm-router's + 0.5 ms; streaming TTFC p50 ≤ 2×.

:func:`aggregate` and :func:`verdicts` are pure (tested); :func:`run` does the I/O.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from bench import common, cpu, systems, wrk

ORDER = ("direct", "vllm-router", "sglang-router", "cpn")
BASELINE = "vllm-router"
BODY = '{"model":"mock","messages":[{"role":"user","content":"hi"}],"max_tokens":4}'
STREAM_BODY = '{"model":"mock","messages":[{"role":"user","content":"hi"}],"max_tokens":4,"stream":true}'
TARGETS = {"rps_c32_ratio_min": 0.5, "cpu_per_1000_ratio_max": 3.0, "p50_c1_extra_ms_max": 0.5, "ttfc_ratio_max": 2.0}


def _median(xs: list[float]) -> float:
    ys = sorted(x for x in xs if x == x)  # drop NaN
    return ys[len(ys) // 2] if ys else float("nan")


def aggregate(cells: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per system, the median over rounds of each cell's figures (pure).

    ``cells`` are the raw records: ``{"system", "cell": "c32"|"c1"|"ttfc8", "round", ...figures,
    "cpu_s": {process: seconds}}``."""
    out: dict[str, dict[str, Any]] = {}
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in cells:
        by.setdefault((c["system"], c["cell"]), []).append(c)
    for (system, cell), rs in by.items():
        s = out.setdefault(system, {})
        fig: dict[str, Any] = {"rounds": len(rs), "errors": sum(int(r["errors"]) for r in rs)}
        for key in ("rps", "p50_ms", "p99_ms", "ttfc_p50_ms", "ttfc_p99_ms", "generator_cores"):
            if key in rs[0]:
                fig[key] = round(_median([r[key] for r in rs]), 6)
        procs = sorted({p for r in rs for p in r["cpu_s"]})
        if procs:
            fig["cpu_per_1000_by_process"] = {
                p: round(_median([cpu.per_1000(r["cpu_s"].get(p, 0.0), r["requests"]) for r in rs]), 6) for p in procs}
            fig["cpu_per_1000"] = round(_median([cpu.per_1000(sum(r["cpu_s"].values()), r["requests"]) for r in rs]), 6)
        fig["rounds_rps"] = [round(r["rps"]) for r in rs]
        s[cell] = fig
    return out


def _per_round(cells: list[dict[str, Any]], system: str, baseline: str, cell: str,
               figure: Callable[[dict[str, Any], dict[str, Any]], float]) -> list[float]:
    """``figure(system's cell, baseline's cell)`` for every round in which both ran this cell
    (pure): the two were measured minutes apart at most, under the same load."""
    by: dict[tuple[str, int], dict[str, Any]] = {(c["system"], c["round"]): c for c in cells if c["cell"] == cell}
    rounds = sorted({r for (name, r) in by if name == system} & {r for (name, r) in by if name == baseline})
    return [figure(by[(system, r)], by[(baseline, r)]) for r in rounds]


def _cpu_1000(c: dict[str, Any]) -> float:
    return cpu.per_1000(sum(c["cpu_s"].values()), c["requests"]) if c["cpu_s"] else float("nan")


def verdicts(agg: dict[str, dict[str, Any]], system: str = "cpn", baseline: str = BASELINE,
             cells: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """``system`` against ``baseline`` on issue #18's four targets (pure); ``{}`` when either is missing.

    With the raw ``cells``, each figure is the median over rounds of that round's own ratio (or
    difference): within a round the two systems ran the same cell within a minute, so a change in the
    shared machine's speed between rounds cancels out; each round's value is kept (``rounds``),
    and so is the ratio of the medians (``of_medians``). Without ``cells``: the ratio of the medians."""
    if system not in agg or baseline not in agg:
        return {}
    s, b = agg[system], agg[baseline]
    out: dict[str, Any] = {}

    def entry(key: str, of_medians: float, cell: str, figure: Callable[[dict[str, Any], dict[str, Any]], float],
              target: str, ok: Callable[[float], bool]) -> None:
        rounds = _per_round(cells, system, baseline, cell, figure) if cells else []
        value = _median(rounds) if rounds else of_medians
        out[key] = {"value": round(value, 3), "target": target, "ok": ok(value), "of_medians": round(of_medians, 3)}
        if rounds:
            out[key]["rounds"] = [round(x, 3) for x in rounds]

    if "c32" in s and "c32" in b:
        entry("rps_c32_ratio", s["c32"]["rps"] / b["c32"]["rps"], "c32", lambda x, y: x["rps"] / y["rps"],
              f"≥ {TARGETS['rps_c32_ratio_min']}", lambda v: v >= TARGETS["rps_c32_ratio_min"])
        if "cpu_per_1000" in s["c32"] and "cpu_per_1000" in b["c32"]:
            entry("cpu_per_1000_ratio", s["c32"]["cpu_per_1000"] / b["c32"]["cpu_per_1000"], "c32",
                  lambda x, y: _cpu_1000(x) / _cpu_1000(y),
                  f"≤ {TARGETS['cpu_per_1000_ratio_max']}", lambda v: v <= TARGETS["cpu_per_1000_ratio_max"])
    if "c1" in s and "c1" in b:
        entry("p50_c1_extra_ms", s["c1"]["p50_ms"] - b["c1"]["p50_ms"], "c1", lambda x, y: x["p50_ms"] - y["p50_ms"],
              f"≤ {TARGETS['p50_c1_extra_ms_max']} ms", lambda v: v <= TARGETS["p50_c1_extra_ms_max"])
    if "ttfc8" in s and "ttfc8" in b:
        entry("ttfc_ratio", s["ttfc8"]["ttfc_p50_ms"] / b["ttfc8"]["ttfc_p50_ms"], "ttfc8",
              lambda x, y: x["ttfc_p50_ms"] / y["ttfc_p50_ms"],
              f"≤ {TARGETS['ttfc_ratio_max']}", lambda v: v <= TARGETS["ttfc_ratio_max"])
    return out


async def _ttfc(url: str, conns: int, seconds: float, headers: dict[str, str], body: str = STREAM_BODY) -> dict[str, float]:
    args = [sys.executable, "-m", "bench.ttfc", url, "--conns", str(conns), "--seconds", str(seconds), "--body", body]
    for k, v in headers.items():
        args += ["--header", f"{k}: {v}"]
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"bench.ttfc exited {proc.returncode}")
    return json.loads(out.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


async def measure(system: systems.System, cell: str, seconds: float, scripts: dict[str, str]) -> dict[str, Any]:
    """One cell against one system: the load, and the CPU its processes used meanwhile."""
    before = cpu.sample(system.pids)
    if cell in ("ttfc8", "c8"):
        # This cell's CPU also covers the client's start-up and 160 warm-up streams (not counted as
        # requests): a few per cent high for every system alike. The headline CPU figure is c=32's.
        # c8: plain answers through the same client at the same concurrency, the streams' reference.
        res: dict[str, Any] = dict(await _ttfc(system.url, 8, seconds, system.headers,
                                               STREAM_BODY if cell == "ttfc8" else BODY))
    else:
        conns = 32 if cell == "c32" else 1
        res = dict(await wrk.run(system.url, conns=conns, seconds=seconds, script_path=scripts[system.name]))
        res["generator_cores"] = res["generator_cpu_s"] / res["seconds"] if res["seconds"] else float("nan")
    after = cpu.sample(system.pids)
    res["cpu_s"] = {name: cpu.seconds_used(before[name], after[name]) for name in system.pids}
    return res


def _starters(m: systems.Mock, tmp: Path, policy: str, base: Path | None) -> dict[str, Callable[[], Any]]:
    return {
        "direct": lambda: systems.direct(m),
        "vllm-router": lambda: systems.router("vllm-router", m, tmp, policy),
        "sglang-router": lambda: systems.router("sglang-router", m, tmp, policy),
        "cpn": lambda: systems.cpn(m, tmp / "cpn"),
        BASE: lambda: systems.cpn(m, tmp / BASE, name=BASE, src=base),
    }


CELLS = ("c32", "c1", "ttfc8")
EXTRA_CELLS = ("c8",)
"""Run only when named (``--cells``): plain answers at 8 connections through the streaming client,
next to ``ttfc8``: what a stream costs over a plain request at the same concurrency."""
BASE = "cpn-base"
"""``--base DIR``: cpn from the source in DIR, beside this one in the same rounds (a before/after)."""


async def run(*, seconds: float, rounds: int, names: list[str], policy: str = "round_robin",
              cells_run: tuple[str, ...] = CELLS, base: Path | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Start the mock and every system, run the interleaved cells, return the results dict."""
    wrk.binary()  # fail before starting anything
    cells: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="cpn-peers-") as tmp_s:
        tmp = Path(tmp_s)
        (tmp / "cpn").mkdir()
        (tmp / BASE).mkdir()
        async with AsyncExitStack() as stack:
            m = await stack.enter_async_context(systems.mock())
            starters = _starters(m, tmp, policy, base)
            up: list[systems.System] = []
            for name in names:
                try:
                    up.append(await stack.enter_async_context(starters[name]()))
                    log(f"  {name}: up")
                except systems.Unavailable as exc:
                    skipped[name] = str(exc)
                    log(f"  {name}: skipped ({exc})")
            scripts = {}
            for s in up:
                path = tmp / f"{s.name}.lua"
                path.write_text(wrk.lua_script(BODY, {"Content-Type": "application/json", **s.headers}))
                scripts[s.name] = str(path)
            for rnd in range(rounds):
                order = up[rnd % len(up):] + up[: rnd % len(up)] if up else []
                for cell in cells_run:
                    for s in order:
                        res = await measure(s, cell, seconds, scripts)
                        cells.append({"system": s.name, "cell": cell, "round": rnd, **res})
                        log(f"  round {rnd + 1}/{rounds} {cell:5} {s.name:13} " + _line(res))
    agg = aggregate(cells)
    return {
        "systems": agg, "verdicts": verdicts(agg, cells=cells), "skipped": skipped, "cells": cells,
        "targets": TARGETS, "baseline": BASELINE, "router_policy": policy, "versions": versions(),
        **({"base_src": str(base)} if base is not None else {}),
        "method": {"seconds_per_cell": seconds, "rounds": rounds, "cells": list(cells_run), "generator": "wrk (c=32: 2 threads, c=1: 1)",
                   "ttfc_generator": "bench/ttfc.py (Python raw-socket client, 8 connections)",
                   "mock": "bench/mockopenai.py, 2 replicas (SO_REUSEPORT shared port for direct and cpn)",
                   "cpn": "nats-server + cpn hub + one cpn agent (openai-http)"},
    }


def _line(res: dict[str, Any]) -> str:
    if "ttfc_p50_ms" in res:
        head = f"ttfc p50 {res['ttfc_p50_ms']:.2f} ms p99 {res['ttfc_p99_ms']:.2f}, {res['rps']:.0f} streams/s"
    else:
        head = f"{res['rps']:.0f} req/s p50 {res['p50_ms']:.3f} ms p99 {res['p99_ms']:.2f} ms, wrk {res['generator_cores']:.2f} cores"
    cpu_s = sum(res["cpu_s"].values())
    tail = f", CPU {cpu.per_1000(cpu_s, res['requests']):.3f} s/1k" if res["cpu_s"] else ""
    return head + tail + (f", errors {res['errors']}" if res["errors"] else "")


def render(res: dict[str, Any]) -> str:
    """The peers table as Markdown (README and terminal)."""
    agg = res["systems"]
    direct_rps = agg.get("direct", {}).get("c32", {}).get("rps")
    lines = ["| system | c=32 req/s | c=32 p50 / p99 ms | CPU-s per 1,000 req (c=32) | c=1 p50 / p99 ms | stream c=8 TTFC p50 / p99 ms |",
             "|---|---|---|---|---|---|"]
    for name in [*ORDER, *(n for n in agg if n not in ORDER)]:
        if name not in agg:
            continue
        a = agg[name]
        c32, c1, t = a.get("c32", {}), a.get("c1", {}), a.get("ttfc8", {})
        share = f" ({c32['rps'] / direct_rps:.2f}× direct)" if direct_rps and name != "direct" and c32 else ""
        cpu_txt = "—"
        if "cpu_per_1000" in c32:
            parts = c32["cpu_per_1000_by_process"]
            cpu_txt = f"{c32['cpu_per_1000']:.3f}" + (" (" + ", ".join(f"{p} {v:.3f}" for p, v in parts.items()) + ")" if len(parts) > 1 else "")
        err = sum(a[c].get("errors", 0) for c in a)
        lines.append(f"| {name}{f' ({err} errors)' if err else ''} | "
                     + (f"{c32['rps']:,.0f}{share}" if c32 else "—") + " | "
                     + _pair(c32, "p50_ms", "p99_ms", 2) + f" | {cpu_txt} | " + _pair(c1, "p50_ms", "p99_ms", 3) + " | "
                     + _pair(t, "ttfc_p50_ms", "ttfc_p99_ms", 2) + " |")
    return "\n".join(lines)


def _pair(fig: dict[str, Any], a: str, b: str, digits: int) -> str:
    return f"{fig[a]:.{digits}f} / {fig[b]:.{digits}f}" if a in fig and b in fig else "—"


VERDICT_NAMES = {"rps_c32_ratio": ("c=32 req/s", "×"), "cpu_per_1000_ratio": ("CPU-s per 1,000 requests (c=32)", "×"),
                 "p50_c1_extra_ms": ("c=1 p50, extra over vllm-router", " ms"), "ttfc_ratio": ("streaming TTFC p50 (c=8)", "×")}


def render_verdicts(res: dict[str, Any]) -> str:
    """The four targets as a Markdown table, in a fixed order."""
    v = res.get("verdicts") or {}
    baseline = res.get("baseline", BASELINE)
    if not v:
        return f"cpn vs {baseline}: not both measured in this run, so no verdicts."
    paired = any("rounds" in x for x in v.values())
    measured = "measured (median of the rounds' own)" if paired else "measured"
    lines = [f"| cpn vs {baseline}, same run | {measured} | each round | target | |", "|---|---|---|---|---|"]
    for key, (label, unit) in VERDICT_NAMES.items():
        if key in v:
            x = v[key]
            each = ", ".join(f"{r:g}" for r in x.get("rounds", [])) or "—"
            lines.append(f"| {label} | {x['value']:g}{unit} | {each} | {x['target']}{'' if unit == ' ms' else '×'} | "
                         f"{'met' if x['ok'] else '**not met**'} |")
    return "\n".join(lines)


def versions() -> dict[str, str]:
    """Installed versions of the peers (``{}`` entries skipped when not installed)."""
    from importlib import metadata

    out = {}
    for dist in ("vllm-router", "sglang-router"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cpn bench gateway --peers")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds per cell (wrk takes whole seconds)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--systems", default=",".join(ORDER), help=f"comma-separated subset of {','.join(ORDER)}")
    p.add_argument("--cells", default=",".join(CELLS),
                   help=f"comma-separated subset of {','.join(CELLS)} (c32 alone: throughput in more rounds; ttfc8 alone: time to "
                        "first chunk only), and c8: plain answers through the streaming client at 8 connections")
    p.add_argument("--router-policy", default="round_robin", help="policy given to both routers")
    p.add_argument("--out", default="gateway_peers", help="results name (bench/results/NAME.json)")
    p.add_argument("--base", metavar="DIR", help=f"also run cpn from the source in DIR (e.g. `git archive main`, unpacked) "
                   f"as system {BASE}, in the same rounds: a same-run before/after")
    args = p.parse_args(argv)
    names = [n for n in args.systems.split(",") if n]
    if args.base:
        names.append(BASE)
    unknown = set(names) - set(ORDER) - ({BASE} if args.base else set())
    if unknown:
        print(f"cpn bench gateway --peers: unknown system(s) {', '.join(sorted(unknown))}; choose from {', '.join(ORDER)}")
        return 2
    cells_run = tuple(c for c in (*CELLS, *EXTRA_CELLS) if c in args.cells.split(","))
    bad_cells = set(args.cells.split(",")) - set(CELLS) - set(EXTRA_CELLS)
    if bad_cells or not cells_run:
        print(f"cpn bench gateway --peers: unknown cell(s) {', '.join(sorted(bad_cells)) or '(none given)'}; "
              f"choose from {', '.join((*CELLS, *EXTRA_CELLS))}")
        return 2
    try:
        wrk.binary()
    except wrk.WrkMissing as exc:
        print(f"cpn bench gateway --peers: {exc}")
        return 2
    print(f"peers: {', '.join(names)}; {args.rounds} round(s) x {len(cells_run)} cell(s) x {args.seconds:g} s")
    res = asyncio.run(run(seconds=args.seconds, rounds=args.rounds, names=names, policy=args.router_policy,
                          cells_run=cells_run, base=Path(args.base).resolve() if args.base else None))
    print(render(res))
    print(render_verdicts(res))
    print(f"  wrote {common.write(args.out, res)}")
    return 0
