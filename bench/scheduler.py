"""``cpn bench scheduler``: training placement decisions per second, in memory and persisted.

Builds a synthetic network (default 1,000 pools, four accelerator types, 31 regional time-of-use
tariffs) and queue (default 10,000 jobs over 50 tenants, mixed sizes, priorities, deadlines,
region and TEE constraints), deterministic for a seed. Then:

1. in memory: ``scheduler.plan(snapshot, now)`` over the whole queue, repeated; a *decision* is one
   queued job answered (start, wait or infeasible), so decisions/s = queued jobs / plan time;
2. with SQLite: the same plan, then every decision persisted through ``store/jobs.py`` to a temp
   file (WAL + ``synchronous=FULL``), as the hub's tick does: each start as ``lifecycle.place`` +
   the job row + its placement explanation + its attempt row, committed as **one transaction**
   (one fsync per plan tick); each wait/infeasible as the job's reason, said as derived state in
   one local transaction that is not fsynced (``store.db.derived``). Figures for one commit per
   decision are measured on a slice for comparison.

3. with ``--record``: the same plan persisted to a SQLite projection of the replicated record
   (``record = "nats"``, a fresh 3-node loopback nats-server cluster, R3, ``sync_interval:
   always``), as the leading controller does: the starts in transactions of ``TICK_CHUNK``
   decisions (the record takes at most 1,000 rows in one atomic batch), each one fenced atomic
   batch awaited from a quorum before its local commit; the waits said locally as in 2 (never a
   write of the record; the hub also sends them to the other hub processes in one message per
   2,000 on core NATS, which this bench leaves out).

Targets (architecture §10): >= 5,000 decisions/s in memory, and >= 0.5x that with SQLite; with
the record >= 2,500 decisions/s (issue #13).
Prints a table and writes JSON to ``bench/results/scheduler.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common
from controlplane.core import jobspec, lifecycle, placement, scheduler
from controlplane.store import db as dbmod
from controlplane.store import jobs as jobstore
from topology import layout

NOW = 1_767_232_800.0  # 2026-01-01 10:00 China local time (a peak hour)

# name -> (kW per card, units vs A800): illustrative board powers and relative compute
ACCELERATORS = {"A800": (0.40, 1.0), "H20": (0.40, 0.9), "910B": (0.35, 0.8), "MLU590": (0.35, 0.6)}
PEAK_HOURS = [8, 9, 10, 11, 18, 19, 20]
VALLEY_HOURS = [0, 1, 2, 3, 4, 5, 6, 7]


def build(n_pools: int, n_jobs: int, seed: int) -> tuple[list[placement.Pool], list[placement.JobSpec], dict[str, scheduler.Tenant]]:
    """The synthetic network and queue (same seed, same data)."""
    rng = random.Random(seed)
    regions = [f"r{i:02d}" for i in range(31)]
    tariffs = {}
    for r in regions:
        flat = round(rng.uniform(0.35, 0.8), 3)
        tariffs[r] = layout.Tariff(flat_cny_per_kwh=flat, peak_cny_per_kwh=round(flat * 1.6, 3),
                                   valley_cny_per_kwh=round(flat * 0.4, 3), peak_hours=PEAK_HOURS,
                                   valley_hours=VALLEY_HOURS, source="synthetic")
    pools = []
    for i in range(n_pools):
        region = rng.choice(regions)
        accs = rng.sample(sorted(ACCELERATORS), rng.choice([1, 1, 2]))
        total = {a: rng.choice([64, 128, 256, 512, 1024, 2048]) for a in accs}
        pools.append(placement.Pool(
            id=f"p{i:04d}", region=region, provider=rng.choice(["cpn-operator", "tp-a", "tp-b"]),
            tee=rng.random() < 0.2, healthy=rng.random() > 0.02, draining=rng.random() < 0.02,
            cards_total=total, cards_free={a: int(n * rng.uniform(0.0, 1.0)) for a, n in total.items()},
            kw_per_card={a: ACCELERATORS[a][0] for a in accs}, units={a: ACCELERATORS[a][1] for a in accs},
            tariff=tariffs[region], pue=round(rng.uniform(1.1, 1.5), 2),
            failure_rate_per_card_hour=rng.uniform(1e-5, 2e-4), restart_s=rng.uniform(60, 900),
            egress_gbps=rng.choice([10.0, 40.0, 100.0]),
        ))
    jobs = []
    for i in range(n_jobs):
        est = rng.choice([1.0, 4.0, 12.0, 48.0, 200.0])
        jobs.append(placement.JobSpec(
            id=f"j{i:05d}", tenant=f"t{rng.randrange(50):02d}",
            cards=rng.choice([1, 2, 4, 8, 8, 16, 16, 32, 64, 128, 256]),
            accelerators=tuple(rng.sample(sorted(ACCELERATORS), rng.choice([1, 2]))), est_hours=est,
            checkpoint_cost_s=rng.choice([60.0, 300.0, 900.0]), priority=rng.choice([0, 0, 0, 1, 2]),
            deadline=NOW + est * 3600 * rng.uniform(1.5, 4.0) if rng.random() < 0.3 else None,
            regions=tuple(rng.sample(regions, 5)) if rng.random() < 0.2 else (),
            tee=rng.random() < 0.05, submitted_at=NOW - rng.uniform(0, 86400),
        ))
    tenants = {f"t{i:02d}": scheduler.Tenant(id=f"t{i:02d}", quota_cards=rng.choice([None, 4096, 8192]),
                                             share=rng.choice([1.0, 1.0, 2.0])) for i in range(50)}
    return pools, jobs, tenants


def _placed(rec: lifecycle.JobRecord, s: scheduler.Placement, now: float) -> jobstore.Placed:
    """The placement explanation the hub stores with a start."""
    return jobstore.Placed(attempt=rec.attempt, pool=s.pool, accelerator=s.accelerator, decided_at=now,
                           start_at=s.start_at, breakdown=s.breakdown, explanation=s.explanation)


def _persist(db: Any, plan: scheduler.Plan, records: dict[str, lifecycle.JobRecord], now: float) -> None:
    placed = []
    for s in plan.start:
        rec = lifecycle.place(records[s.job_id], s.pool, s.accelerator, now)
        records[s.job_id] = rec
        placed.append((rec, _placed(rec, s, now)))
    waits = [(w.job_id, w.reason) for w in plan.wait]
    waits += [(i.job_id, "infeasible: " + "; ".join(i.reasons)) for i in plan.infeasible]
    with dbmod.transaction(db):  # one commit for the whole tick's placements
        jobstore.record_placements(db, placed, now)
    _say_waits(db, waits)


def _say_waits(db: Any, waits: list[tuple[str, str]]) -> None:
    """The tick's waits as the hub says them: derived state, in one local transaction that is
    neither fsynced nor a write of the replicated record (``store.db.derived``); every bench job
    is queued and was never placed (attempt 0)."""
    with dbmod.derived(db):
        jobstore.apply_waits(db, [(job_id, 0, reason) for job_id, reason in waits])


def _stored(j: placement.JobSpec) -> jobspec.JobSpec:
    """The spec the API would have stored for a bench job."""
    return jobspec.JobSpec(cards=j.cards, accelerators=j.accelerators, est_hours=j.est_hours,
                           checkpoint_cost_s=j.checkpoint_cost_s, priority=j.priority, deadline=j.deadline,
                           regions=j.regions, tee=j.tee)


def _sqlite_once(snap: scheduler.Snapshot, queued: list[placement.JobSpec], per_commit_slice: int,
                 *, first: bool) -> dict[str, Any]:
    """One plan tick persisted to a fresh SQLite file (WAL + FULL); timings in seconds."""
    with tempfile.TemporaryDirectory(prefix="cpn-bench-") as tmp:
        db = dbmod.open_db(Path(tmp) / "bench.db")
        try:
            # Set-up: the queue as the API would have stored it. One commit per job (the API path)
            # for a slice, the rest batched (set-up time is not what this bench measures).
            n_each = per_commit_slice if first else 0
            t0 = time.perf_counter()
            for j in queued[:n_each]:
                jobstore.create_job(db, j.tenant, _stored(j), f"k-{j.id}", j.id, NOW, job_id=j.id)
            submit_s = time.perf_counter() - t0
            with dbmod.transaction(db):
                for j in queued[n_each:]:
                    jobstore.create_job(db, j.tenant, _stored(j), f"k-{j.id}", j.id, NOW, job_id=j.id)
            records = {j.id: lifecycle.JobRecord(id=j.id, tenant=j.tenant, cards=j.cards) for j in queued}

            t0 = time.perf_counter()
            tick = scheduler.plan(snap, NOW)
            t1 = time.perf_counter()
            c1 = time.process_time()
            _persist(db, tick, records, NOW)
            t2 = time.perf_counter()
            persist_cpu_s = time.process_time() - c1

            # For comparison (first run only): one commit per decision, on a slice of the starts.
            sl = tick.start[:per_commit_slice] if first else []
            t3 = time.perf_counter()
            for s in sl:
                rec = lifecycle.dispatched(records[s.job_id], NOW)  # placed by the tick above
                rec = lifecycle.infra_failure(rec, NOW, "bench").record  # back to restarting ...
                rec = lifecycle.place(rec, s.pool, s.accelerator, NOW)   # ... and placed again: attempt 2
                jobstore.record_placements(db, [(rec, _placed(rec, s, NOW))], NOW)
            t4 = time.perf_counter()
            n_rows = db.conn.execute("SELECT COUNT(*) FROM attempts").fetchone()[0]
            n_reasons = db.conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND reason != ''").fetchone()[0]
        finally:
            db.conn.close()
    return {
        "plan_s": t1 - t0,
        "persist_s": t2 - t1,
        "persist_cpu_s": persist_cpu_s,
        "decisions": tick.decisions,
        "decisions_per_s": tick.decisions / (t2 - t0),
        "commits": 1,
        "per_decision_commit_per_s": len(sl) / (t4 - t3) if sl else None,
        "create_job_one_commit_each_per_s": n_each / submit_s if n_each else None,
        "attempt_rows": n_rows,
        "reasons": n_reasons,
    }


def record_once(snap: scheduler.Snapshot, queued: list[placement.JobSpec]) -> dict[str, Any]:
    """One plan tick persisted through the replicated record (see the module's point 3)."""
    import asyncio

    from controlplane.replicated import kv
    from controlplane.replicated.bridge import RecordBridge
    from controlplane.services.training import TICK_CHUNK
    from controlplane.store import replica
    if str(Path(__file__).resolve().parents[1]) not in sys.path:  # `cpn bench` runs from the installed script
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.support.natscluster import NatsCluster

    async def go() -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="cpn-bench-") as tmp:
            async with NatsCluster(Path(tmp) / "nats") as cluster:
                bridge = RecordBridge(cluster.urls, name="bench-scheduler")
                db = await replica.open_replicated(str(Path(tmp) / "projection.db"), bridge, "bench")
                try:
                    record = await kv.Record.open(cluster.urls)
                    try:  # lead as the controller does: every commit fenced by an epoch
                        epoch = await record.create(kv.FENCE_PREFIX + "bench", b"1")
                    finally:
                        await record.close()
                    bridge.fence = kv.Fence(name="bench", epoch=epoch)
                    per = kv.MAX_BATCH - 1
                    for i in range(0, len(queued), per):  # set-up, not measured
                        with dbmod.transaction(db):
                            for j in queued[i:i + per]:
                                jobstore.create_job(db, j.tenant, _stored(j), None, j.id, NOW, job_id=j.id)
                    records = {j.id: lifecycle.JobRecord(id=j.id, tenant=j.tenant, cards=j.cards) for j in queued}
                    published0 = db.write_hook.published if db.write_hook else 0
                    t0 = time.perf_counter()
                    await dbmod.barrier(db)  # the tick's read barrier, as the hub's tick loop takes it
                    tick = scheduler.plan(snap, NOW)
                    t1 = time.perf_counter()
                    placed = []
                    for st in tick.start:
                        rec = lifecycle.place(records[st.job_id], st.pool, st.accelerator, NOW)
                        placed.append((rec, _placed(rec, st, NOW)))
                    waits = [(w.job_id, w.reason) for w in tick.wait]
                    waits += [(i.job_id, "infeasible: " + "; ".join(i.reasons)) for i in tick.infeasible]
                    commits = 0
                    c1 = time.process_time()
                    for i in range(0, max(len(placed), 1), TICK_CHUNK):
                        with dbmod.transaction(db):
                            jobstore.record_placements(db, placed[i:i + TICK_CHUNK], NOW)
                        commits += 1
                    _say_waits(db, waits)
                    t2 = time.perf_counter()
                    persist_cpu_s = time.process_time() - c1
                    rows = (db.write_hook.published if db.write_hook else 0) - published0
                    n_attempts = db.conn.execute("SELECT COUNT(*) FROM attempts").fetchone()[0]
                finally:
                    dbmod.close(db)
        return {"plan_s": t1 - t0, "persist_s": t2 - t1, "decisions": tick.decisions,
                "decisions_per_s": tick.decisions / (t2 - t0), "commits": commits, "rows_published": rows,
                "attempt_rows": n_attempts, "fenced": True, "persist_cpu_s": persist_cpu_s,
                "nats_cpu_s_note": "persist_cpu_s: this process (bench + record thread), not the nats-servers"}

    return asyncio.run(go())


def run(n_pools: int = 1000, n_jobs: int = 10_000, seed: int = 0, repeat: int = 3,
        per_commit_slice: int = 500, compare_uncapped: bool = True, record: bool = False) -> dict[str, Any]:
    pools, queued, tenants = build(n_pools, n_jobs, seed)
    snap = scheduler.Snapshot(pools=pools, queued=queued, tenants=tenants)

    mem_s = []
    plan = scheduler.Plan()
    for _ in range(repeat):
        t0 = time.perf_counter()
        plan = scheduler.plan(snap, NOW)
        mem_s.append(time.perf_counter() - t0)
    decisions = plan.decisions
    mem_best = min(mem_s)

    runs = [_sqlite_once(snap, queued, per_commit_slice, first=(i == 0)) for i in range(repeat)]
    sql = min(runs, key=lambda r: r["plan_s"] + r["persist_s"])  # best of, as in memory
    sql = {**sql, "runs_s": [r["plan_s"] + r["persist_s"] for r in runs],
           # measured on the first run only
           "per_decision_commit_per_s": runs[0]["per_decision_commit_per_s"],
           "create_job_one_commit_each_per_s": runs[0]["create_job_one_commit_each_per_s"],
           "attempt_rows": runs[0]["attempt_rows"]}

    rec = record_once(snap, queued) if record else None

    quality: dict[str, Any] = {}
    if compare_uncapped:
        # How much the score cap costs: the same plan estimating every pool that passes the filters.
        full_snap = scheduler.Snapshot(pools=pools, queued=queued, tenants=tenants,
                                       policy=scheduler.Policy(score_cap=10**9))
        t0 = time.perf_counter()
        full = scheduler.plan(full_snap, NOW)
        full_s = time.perf_counter() - t0
        capped_mean = sum(s.breakdown.total_cny for s in plan.start) / max(1, len(plan.start))
        full_mean = sum(s.breakdown.total_cny for s in full.start) / max(1, len(full.start))
        quality = {
            "uncapped_plan_s": full_s,
            "uncapped_decisions_per_s": full.decisions / full_s,
            "capped_mean_cny_per_start": capped_mean,
            "uncapped_mean_cny_per_start": full_mean,
            "capped_over_uncapped": capped_mean / full_mean if full_mean else None,
            "capped_starts": len(plan.start),
            "uncapped_starts": len(full.start),
        }

    mem = {
        "plan_s_runs": mem_s,
        "plan_s_best": mem_best,
        "plan_s_median": statistics.median(mem_s),
        "decisions": decisions,
        "starts": len(plan.start),
        "waits": len(plan.wait),
        "infeasible": len(plan.infeasible),
        "decisions_per_s": decisions / mem_best,
        "starts_per_s": len(plan.start) / mem_best,
    }
    extra: dict[str, Any] = {}
    if rec is not None:
        extra = {"record_decisions_per_s": round(rec["decisions_per_s"]), "record": rec}
    return {
        **extra,
        # the two headline figures, at the top level for bench/table.py (README table)
        "in_memory_decisions_per_s": round(mem["decisions_per_s"]),
        "sqlite_decisions_per_s": round(sql["decisions_per_s"]),
        "sqlite_ratio": round(sql["decisions_per_s"] / mem["decisions_per_s"], 2),
        "params": {"pools": n_pools, "jobs": n_jobs, "seed": seed, "repeat": repeat,
                   "score_cap": scheduler.DEFAULT_POLICY.score_cap},
        "memory": mem,
        "sqlite": sql,
        "quality": quality,
        "targets": {"memory_decisions_per_s": 5000, "sqlite_ratio": 0.5},
        "pass": {
            "memory": mem["decisions_per_s"] >= 5000,
            "sqlite": sql["decisions_per_s"] >= 0.5 * mem["decisions_per_s"],
        },
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print a table; write JSON. Exit 0 when both targets are met, 1 if not."""
    ap = argparse.ArgumentParser(prog="cpn bench scheduler", description=__doc__.splitlines()[0])
    ap.add_argument("--pools", type=int, default=1000)
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-quality", action="store_true", help="skip the uncapped comparison run")
    ap.add_argument("--record", action="store_true",
                    help="also persist the tick through the replicated record (a 3-node nats-server cluster)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/scheduler.json)")
    args = ap.parse_args(argv)
    if args.pools < 1 or args.jobs < 1 or args.repeat < 1:
        print("cpn bench scheduler: --pools, --jobs and --repeat must be >= 1", file=sys.stderr)
        return 2
    res = run(args.pools, args.jobs, args.seed, args.repeat, per_commit_slice=min(500, args.jobs),
              compare_uncapped=not args.no_quality, record=args.record)
    mem, sql = res["memory"], res["sqlite"]
    rows = [
        ("in memory: plan", f"{mem['plan_s_best'] * 1000:.0f} ms", f"{mem['decisions_per_s']:,.0f} decisions/s",
         f"{mem['starts']} start, {mem['waits']} wait, {mem['infeasible']} infeasible"),
        ("SQLite: plan + persist", f"{(sql['plan_s'] + sql['persist_s']) * 1000:.0f} ms",
         f"{sql['decisions_per_s']:,.0f} decisions/s",
         f"{sql['decisions_per_s'] / mem['decisions_per_s']:.2f}x memory; one commit per tick"),
        ("SQLite: one commit per start", "", f"{sql['per_decision_commit_per_s'] or 0:,.0f} decisions/s", "for comparison"),
        ("create_job, one commit each", "", f"{sql['create_job_one_commit_each_per_s'] or 0:,.0f} jobs/s", "API path"),
    ]
    print(f"scheduler: {res['params']['jobs']:,} queued jobs over {res['params']['pools']:,} pools, "
          f"score cap {res['params']['score_cap']} ({common.machine()})")
    q = res["quality"]
    if q:
        rows.append(("in memory, no score cap", f"{q['uncapped_plan_s'] * 1000:.0f} ms",
                     f"{q['uncapped_decisions_per_s']:,.0f} decisions/s",
                     f"mean cost per start: capped {q['capped_over_uncapped']:.3f}x uncapped"))
    if "record" in res:
        rc = res["record"]
        rows.append(("record: plan + persist", f"{(rc['plan_s'] + rc['persist_s']) * 1000:.0f} ms",
                     f"{rc['decisions_per_s']:,.0f} decisions/s",
                     f"{rc['commits']} fenced atomic batches, {rc['rows_published']} rows; target >= 2,500/s"))
    for r in rows:
        print(f"  {r[0]:<30} {r[1]:>8}  {r[2]:>22}  {r[3]}")
    ok = res["pass"]["memory"] and res["pass"]["sqlite"]
    print(f"  targets: >= 5,000/s in memory {'met' if res['pass']['memory'] else 'MISSED'}; "
          f"SQLite >= 0.5x {'met' if res['pass']['sqlite'] else 'MISSED'}")
    if args.out is None:
        path = common.write("scheduler", res)
    else:
        path = args.out
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"bench": "scheduler", "machine": common.machine(),
                                    "date": time.strftime("%Y-%m-%d"), **res}, indent=2, sort_keys=True) + "\n")
    print(f"  wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
