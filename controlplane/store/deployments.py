"""Deployments and their replicas in SQLite (tables ``deployments``, ``replicas``; migration 0020;
``deployment_idempotency``, migration 0022).

Promises:

- Every write is one transaction and on disk when the function returns (WAL + ``synchronous=FULL``),
  so the gateway may answer 2xx after it.
- A deployment is never hard-deleted: ``delete`` sets ``deleted_at`` and state ``deleted``; its
  replicas keep holding cards until the hub unloads them and marks them ``removed``.
- Tenancy: ``get``/``delete`` with ``tenant=`` see only that tenant's rows, so another tenant's
  deployment is indistinguishable from a missing one (a 404).
- Idempotency keys are per tenant (as the jobs' are): the same key with the same body hash finds the
  deployment created first (``create_or_replay`` returns it with a :class:`Replay`); with another body
  it is an ``Unprocessable`` (422) naming ``Idempotency-Key``. Check and insert happen in one
  ``BEGIN IMMEDIATE`` transaction, so a key never exists without its deployment nor a keyed
  deployment without its key, and two gateways racing on one key create one deployment. The first
  answer is stored afterwards (``record_answer``), once the service has planned and rendered it.
- Fractional cards: ``allocated_cards_by_site`` sums ``cards`` (REAL) of replicas that hold cards
  (``placed``, ``loading``, ``ready``) per site and accelerator; ``lost`` and ``removed`` hold none.

Public API::

    create(db, deployment_id=, tenant=, model=, spec=, now=) -> Deployment     # Conflict if id taken
    create_or_replay(db, ..., idem_key=, body_hash=) -> (Deployment, Replay | None)
    record_answer(db, tenant=, idem_key=, response=) -> bool
    get(db, id, tenant=None, include_deleted=False) -> Deployment | None
    list_for_tenant(db, tenant, include_deleted=False) / list_active(db) -> [Deployment]
    set_state(db, id, state, report=None, now=) -> bool
    delete(db, id, tenant=, now=) -> bool
    upsert_replicas(db, id, [(site, accelerator, cards)], state="placed", now=)
    set_replica_state(db, id, site, state, now=, expect=None) -> bool   # expect: compare-and-set
    apply_plan(db, id, plan: replicas.ReplicaPlan, now=)       # adds placed, removes removed
    replicas_of(db, id, include_removed=False) -> [Replica]
    mark_site_lost(db, site, now=) -> [deployment ids]
    allocated_cards_by_site(db) -> {site: {accelerator: cards}}
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import Any

import msgspec
import sqlite_utils

from controlplane.core import replica_lifecycle
from controlplane.core import replicas as replicas_core
from controlplane.core.errors import Conflict, Unprocessable
from controlplane.store.db import transaction

DEPLOYMENT_STATES = ("pending", "ready", "degraded", "deleted")
REPLICA_STATES = tuple(s.value for s in replica_lifecycle.ReplicaState)
HOLDING_STATES = tuple(s.value for s in replica_lifecycle.ReplicaState if s in replica_lifecycle.HOLDING)
"""Replica states whose cards are allocated at the site (``replica_lifecycle.HOLDING``)."""


class Deployment(msgspec.Struct, kw_only=True):
    id: str
    tenant: str
    model: str
    spec: dict[str, Any]
    """The spec as posted (``msgspec.convert(dep.spec, replicas.DeploymentSpec)`` rebuilds it)."""
    state: str
    report: dict[str, Any]
    """Last placement/state report (coverage, uncovered origins and why, details) as JSON."""
    created_at: float
    updated_at: float
    deleted_at: float | None = None


class Replay(msgspec.Struct, kw_only=True):
    """An earlier request of the tenant with the same ``Idempotency-Key`` and body."""

    deployment_id: str
    response: dict[str, Any] | None
    """The first answer as :func:`record_answer` stored it; None if it never was (the process stopped,
    or planning failed, between the commit and the answer)."""


class Replica(msgspec.Struct, kw_only=True):
    deployment: str
    site: str
    accelerator: str
    cards: float
    state: str
    updated_at: float


_COLS = "id, tenant, model, spec, state, report, created_at, updated_at, deleted_at"


def _deployment(row: tuple[Any, ...]) -> Deployment:
    return Deployment(
        id=row[0], tenant=row[1], model=row[2], spec=msgspec.json.decode(row[3]), state=row[4],
        report=msgspec.json.decode(row[5]), created_at=row[6], updated_at=row[7], deleted_at=row[8],
    )


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} {value!r} is not one of {', '.join(allowed)}")


def create(
    db: sqlite_utils.Database, *, deployment_id: str, tenant: str, model: str, spec: object, now: float
) -> Deployment:
    """Record a new deployment in state ``pending``.

    Args:
        spec: the ``replicas.DeploymentSpec`` (or any JSON-able value) to keep.

    Raises:
        Conflict: a deployment with this id exists (deleted ones too: ids are never reused).
    """
    dep, _ = create_or_replay(db, deployment_id=deployment_id, tenant=tenant, model=model, spec=spec, now=now,
                              idem_key=None, body_hash="")
    return dep


def create_or_replay(
    db: sqlite_utils.Database,
    *,
    deployment_id: str,
    tenant: str,
    model: str,
    spec: object,
    now: float,
    idem_key: str | None,
    body_hash: str,
) -> tuple[Deployment, Replay | None]:
    """Record a new deployment (and its idempotency key), or find the one an earlier request made.

    Args:
        idem_key: the ``Idempotency-Key`` header, or None for a request without one (always creates).
        body_hash: hash of the decoded body (the caller chooses it; equal bodies, equal hash).

    Returns:
        ``(deployment, None)`` when created; ``(deployment, replay)`` when ``tenant`` already used
        ``idem_key`` with this body: the deployment is the one first created (deleted ones too).

    Raises:
        Unprocessable: ``tenant`` used ``idem_key`` with another body (field ``Idempotency-Key``).
        Conflict: a deployment with this id exists (deleted ones too: ids are never reused).
    """
    spec_json = msgspec.json.encode(spec).decode()
    try:
        with transaction(db):
            if idem_key is not None:
                hit = db.execute(
                    "SELECT body_hash, deployment_id, response FROM deployment_idempotency WHERE tenant = ? AND key = ?",
                    [tenant, idem_key],
                ).fetchone()
                if hit is not None:
                    if hit[0] != body_hash:
                        raise Unprocessable(
                            "Idempotency-Key was already used with a different body", field="Idempotency-Key")
                    first = get(db, hit[1], include_deleted=True)
                    assert first is not None, "a key's deployment is never hard-deleted"
                    answer = None if hit[2] is None else msgspec.json.decode(hit[2])
                    return first, Replay(deployment_id=hit[1], response=answer)
            db.execute(
                f"INSERT INTO deployments ({_COLS}) VALUES (?, ?, ?, ?, 'pending', '{{}}', ?, ?, NULL)",
                [deployment_id, tenant, model, spec_json, now, now],
            )
            if idem_key is not None:
                db.execute(
                    "INSERT INTO deployment_idempotency (tenant, key, body_hash, deployment_id, response, created_at) "
                    "VALUES (?, ?, ?, ?, NULL, ?)",
                    [tenant, idem_key, body_hash, deployment_id, now],
                )
    except sqlite3.IntegrityError:
        raise Conflict(f"deployment {deployment_id} already exists", field="id") from None
    dep = get(db, deployment_id)
    assert dep is not None
    return dep, None


def record_answer(db: sqlite_utils.Database, *, tenant: str, idem_key: str, response: object) -> bool:
    """Store the first answer to ``idem_key`` (a replay answers it verbatim); False if one is stored already."""
    with transaction(db):
        cur = db.execute(
            "UPDATE deployment_idempotency SET response = ? WHERE tenant = ? AND key = ? AND response IS NULL",
            [msgspec.json.encode(response).decode(), tenant, idem_key],
        )
    return cur.rowcount == 1


def get(
    db: sqlite_utils.Database, deployment_id: str, *, tenant: str | None = None, include_deleted: bool = False
) -> Deployment | None:
    """One deployment, or None if missing, deleted (unless ``include_deleted``) or not ``tenant``'s."""
    sql = f"SELECT {_COLS} FROM deployments WHERE id = ?"
    args: list[Any] = [deployment_id]
    if tenant is not None:
        sql += " AND tenant = ?"
        args.append(tenant)
    if not include_deleted:
        sql += " AND deleted_at IS NULL"
    row = db.execute(sql, args).fetchone()
    return _deployment(row) if row else None


def list_for_tenant(db: sqlite_utils.Database, tenant: str, *, include_deleted: bool = False) -> list[Deployment]:
    """A tenant's deployments, oldest first."""
    sql = f"SELECT {_COLS} FROM deployments WHERE tenant = ?"
    if not include_deleted:
        sql += " AND deleted_at IS NULL"
    return [_deployment(r) for r in db.execute(sql + " ORDER BY created_at, id", [tenant]).fetchall()]


def list_active(db: sqlite_utils.Database) -> list[Deployment]:
    """Every deployment not deleted (the hub's work list after a restart)."""
    sql = f"SELECT {_COLS} FROM deployments WHERE deleted_at IS NULL ORDER BY created_at, id"
    return [_deployment(r) for r in db.execute(sql).fetchall()]


def set_state(
    db: sqlite_utils.Database, deployment_id: str, state: str, *, report: object = None, now: float
) -> bool:
    """Record a deployment's state (and report, if given); False if it is missing or deleted."""
    _check(state, DEPLOYMENT_STATES[:3], "deployment state")
    with transaction(db):
        if report is None:
            cur = db.execute(
                "UPDATE deployments SET state = ?, updated_at = ? WHERE id = ? AND deleted_at IS NULL",
                [state, now, deployment_id],
            )
        else:
            cur = db.execute(
                "UPDATE deployments SET state = ?, report = ?, updated_at = ? WHERE id = ? AND deleted_at IS NULL",
                [state, msgspec.json.encode(report).decode(), now, deployment_id],
            )
    return cur.rowcount == 1


def delete(db: sqlite_utils.Database, deployment_id: str, *, tenant: str | None, now: float) -> bool:
    """Soft-delete (``tenant=None``: any tenant's, for operators); False if missing or not theirs."""
    sql = "UPDATE deployments SET state = 'deleted', deleted_at = ?, updated_at = ? WHERE id = ? AND deleted_at IS NULL"
    args: list[Any] = [now, now, deployment_id]
    if tenant is not None:
        sql += " AND tenant = ?"
        args.append(tenant)
    with transaction(db):
        cur = db.execute(sql, args)
    return cur.rowcount == 1


def upsert_replicas(
    db: sqlite_utils.Database,
    deployment_id: str,
    placements: Iterable[tuple[str, str, float]],
    *,
    state: str = "placed",
    now: float,
    scaled_at: float | None = None,
) -> int:
    """Insert or replace replicas ``(site, accelerator, cards)`` of a deployment, all in ``state``;
    ``scaled_at``: when the autoscaler added them (None: placed by coverage or the floor).

    Returns the number of rows written. Raises ValueError on an unknown state or cards <= 0.
    """
    _check(state, REPLICA_STATES, "replica state")
    rows = []
    for site, accelerator, cards in placements:
        if not cards > 0:
            raise ValueError(f"replica at {site}: cards must be > 0, got {cards!r}")
        rows.append((deployment_id, site, accelerator, float(cards), state, now, scaled_at))
    with transaction(db):
        db.conn.executemany(
            """INSERT INTO replicas (deployment, site, accelerator, cards, state, updated_at, scaled_at)
               VALUES (?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (deployment, site) DO UPDATE SET accelerator = excluded.accelerator,
                 cards = excluded.cards, state = excluded.state, updated_at = excluded.updated_at,
                 scaled_at = excluded.scaled_at""",
            rows,
        )
    return len(rows)


def set_replica_state(db: sqlite_utils.Database, deployment_id: str, site: str, state: str, *, now: float,
                      expect: str | None = None) -> bool:
    """Move one replica to ``state``; False if there is no such replica (or, with ``expect``, it is
    no longer in that state: a compare-and-set for changes decided on an older read)."""
    _check(state, REPLICA_STATES, "replica state")
    sql = "UPDATE replicas SET state = ?, updated_at = ? WHERE deployment = ? AND site = ?"
    args: list[Any] = [state, now, deployment_id, site]
    if expect is not None:
        sql += " AND state = ?"
        args.append(expect)
    with transaction(db):
        cur = db.execute(sql, args)
    return cur.rowcount == 1


def apply_plan(db: sqlite_utils.Database, deployment_id: str, plan: replicas_core.ReplicaPlan, *, now: float) -> None:
    """Persist a plan in one transaction: ``plan.add`` as ``placed``, ``plan.remove`` as ``removed``."""
    with transaction(db):
        upsert_replicas(db, deployment_id, plan.add, now=now)
        for site in plan.remove:
            set_replica_state(db, deployment_id, site, "removed", now=now)


def replicas_of(db: sqlite_utils.Database, deployment_id: str, *, include_removed: bool = False) -> list[Replica]:
    """A deployment's replicas by site id."""
    sql = "SELECT deployment, site, accelerator, cards, state, updated_at FROM replicas WHERE deployment = ?"
    if not include_removed:
        sql += " AND state != 'removed'"
    return [
        Replica(deployment=r[0], site=r[1], accelerator=r[2], cards=r[3], state=r[4], updated_at=r[5])
        for r in db.execute(sql + " ORDER BY site", [deployment_id]).fetchall()
    ]


def mark_site_lost(db: sqlite_utils.Database, site: str, *, now: float) -> list[str]:
    """Mark every card-holding replica at ``site`` lost; return the deployments affected."""
    marks = ", ".join("?" * len(HOLDING_STATES))
    with transaction(db):
        affected = [
            r[0]
            for r in db.execute(
                f"SELECT DISTINCT deployment FROM replicas WHERE site = ? AND state IN ({marks}) ORDER BY deployment",
                [site, *HOLDING_STATES],
            ).fetchall()
        ]
        db.execute(
            f"UPDATE replicas SET state = 'lost', updated_at = ? WHERE site = ? AND state IN ({marks})",
            [now, site, *HOLDING_STATES],
        )
    return affected


def marks(db: sqlite_utils.Database) -> tuple[tuple[Any, ...], ...]:
    """What a reconcile pass decides from, as one comparable value: every active deployment's id,
    state and ``updated_at``, then every replica's deployment, site, state and ``updated_at``. Equal
    before and after an await: nothing of it changed meanwhile."""
    deps = db.execute("SELECT id, state, updated_at FROM deployments WHERE deleted_at IS NULL ORDER BY id").fetchall()
    reps = db.execute("SELECT deployment, site, state, updated_at FROM replicas ORDER BY deployment, site").fetchall()
    return tuple(tuple(r) for r in deps) + tuple(tuple(r) for r in reps)


def scaled_replicas(db: sqlite_utils.Database) -> dict[tuple[str, str], float]:
    """``(deployment, site) -> scaled_at`` of the card-holding replicas the autoscaler added."""
    marks = ", ".join("?" * len(HOLDING_STATES))
    rows = db.execute(
        f"SELECT deployment, site, scaled_at FROM replicas WHERE scaled_at IS NOT NULL AND state IN ({marks})",
        list(HOLDING_STATES),
    ).fetchall()
    return {(dep, site): float(at) for dep, site, at in rows}


def held_cards_by_tenant(db: sqlite_utils.Database) -> dict[str, float]:
    """Cards each tenant's active deployments hold (replicas placed, loading or ready)."""
    marks = ", ".join("?" * len(HOLDING_STATES))
    rows = db.execute(
        f"SELECT d.tenant, SUM(r.cards) FROM replicas r JOIN deployments d ON d.id = r.deployment "
        f"WHERE r.state IN ({marks}) AND d.state != 'deleted' GROUP BY d.tenant",
        list(HOLDING_STATES),
    ).fetchall()
    return {tenant: float(cards) for tenant, cards in rows}


def allocated_cards_by_site(db: sqlite_utils.Database) -> dict[str, dict[str, float]]:
    """Cards held by replicas, ``{site: {accelerator: cards}}`` (fractions summed exactly as REAL,
    rounded to 1e-9 so 0.1 + 0.2 reads as 0.3)."""
    marks = ", ".join("?" * len(HOLDING_STATES))
    out: dict[str, dict[str, float]] = {}
    for site, accelerator, cards in db.execute(
        f"SELECT site, accelerator, SUM(cards) FROM replicas WHERE state IN ({marks}) GROUP BY site, accelerator",
        list(HOLDING_STATES),
    ).fetchall():
        out.setdefault(site, {})[accelerator] = round(cards, 9)
    return out
