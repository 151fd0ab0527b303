"""The README's benchmark table, built from bench/results/*.json."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from bench.common import RESULTS

README = Path(__file__).resolve().parents[1] / "README.md"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def rows() -> list[tuple[str, str, str, str]]:
    out: list[tuple[str, str, str, str]] = []
    r = _load("route")
    if r:
        out.append((f"routing decision, {r['sites']} sites / {r['origins']} origins",
                    f"p50 {r['decision_p50_us']} µs, p99 {r['decision_p99_us']} µs = {r['ratio_p99_to_nats_p50']}× nats-py req/reply p50 ({r['nats_request_p50_us']} µs); index build {r['index_build_s']} s, link recompute {max(r['link_recompute_s'] or [0]):.3f} s",
                    "p99 ≤ 50 µs, ≤ 0.1×", f"{r['machine']}, {r['date']}"))
    g = _load("gateway")
    if g and g.get("generator") == "wrk":  # older results came from bench/loadgen.py, which capped the floor
        for c in (1, 32):
            f, h, q = g[f"floor_c{c}"], g[f"hub_c{c}"], g[f"ratio_c{c}"]
            out.append((f"gateway path vs its floor (wrk), {c} connection{'s' if c > 1 else ''}",
                        f"p50 {h['p50_ms']:.2f} ms vs floor {f['p50_ms']:.2f}: {q['p50']}×; {h['rps']:.0f} req/s vs floor {f['rps']:.0f}: "
                        f"{q['throughput']}× (ratios: median of {len(q.get('rounds_p50', [])) or 'the'} paired rounds)",
                        "p50 ≤ 1.25×, throughput ≥ 0.8× (architecture §10: 32 conns)" if c > 1 else "same ratios, held at 1 conn too",
                        f"{g['machine']}, {g['date']}"))
    mg = _load("gate")
    if mg:
        ip = mg.get("in_process") or {}
        out.append(("market gate on the inference path (`cpn bench gateway --market`)",
                    f"the gate alone (admit + release, in process) {ip.get('on_us', '?')} µs CPU per request on vs "
                    f"{ip.get('off_us', '?')} off; the whole path through the hub +{mg['gate_cpu_us_per_request']} µs "
                    f"hub CPU per request ({mg['on']['hub_cpu_us_per_request']} vs {mg['off']['hub_cpu_us_per_request']} µs; "
                    f"median of {len(mg['rounds_gate_cpu_us'])} paired rounds {mg['rounds_gate_cpu_us']})",
                    "small next to the request's own CPU", f"{mg['machine']}, {mg['date']}"))
    s = _load("scheduler")
    if s:
        mem = s.get("in_memory_decisions_per_s") or s.get("decisions_per_s_memory")
        sql = s.get("sqlite_decisions_per_s") or s.get("decisions_per_s_sqlite")
        rec = s.get("record_decisions_per_s")
        out.append(("placement, 10,000 queued jobs / 1,000 pools",
                    (f"{mem:,.0f} decisions/s in memory; {sql:,.0f}/s with SQLite" if mem and sql else json.dumps({k: v for k, v in s.items() if 'per_s' in k}))
                    + (f"; {rec:,.0f}/s with the replicated record (`--record`: the starts in "
                       f"{s['record']['commits']} fenced atomic batches, the waits said locally as the hub "
                       f"says them)" if rec else ""),
                    "≥ 5,000/s; SQLite ≥ 0.5×" + ("; record ≥ 2,500/s" if rec else ""), f"{s['machine']}, {s['date']}"))
    sub = _load("submissions")
    if sub and "sqlite" in sub:  # a result of the earlier shape: one client count, no blocking baseline
        sq, nr = sub["sqlite"], sub["nats"]
        out.append((f"durable submissions, {sub['concurrency']} clients (`cpn bench submissions`)",
                    f"one hub on SQLite {sq['per_s']:,.0f}/s (p50 {sq['p50_ms']} ms, p99 {sq['p99_ms']} ms); "
                    f"{sub['hubs']} hubs on the replicated record {nr['per_s']:,.0f}/s (p50 {nr['p50_ms']} ms, "
                    f"p99 {nr['p99_ms']} ms) = {sub['ratio_nats_to_sqlite']}×",
                    "≥ 0.25×, p99 ≤ 50 ms", f"{sub['machine']}, {sub['date']}"))
    elif sub:
        for level in sub["concurrency"]:
            r = sub[f"c{level}"]
            sq, nr, bl = r["sqlite"], r["nats"], r.get("nats_blocking")  # --setups may leave it out
            out.append((f"durable submissions, {level} client{'s' if level > 1 else ''} (`cpn bench submissions`, "
                        f"interleaved rounds, load {sub['load_before']}–{sub['load_after']})",
                        f"one hub on SQLite {sq['per_s']:,.0f}/s (p50 {sq['p50_ms']} ms, p99 {sq['p99_ms']} ms); "
                        f"{sub['hubs']} hubs on the replicated record {nr['per_s']:,.0f}/s (p50 {nr['p50_ms']} ms, "
                        f"p99 {nr['p99_ms']} ms) = {r['ratio_nats_to_sqlite']}×; "
                        + (f"writes one at a time per process (before) {bl['per_s']:,.0f}/s, p99 {bl['p99_ms']} ms; "
                           if bl else "")
                        + f"hub CPU per submission {sq['hub_cpu_ms_per_submission']} / {nr['hub_cpu_ms_per_submission']}"
                        + (f" / {bl['hub_cpu_ms_per_submission']}" if bl else "") + " ms"
                        + (f" (+ nats-servers {sq['nats_cpu_ms_per_submission']} / {nr['nats_cpu_ms_per_submission']} ms)"
                           if nr.get("nats_cpu_ms_per_submission") is not None else ""),
                        "≥ 0.25×, p99 ≤ 50 ms", f"{sub['machine']}, {sub['date']}"))
    tk = _load("takeover")
    if tk:
        out.append((f"takeover after the leader's SIGKILL, 3 hub processes (`cpn bench takeover`, {tk['kills']} kills)",
                    f"p50 {tk['takeover_p50_s']} s, max {tk['takeover_max_s']} s (lease {tk['lease_duration_s']:g} s"
                    + (f"; a silent holder taken over after {tk['holder_silent_s']:g} s)" if tk.get("holder_silent_s")
                       else ")"),
                    "≤ 5 s, aim ≤ 3 s", f"{tk['machine']}, {tk['date']}"))
    h = _load("heartbeat")
    if h:
        out.append((f"heartbeats, {h['sites']} sites at 1 Hz", f"{h['hub_cpu_pct']:.1f}% of one core on the hub ({h['received_per_s']:.0f} msgs/s applied)",
                    "≤ 25% of one core", f"{h['machine']}, {h['date']}"))
    ch = _load("chaos")
    if ch:
        inv = ch["invariants"]
        det = ch.get("site_loss_detection_s") or {}
        red = ch.get("redispatch_s") or {}
        inf = ch["inference"]
        out.append((f"chaos, {len(ch['faults'])} faults in {ch['seconds']:.0f} s (`cpn chaos`)",
                    f"lost {inv['accepted_then_lost']}, duplicated {inv['duplicate_side_effects']}, stale accepted {inv['stale_results_accepted']}; "
                    f"site loss detected in {det.get('median', '?')} s median (max {det.get('max', '?')}); training re-dispatched "
                    f"{red.get('median', '?')} s median after detection; inference errors {inf['in_faults']['error_rate']:.2%} of "
                    f"{inf['in_faults']['requests']:,} requests overlapping a fault{_by_fault(inf)}, "
                    f"{inf['outside']['error_rate']:.2%} of {inf['outside']['requests']:,} outside",
                    "0 / 0 / 0; detection ≤ 3 s after last heartbeat; restart ≤ 1 s; 0 errors outside faults", f"{ch['machine']}, {ch['date']}"))
    cha = _load("chaos_ha")
    if cha:
        inv = cha["invariants"]
        inf = cha["inference"]
        takeovers = ", ".join(f"{f['kind']} {f['takeover_s']}" for f in cha["faults"] if f.get("takeover_s") is not None)
        out.append((f"chaos on three hub processes, {len(cha['faults'])} faults in {cha['seconds']:.0f} s (`cpn chaos --ha`)",
                    f"lost {inv['accepted_then_lost']}, duplicated {inv['duplicate_side_effects']}, stale accepted "
                    f"{inv['stale_results_accepted']}, started twice {inv['attempts_started_twice']}; takeover (s) where the "
                    f"leader changed: {takeovers or 'none'}; inference errors {inf['in_faults']['error_rate']:.2%} of "
                    f"{inf['in_faults']['requests']:,} requests overlapping a fault, {inf['outside']['error_rate']:.2%} of "
                    f"{inf['outside']['requests']:,} outside (clients fail over to another gateway)",
                    "0 / 0 / 0 / 0; takeover ≤ 5 s; errors only where a gateway died", f"{cha['machine']}, {cha['date']}"))
    sim = _load("sim")
    if sim:
        out.append((sim.get("what", "cpn sim"), sim.get("summary", ""), "≤ 60 s", f"{sim['machine']}, {sim['date']}"))
    rg = _load("regions")
    if rg and rg.get("rows"):
        load = f", load {rg['load_before']}–{rg['load_after']}" if "load_before" in rg else ""
        out.append((f"regions, {rg['regions']} regions with the layout's WAN delays (`cpn bench regions`{load})",
                    _regions(rg), f"in-region p99 ≤ {rg['budget_ms']:g} ms (client latency − service time − the bench's own cost)",
                    f"{rg['machine']}, {rg['date']}"))
    return out


def _regions(rg: dict[str, Any]) -> str:
    """"sh: own gateway p50 2.1 / p99 3.0 ms, central 2.2 / 3.1; ..." per region over the origins with
    an in-region site within budget, errors if any; then the origins without one, apart."""
    rows = [r for r in rg["rows"] if r.get("origins", "in_budget") == "in_budget"]
    by = {(r["region"], r["mode"]): r for r in rows}
    parts = []
    for region in dict.fromkeys(r["region"] for r in rows):
        own, central = by.get((region, "regional")), by.get((region, "central"))
        text = f"{region}: own gateway " + (f"p50 {own['p50_ms']} / p99 {own['p99_ms']} ms" if own else "-")
        text += ", central " + (f"{central['p50_ms']} / {central['p99_ms']}" if central else "-")
        errors = sum(r["errors"] for r in (own, central) if r)
        parts.append(text + (f" ({errors} errors)" if errors else ""))
    far = [r for r in rg["rows"] if r.get("origins") == "outside" and r["mode"] == "regional"]
    over = {k.split("/", 1)[-1]: v for k, v in (rg.get("promise_over_budget") or {}).items()}
    if far:
        names = ", ".join(o for os in (rg.get("outside_origins") or {}).values() for o in os if o not in over)
        parts.append(f"origins with no in-region site within budget ({names}), own gateway p99 "
                     f"{min(r['p99_ms'] for r in far)}–{max(r['p99_ms'] for r in far)} ms")
    if over:
        parts.append("origins within budget by RTT + the 1 ms allowance whose measured promise (RTT + cpn's own "
                     "time, p50) was over it, counted with those outside: "
                     + ", ".join(f"{o} ({ms} ms)" for o, ms in over.items()))
    if rg.get("not_served"):
        parts.append(f"regions with no in-region site within budget: {', '.join(rg['not_served'])} "
                     "(their origins all outside)")
    beyond = [r["beyond_promise_p50_ms"] for r in rows if "beyond_promise_p50_ms" in r]
    if beyond and any("stated_overhead_p50_ms" in r for r in rows):
        was = [r["beyond_rtt_p50_ms"] for r in rows]
        parts.append(f"beyond the promise (`X-CPN-RTT-Ms` + `X-CPN-Overhead-Ms`): p50 {min(beyond)}–{max(beyond)} ms "
                     f"(beyond `X-CPN-RTT-Ms` alone: {min(was)}–{max(was)} ms)")
    elif beyond:
        parts.append(f"beyond the promised `X-CPN-RTT-Ms`: p50 {min(beyond)}–{max(beyond)} ms")
    sub = rg.get("subtracted")
    if sub:
        floor = sub.get("tenant_floor_ms")
        parts.append(f"subtracted: service time"
                     + (f", the bench's own tenant (client + proxy + loopback, measured against a server answering at "
                        f"once) {floor.get('delayed', floor.get('direct'))} ms" if floor else "")
                     + f", the proxies' own {sub['proxy_ms_per_crossing']} ms per crossing"
                     + (" on the relay" if floor else ""))
    return "; ".join(parts)


def _by_fault(inf: dict[str, Any]) -> str:
    """" (hub_kill 37.9%, every other kind 0%)": which kinds of fault the errors came from."""
    by = inf.get("by_fault") or {}
    bad = [f"{k} {v['error_rate']:.1%}" for k, v in by.items() if v["error_rate"] > 0]
    if not by or not bad:
        return ""
    rest = ", every other kind 0%" if len(bad) < len(by) else ""
    return f" ({', '.join(bad)}{rest})"


def _kind(label: str) -> str:
    """What a row measures, without its figures: "heartbeats, 5000 sites at 1 Hz" -> "heartbeats, sites at Hz"
    (nor the load it was measured under: ", load 1.2–1.7" is a figure of the run, not of the kind)."""
    label = re.sub(r", load [^)|]*", "", label)
    return " ".join(re.sub(r"[\d][\d,.]*", " ", label).split())


def _rows_in(table: str) -> list[str]:
    return [line for line in table.splitlines()[2:] if line.startswith("| ")]


def render(existing: str = "") -> str:
    """The table: a row for each result file present; rows of ``existing`` (the README's current
    table) whose kind was not re-measured are kept as they are, with their own dates."""
    fresh = [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows()]
    fresh_kinds = {_kind(line.split(" | ")[0][2:]) for line in fresh}
    kept = [line for line in _rows_in(existing) if _kind(line.split(" | ")[0][2:]) not in fresh_kinds]
    order = [_kind(line.split(" | ")[0][2:]) for line in _rows_in(existing)]
    merged = kept + fresh
    merged.sort(key=lambda line: order.index(k) if (k := _kind(line.split(" | ")[0][2:])) in order else len(order))
    return "\n".join(["| what | measured | target | machine, date |", "|---|---|---|---|", *merged])


def _section(text: str, marker: str) -> str:
    m = re.search(rf"<!-- {marker} -->\n(.*?)<!-- /{marker} -->", text, flags=re.S)
    return m.group(1) if m else ""


def render_peers(existing: str = "") -> str:
    """The peers section (``cpn bench gateway --peers``): table, verdicts, method line. The cells
    this run did not measure (``--cells``, ``--systems``) keep their values from ``existing`` (the
    README's current section), each marked with a footnote naming its run (bench/peers_keep.py)."""
    from bench import peers, peers_keep

    r = _load("gateway_peers")
    if not r:
        return "Not measured yet: `cpn bench gateway --peers --rounds 3 --seconds 10 --readme`."
    # A before/after's other checkout (``--base``) is not a system the README compares.
    r = {**r, "systems": {k: v for k, v in r["systems"].items() if k in peers.ORDER}}
    m = r["method"]
    skipped = "".join(f" {k} skipped: {v}." for k, v in r.get("skipped", {}).items())
    versions = ", ".join(f"{k} {v}" for k, v in r.get("versions", {}).items())
    cells = m.get("cells", list(peers.CELLS))
    partial = (f" This run measured only {', '.join(cells)}." if set(cells) != set(peers.CELLS) else "")
    fresh = (f"{peers.render(r)}\n\n{peers.render_verdicts(r)}\n\n"
             f"{r['machine']}, {r['date']}; {m['rounds']} interleaved round(s) of {m['seconds_per_cell']:g} s per cell, "
             f"medians (the targets: the median of each round's own ratio, cpn and "
             f"{r.get('baseline', 'vllm-router')} measured in the same round); "
             f"{versions or 'no peers installed'}, policy `{r['router_policy']}`.{skipped}{partial}")
    measured = {system: set(figures) for system, figures in r["systems"].items()}
    return peers_keep.merge(existing, fresh, measured)


def _replace(text: str, marker: str, body: str) -> str:
    return re.sub(rf"(<!-- {marker} -->\n).*?(<!-- /{marker} -->)", lambda m: m.group(1) + body + "\n" + m.group(2),
                  text, flags=re.S)


def update_readme(*, peers_only: bool = False) -> None:
    """Rewrite README's ``bench-peers`` section (if its results are present) and, unless
    ``peers_only``, the ``bench-table`` (a row for each bench/results/*.json present; rows not
    re-measured keep their figures and dates)."""
    text = README.read_text()
    if not peers_only:
        text = _replace(text, "bench-table", render(_section(text, "bench-table")))
    if _load("gateway_peers"):  # else the section keeps what was measured (another bench's --readme)
        text = _replace(text, "bench-peers", render_peers(_section(text, "bench-peers")))
    README.write_text(text)
