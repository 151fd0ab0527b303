"""Aggregates of the record for metrics and operator views: counts only, read in one short query each.

Promise: read-only; every query uses an index (``jobs_state``) or scans a table an operator keeps
small (deployments, replicas), so a Prometheus scrape every 15 s costs milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

JOB_STATES = ("queued", "placed", "starting", "running", "restarting", "succeeded", "failed", "cancelled")
DEPLOYMENT_STATES = ("pending", "ready", "degraded")
REPLICA_STATES = ("placed", "loading", "ready", "lost")


@dataclass(frozen=True, slots=True)
class Snapshot:
    jobs: dict[str, int] = field(default_factory=dict)
    oldest_queued_s: float = 0.0
    queued_cards: int = 0
    card_hours: float = 0.0
    deployments: dict[str, int] = field(default_factory=dict)
    replicas: dict[str, int] = field(default_factory=dict)


def snapshot(db: Any, *, now: float) -> Snapshot:
    """Counts of jobs, deployments and replicas by state, and the queue's oldest wait at ``now``."""
    conn = db.conn
    jobs = {state: n for state, n in conn.execute("SELECT state, count(*) FROM jobs GROUP BY state")}
    oldest, cards = conn.execute(
        "SELECT min(submitted_at), coalesce(sum(cards), 0) FROM jobs WHERE state = 'queued'").fetchone()
    (card_hours,) = conn.execute("SELECT coalesce(sum(card_hours), 0) FROM jobs").fetchone()
    deployments = {s: n for s, n in conn.execute(
        "SELECT state, count(*) FROM deployments WHERE state != 'deleted' GROUP BY state")}
    replicas = {s: n for s, n in conn.execute(
        "SELECT r.state, count(*) FROM replicas r JOIN deployments d ON d.id = r.deployment "
        "WHERE d.state != 'deleted' AND r.state != 'removed' GROUP BY r.state")}
    return Snapshot(
        jobs=jobs, oldest_queued_s=max(0.0, now - oldest) if oldest is not None else 0.0, queued_cards=int(cards),
        card_hours=float(card_hours), deployments=deployments, replicas=replicas,
    )


def recent_jobs(db: Any, *, limit: int = 50) -> list[dict[str, Any]]:
    """Jobs not finished first (oldest first: the queue as it stands), then the latest finished."""
    import json

    cols = "id, tenant, name, state, cards, pool, accelerator, progress, reason, placement, submitted_at, updated_at"
    open_rows = db.conn.execute(
        f"SELECT {cols} FROM jobs WHERE state NOT IN ('succeeded', 'failed', 'cancelled') "
        "ORDER BY submitted_at LIMIT ?", (limit,)).fetchall()
    done_rows = db.conn.execute(
        f"SELECT {cols} FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled') "
        "ORDER BY updated_at DESC LIMIT ?", (max(0, limit - len(open_rows)),)).fetchall()
    names = [c.strip() for c in cols.split(",")]
    out = []
    for row in [*open_rows, *done_rows]:
        job = dict(zip(names, row))
        try:
            job["placement"] = json.loads(job["placement"]) if job["placement"] else None
        except ValueError:
            job["placement"] = None
        out.append(job)
    return out


def active_deployments(db: Any) -> list[dict[str, Any]]:
    """Deployments not deleted, with their replicas' sites and states."""
    import json

    deps = db.conn.execute(
        "SELECT id, tenant, model, state, report, created_at FROM deployments WHERE state != 'deleted' "
        "ORDER BY created_at").fetchall()
    reps: dict[str, list[dict[str, Any]]] = {}
    for dep, site, state, cards in db.conn.execute(
            "SELECT deployment, site, state, cards FROM replicas WHERE state != 'removed' ORDER BY site"):
        reps.setdefault(dep, []).append({"site": site, "state": state, "cards": cards})
    out = []
    for dep_id, tenant, model, state, report, created_at in deps:
        try:
            parsed = json.loads(report) if report else {}
        except ValueError:
            parsed = {}
        out.append({"id": dep_id, "tenant": tenant, "model": model, "state": state, "report": parsed,
                    "created_at": created_at, "replicas": reps.get(dep_id, [])})
    return out
