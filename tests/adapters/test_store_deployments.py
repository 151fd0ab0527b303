"""Deployments, replicas and usage in a real SQLite file (WAL + FULL), reopened to show durability."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import sqlite_utils

from controlplane.core import replicas
from controlplane.core.errors import Conflict, Unprocessable
from controlplane.store import db as store_db
from controlplane.store import deployments as deps
from controlplane.store import usage as store_usage
from controlplane.core.usage import UsageBuffer, UsageRow


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "cpn.db"


@pytest.fixture
def db(db_path: Path) -> Iterator[sqlite_utils.Database]:
    conn = store_db.open_db(db_path)
    try:
        yield conn
    finally:
        conn.conn.close()


def reopen(db: sqlite_utils.Database, path: Path) -> sqlite_utils.Database:
    db.conn.close()
    return store_db.open_db(path)


SPEC = replicas.DeploymentSpec(model="qwen2-7b", origins=["hz", "sh"], cards_per_replica=0.25)


def test_deployment_lifecycle_survives_reopen(db: sqlite_utils.Database, db_path: Path) -> None:
    assert store_db.pragmas(db) == {"journal_mode": "wal", "synchronous": 2}
    dep = deps.create(db, deployment_id="dep-1", tenant="acme", model="qwen2-7b", spec=SPEC, now=100.0)
    assert (dep.state, dep.created_at, dep.deleted_at, dep.report) == ("pending", 100.0, None, {})
    assert msgspec.convert(dep.spec, replicas.DeploymentSpec) == SPEC
    with pytest.raises(Conflict):
        deps.create(db, deployment_id="dep-1", tenant="acme", model="x", spec={}, now=101.0)

    report = {"coverage": {"hz": ["hz", "sh"]}, "uncovered": [["sh", "origin sh: ..."]]}
    assert deps.set_state(db, "dep-1", "ready", report=report, now=110.0)
    deps.create(db, deployment_id="dep-2", tenant="acme", model="m2", spec={"model": "m2"}, now=120.0)
    deps.create(db, deployment_id="dep-3", tenant="beta", model="m3", spec={"model": "m3"}, now=130.0)

    db = reopen(db, db_path)
    try:
        got = deps.get(db, "dep-1", tenant="acme")
        assert got is not None
        assert (got.state, got.report, got.updated_at) == ("ready", report, 110.0)
        assert [d.id for d in deps.list_for_tenant(db, "acme")] == ["dep-1", "dep-2"]
        # Another tenant's deployment is invisible (a 404, not a 403).
        assert deps.get(db, "dep-3", tenant="acme") is None
        assert not deps.delete(db, "dep-3", tenant="acme", now=140.0)
        assert deps.delete(db, "dep-2", tenant="acme", now=140.0)
        assert not deps.delete(db, "dep-2", tenant="acme", now=141.0)  # already gone
        assert not deps.set_state(db, "dep-2", "ready", now=142.0)
        with pytest.raises(ValueError, match="deployment state 'deleted'"):
            deps.set_state(db, "dep-1", "deleted", now=142.0)
    finally:
        db = reopen(db, db_path)
    try:
        assert deps.get(db, "dep-2") is None
        soft = deps.get(db, "dep-2", include_deleted=True)
        assert soft is not None and (soft.state, soft.deleted_at) == ("deleted", 140.0)
        assert [d.id for d in deps.list_active(db)] == ["dep-1", "dep-3"]
        assert [d.id for d in deps.list_for_tenant(db, "acme", include_deleted=True)] == ["dep-1", "dep-2"]
    finally:
        db.conn.close()


def test_idempotency_key_commits_with_its_deployment(db: sqlite_utils.Database, db_path: Path) -> None:
    def post(dep_id: str, key: str, body_hash: str, tenant: str = "acme") -> tuple[deps.Deployment, deps.Replay | None]:
        return deps.create_or_replay(db, deployment_id=dep_id, tenant=tenant, model="qwen2-7b", spec=SPEC, now=100.0,
                                     idem_key=key, body_hash=body_hash)

    assert post("dep-1", "k1", "h1")[1] is None
    # Same key and body: the first deployment, its answer not recorded yet; nothing new is created.
    again, replay = post("dep-2", "k1", "h1")
    assert again.id == "dep-1" and replay == deps.Replay(deployment_id="dep-1", response=None)
    assert deps.record_answer(db, tenant="acme", idem_key="k1", response={"id": "dep-1", "n": 1})
    assert not deps.record_answer(db, tenant="acme", idem_key="k1", response={"id": "dep-1", "n": 2})
    with pytest.raises(Unprocessable) as info:
        post("dep-2", "k1", "h2")
    assert info.value.status == 422 and info.value.field == "Idempotency-Key"
    # Another tenant's key space is its own.
    assert post("dep-3", "k1", "h2", tenant="beta")[1] is None
    # A crash after the deployment's insert, before its key's: neither is left behind.
    db.conn.create_function("crash", 0, lambda: 1 // 0)
    db.conn.execute("CREATE TEMP TRIGGER crash_on_key BEFORE INSERT ON deployment_idempotency BEGIN SELECT crash(); END")
    with pytest.raises(sqlite3.OperationalError):
        post("dep-4", "k2", "h3")
    assert deps.get(db, "dep-4", include_deleted=True) is None
    db.conn.execute("DROP TRIGGER crash_on_key")
    # A taken id leaves no key behind either: the key is then free for another body.
    with pytest.raises(Conflict):
        post("dep-1", "k2", "h3")
    assert post("dep-5", "k2", "h4")[1] is None
    assert deps.delete(db, "dep-1", tenant="acme", now=110.0)

    db = reopen(db, db_path)
    try:
        first, replay = deps.create_or_replay(db, deployment_id="dep-6", tenant="acme", model="qwen2-7b", spec=SPEC,
                                              now=120.0, idem_key="k1", body_hash="h1")
        # The replay survives a restart, and the deletion of its deployment (it is the first answer).
        assert (first.id, first.state) == ("dep-1", "deleted") and replay is not None
        assert replay.response == {"id": "dep-1", "n": 1}
        assert [d.id for d in deps.list_for_tenant(db, "acme", include_deleted=True)] == ["dep-1", "dep-5"]
    finally:
        db.conn.close()


def test_fractional_card_accounting(db: sqlite_utils.Database, db_path: Path) -> None:
    for i in (1, 2, 3):
        deps.create(db, deployment_id=f"d{i}", tenant="acme", model="m", spec={}, now=1.0)
    deps.upsert_replicas(db, "d1", [("hz-edge", "A800", 0.1), ("sh-edge", "H20", 1.0)], now=2.0)
    deps.upsert_replicas(db, "d2", [("hz-edge", "A800", 0.2)], state="loading", now=2.0)
    deps.upsert_replicas(db, "d3", [("hz-edge", "A800", 0.25), ("hz-edge2", "A800", 0.5)], state="ready", now=2.0)
    assert deps.allocated_cards_by_site(db) == {
        "hz-edge": {"A800": 0.55}, "sh-edge": {"H20": 1.0}, "hz-edge2": {"A800": 0.5},
    }
    # Lost and removed replicas hold no cards; re-placing one counts it again.
    assert deps.mark_site_lost(db, "hz-edge", now=3.0) == ["d1", "d2", "d3"]
    assert deps.set_replica_state(db, "d1", "sh-edge", "removed", now=3.0)
    assert not deps.set_replica_state(db, "d1", "nowhere", "ready", now=3.0)
    assert deps.allocated_cards_by_site(db) == {"hz-edge2": {"A800": 0.5}}
    deps.upsert_replicas(db, "d1", [("hz-edge", "910B", 0.3)], now=4.0)

    db = reopen(db, db_path)
    try:
        assert deps.allocated_cards_by_site(db) == {"hz-edge": {"910B": 0.3}, "hz-edge2": {"A800": 0.5}}
        assert [(r.site, r.accelerator, r.cards, r.state) for r in deps.replicas_of(db, "d1")] == [
            ("hz-edge", "910B", 0.3, "placed")
        ]
        assert [r.state for r in deps.replicas_of(db, "d1", include_removed=True)] == ["placed", "removed"]
        with pytest.raises(ValueError, match="cards must be > 0"):
            deps.upsert_replicas(db, "d1", [("x", "A800", 0.0)], now=5.0)
        with pytest.raises(ValueError, match="replica state 'gone'"):
            deps.set_replica_state(db, "d1", "hz-edge", "gone", now=5.0)
    finally:
        db.conn.close()


def test_apply_plan_writes_adds_and_removals_together(db: sqlite_utils.Database) -> None:
    deps.create(db, deployment_id="d1", tenant="acme", model="m", spec={}, now=1.0)
    deps.upsert_replicas(db, "d1", [("old", "A800", 1.0)], state="ready", now=1.0)
    plan = replicas.ReplicaPlan(
        add=[replicas.Placement("a", "A800", 0.5), replicas.Placement("b", "H20", 0.5)], remove=["old"]
    )
    deps.apply_plan(db, "d1", plan, now=2.0)
    assert [(r.site, r.state) for r in deps.replicas_of(db, "d1", include_removed=True)] == [
        ("a", "placed"), ("b", "placed"), ("old", "removed")
    ]
    # A failing plan leaves nothing behind: the replica of an unknown deployment breaks the FK.
    with pytest.raises(sqlite3.IntegrityError):
        deps.apply_plan(db, "nope", replicas.ReplicaPlan(add=[replicas.Placement("c", "A800", 1.0)]), now=3.0)
    assert deps.replicas_of(db, "nope") == []


def test_usage_batches_add_up_and_survive_reopen(db: sqlite_utils.Database, db_path: Path) -> None:
    buf = UsageBuffer()
    for _ in range(3):
        buf.add("acme", "qwen", "hz-edge", 10, 4)
    buf.add("acme", "qwen", "sh-edge", 5, 5)
    buf.add("acme", "llama", "hz-edge", 1, 1, card_hours=0.25, energy_cny=0.5)
    buf.add("beta", "qwen", "hz-edge", 100, 100)
    assert store_usage.add_rows(db, buf.drain()) == 4
    buf.add("acme", "qwen", "hz-edge", 2, 6)
    assert store_usage.add_rows(db, buf.drain()) == 1
    assert store_usage.add_rows(db, []) == 0

    db = reopen(db, db_path)
    try:
        buf.add("acme", "qwen", "sh-edge", 1, 0)  # pending, not flushed
        got = store_usage.for_tenant(db, "acme", pending=buf.peek("acme") + buf.peek("beta"))
        assert got["totals"] == {
            "requests": 7, "prompt_tokens": 39, "completion_tokens": 24, "total_tokens": 63,
            "card_hours": 0.25, "energy_cny": 0.5,
        }
        qwen = got["models"]["qwen"]
        assert (qwen["requests"], qwen["total_tokens"]) == (6, 61)
        assert qwen["by_site"]["hz-edge"] == {
            "requests": 4, "prompt_tokens": 32, "completion_tokens": 18, "total_tokens": 50,
            "card_hours": 0.0, "energy_cny": 0.0,
        }
        assert qwen["by_site"]["sh-edge"]["requests"] == 2
        assert store_usage.for_tenant(db, "nobody") == {
            "object": "usage", "tenant": "nobody", "totals": store_usage._zero(), "models": {},
        }
    finally:
        db.conn.close()


def test_usage_batch_is_all_or_nothing(db: sqlite_utils.Database) -> None:
    good = UsageRow(tenant="acme", model="qwen", site="hz-edge", requests=1, prompt_tokens=1, completion_tokens=1)
    bad = UsageRow(tenant=None, model="qwen", site="hz-edge", requests=1)  # type: ignore[arg-type]
    with pytest.raises(sqlite3.IntegrityError):
        store_usage.add_rows(db, [good, bad])
    assert store_usage.for_tenant(db, "acme")["totals"]["requests"] == 0
