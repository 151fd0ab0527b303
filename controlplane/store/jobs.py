"""Training jobs in SQLite: tables ``jobs``, ``attempts``, ``job_events``, ``idempotency`` (migration 0010).

Promises:

- Every write is one transaction (``db.transaction``: ``BEGIN IMMEDIATE`` ... ``COMMIT``) and is on
  disk when the function returns (WAL + ``synchronous=FULL`` from ``db.open_db``), so the gateway
  may answer 201 after :func:`create_job` returns. Functions nest inside an outer ``transaction``
  (the scheduler tick batches a whole plan into one commit).
- Idempotency keys are per tenant: the same key with the same body hash replays the first answer
  (the job row as it was when created, ``replayed=True``); the same key with another body is an
  ``Unprocessable`` (422) naming ``Idempotency-Key``. Check and insert happen in one
  ``BEGIN IMMEDIATE`` transaction, so two gateways racing on one key create one job.
- Agent events are applied once: :func:`record_event` returns False for a ``job:attempt:site:seq``
  already stored (JetStream redelivers; its duplicate window is only 2 minutes). The caller records
  only events from the site holding the attempt (:func:`attempt_pools`), so one site's events can
  never take the key of another's.
- Metering is applied once per attempt: :func:`end_attempt` returns False if the attempt was
  already ended, and only the first call adds its card-hours and energy to the job's totals.
- Tenancy: ``get_job(..., tenant=)`` sees only that tenant's jobs (another tenant's job is a 404).

Public API::

    create_job(db, tenant, spec: JobSpec, idem_key, body_hash, now, *, job_id=None) -> (JobRow, replayed)
    get_job(db, job_id, *, tenant=None) -> JobRow | None
    list_jobs(db, tenant, *, state=None, limit=100) -> [JobRow]        # newest first
    jobs_in_states(db, states: [JobState]) -> [JobRow]                   # hub start-up / reconcile
    read_jobs_in_states(db, states) -> ReadJobs                          # the same, decoded as iterated
    update_job(db, job_id, now, **fields) -> JobRow                      # NotFound; unknown field: ValueError
    save_record(db, rec: lifecycle.JobRecord, *, placement: Placed | None = None) -> None
    load_record(db, job_id) -> lifecycle.JobRecord | None
    add_attempt(db, job_id, attempt, pool, accelerator, cards, now, *, breakdown: CostBreakdown | None = None)
    end_attempt(db, meter: lifecycle.Meter, *, energy_cny, exit_reason, exit_code=None, detail="") -> bool
    attempts(db, job_id) -> [AttemptRow]
    record_event(db, job_id, attempt, seq, kind, body_json, now, *, site="") -> bool
    record_hub_event(db, job_id, attempt, kind, body, now)               # site "(hub)"
    attempt_pools(db, [(job_id, attempt)]) -> {(job_id, attempt): pool}  # where each was placed
    events(db, job_id) -> [EventRow]
    record_placements(db, [(JobRecord, Placed)], now) -> int            # one plan tick, one commit
    apply_waits(db, [(job_id, attempt, reason)]) -> [unmatched]        # derived: inside db.derived(db)
    waiting_reasons(db) -> [(job_id, attempt, reason)]
    usage_by_tenant(db, tenant) -> {"jobs", "attempts", "card_hours", "energy_cny"}
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Iterator
from typing import Any

import msgspec
import sqlite_utils

from controlplane.core import jobspec, lifecycle
from controlplane.core.errors import Conflict, NotFound, Unprocessable
from controlplane.core.jobspec import JobSpec
from controlplane.core.lifecycle import JobState
from controlplane.core.placement import CostBreakdown
from controlplane.core.scheduler import Explanation
from controlplane.store.db import transaction, write


class Placed(msgspec.Struct, kw_only=True):
    """A job's last placement decision, explained (the ``jobs.placement`` column)."""

    attempt: int | None = None
    pool: str = ""
    accelerator: str = ""
    decided_at: float | None = None
    start_at: float | None = None
    executor: str = ""
    time_scale: float = 1.0
    """Simulated seconds per wall second of this attempt (1 but on the ``sim`` executor)."""
    checkpoint_interval_s: float | None = None
    breakdown: CostBreakdown | None = None
    explanation: Explanation | None = None


class JobRow(msgspec.Struct, kw_only=True):
    """One ``jobs`` row; ``spec`` is what the tenant asked for (typed: decoded once, at the gateway),
    ``placement`` the last decision explained."""

    id: str
    tenant: str
    name: str
    spec: JobSpec
    state: JobState
    priority: int
    cards: int
    attempt: int
    pool: str
    accelerator: str
    progress: float
    checkpoint: str
    checkpoint_pool: str
    user_retries: int
    infra_restarts: int
    max_user_retries: int
    max_infra_restarts: int
    attempt_since: float | None
    reason: str
    placement: Placed | None
    card_hours: float
    energy_cny: float
    submitted_at: float
    updated_at: float
    finished_at: float | None

    def record(self) -> lifecycle.JobRecord:
        """The lifecycle view of this row (for ``lifecycle.apply_event`` and friends)."""
        return lifecycle.JobRecord(
            id=self.id, tenant=self.tenant, cards=self.cards, state=self.state,
            attempt=self.attempt, pool=self.pool, accelerator=self.accelerator, progress=self.progress,
            checkpoint=self.checkpoint, checkpoint_pool=self.checkpoint_pool, user_retries=self.user_retries,
            infra_restarts=self.infra_restarts, max_user_retries=self.max_user_retries,
            max_infra_restarts=self.max_infra_restarts, attempt_since=self.attempt_since, reason=self.reason,
            updated_at=self.updated_at,
        )


class AttemptRow(msgspec.Struct, kw_only=True):
    job_id: str
    attempt: int
    pool: str
    accelerator: str
    cards: int
    placed_at: float
    started_at: float | None
    ended_at: float | None
    exit_reason: str
    exit_code: int | None
    detail: str
    card_hours: float
    energy_cny: float
    breakdown: CostBreakdown | None


class EventRow(msgspec.Struct, kw_only=True):
    job_id: str
    attempt: int
    seq: int
    kind: str
    body: dict[str, Any]
    at: float


_JOB_COLS = (
    "id, tenant, name, spec, state, priority, cards, attempt, pool, accelerator, progress, checkpoint, "
    "checkpoint_pool, user_retries, infra_restarts, max_user_retries, max_infra_restarts, attempt_since, "
    "reason, placement, card_hours, energy_cny, submitted_at, updated_at, finished_at"
)
_JSON_COLS = {"placement"}
_UPDATABLE = {
    "name", "state", "priority", "attempt", "pool", "accelerator", "progress", "checkpoint", "checkpoint_pool",
    "user_retries", "infra_restarts", "attempt_since", "reason", "placement", "finished_at",
}


_JOB_NAMES = _JOB_COLS.split(", ")
_PLACED = msgspec.json.Decoder(Placed)
_BREAKDOWN = msgspec.json.Decoder(CostBreakdown)
_STATES = {s.value: s for s in JobState}
_ROW_DECODER = msgspec.json.Decoder(JobRow)
_WAITING = frozenset(s.value for s in lifecycle.WAITING)


def _job(row: tuple[Any, ...]) -> JobRow:
    values = dict(zip(_JOB_NAMES, row))
    # Every stored spec decodes (migration 0012 quarantined the ones that did not); a failure
    # here is a bug or a damaged file, and surfaces as one.
    values["spec"] = jobspec.decode(values["spec"])
    values["state"] = _STATES[values["state"]]
    values["placement"] = _PLACED.decode(values["placement"]) if values["placement"] else None
    return JobRow(**values)


_ENCODER = msgspec.json.Encoder()


def _encode(value: Any) -> str:
    # msgspec encodes dicts holding Structs (breakdowns, verdicts) directly, and ~5x faster than json
    return _ENCODER.encode(value).decode()


def _new_id() -> str:
    # Ids are one NATS token (wire.ID_PATTERN); 64 random bits do not collide in practice.
    return "job-" + secrets.token_hex(8)


def idempotent_answer(db: sqlite_utils.Database, tenant: str, idem_key: str, body_hash: str) -> JobRow | None:
    """The job an earlier request with this key created (None if the key is new), so a retry is
    answered as first answered before anything else is checked again.

    Raises:
        Unprocessable: the key was used by this tenant with a different body.
    """
    hit = db.conn.execute("SELECT body_hash, response, job_id FROM idempotency WHERE tenant = ? AND key = ?",
                          (tenant, idem_key)).fetchone()
    return None if hit is None else _replay(db, hit, body_hash)


def _replay(db: sqlite_utils.Database, hit: tuple[Any, ...], body_hash: str) -> JobRow:
    """The answer stored for an idempotency key, ``hit`` = (body_hash, response, job_id)."""
    if hit[0] != body_hash:
        raise Unprocessable("Idempotency-Key was already used with a different body", field="Idempotency-Key")
    try:
        return _ROW_DECODER.decode(hit[1])
    except msgspec.ValidationError:
        # An answer stored before specs were typed, for a job whose spec migration 0012
        # quarantined: the job as it is now is the best answer left.
        first = _get(db, hit[2])
        if first is None:
            raise
        return first


def create_job(
    db: sqlite_utils.Database,
    tenant: str,
    spec: JobSpec,
    idem_key: str | None,
    body_hash: str,
    now: float,
    *,
    job_id: str | None = None,
) -> tuple[JobRow, bool]:
    """Create a queued job, or replay the answer to an earlier request with the same key.

    Args:
        spec: what the tenant asked for, as checked by the gateway; stored as msgspec JSON (the
            ``name``, ``cards``, ``priority`` and ``max_retries`` columns come from it).
        idem_key: the ``Idempotency-Key`` header, or None for a request without one.
        body_hash: hash of the canonical body (the gateway chooses the hash; equal bodies, equal hash).

    Returns:
        ``(job, replayed)``: ``replayed`` is True when the key was seen with the same body; ``job``
        is then the row as first created.

    Raises:
        Unprocessable: the key was used by this tenant with a different body (field
            ``Idempotency-Key``), or ``cards`` is below 1.
        Conflict: ``job_id`` was given and is taken.
    """
    if spec.cards < 1:
        raise Unprocessable(f"cards must be an integer >= 1, got {spec.cards!r}", field="cards")
    with transaction(db):
        return _create_job(db, tenant, spec, idem_key, body_hash, now, job_id)


async def create_job_async(db: sqlite_utils.Database, tenant: str, spec: JobSpec, idem_key: str | None,
                           body_hash: str, now: float) -> tuple[JobRow, bool]:
    """:func:`create_job`, awaited (``store.db.write``): on the replicated record the loop goes on
    while the record acknowledges, and concurrent submissions of one process are in flight together.
    Not fenced: a submission is a tenant's write, which any gateway makes, leading or not.
    Optimistic: it reads only the rows it writes (its idempotency key, its new job), so it asks the
    record for no read barrier; a retry whose first answer the projection does not hold yet loses
    the idempotency key's compare-and-set, catches up and replays that answer."""
    if spec.cards < 1:
        raise Unprocessable(f"cards must be an integer >= 1, got {spec.cards!r}", field="cards")
    return await write(db, lambda d: _create_job(d, tenant, spec, idem_key, body_hash, now, None), fenced=False,
                       optimistic=True)


def _create_job(db: sqlite_utils.Database, tenant: str, spec: JobSpec, idem_key: str | None, body_hash: str,
                now: float, job_id: str | None) -> tuple[JobRow, bool]:
    conn = db.conn
    if idem_key is not None:
        hit = conn.execute(
            "SELECT body_hash, response, job_id FROM idempotency WHERE tenant = ? AND key = ?", (tenant, idem_key)
        ).fetchone()
        if hit is not None:
            return _replay(db, hit, body_hash), True
    jid = job_id or _new_id()
    if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (jid,)).fetchone():
        raise Conflict(f"job {jid} already exists", field="id")
    max_retries = lifecycle.DEFAULT_MAX_USER_RETRIES if spec.max_retries is None else spec.max_retries
    conn.execute(
        "INSERT INTO jobs (id, tenant, name, spec, state, priority, cards, max_user_retries, "
        "max_infra_restarts, submitted_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (jid, tenant, spec.name, jobspec.encode(spec).decode(), JobState.QUEUED.value, spec.priority,
         spec.cards, max_retries, lifecycle.DEFAULT_MAX_INFRA_RESTARTS, now, now),
    )
    row = _get(db, jid)
    assert row is not None
    if idem_key is not None:
        conn.execute(
            "INSERT INTO idempotency (tenant, key, body_hash, job_id, status, response, created_at) "
            "VALUES (?, ?, ?, ?, 201, ?, ?)",
            (tenant, idem_key, body_hash, jid, _encode(row), now),
        )
    return row, False


def _get(db: sqlite_utils.Database, job_id: str) -> JobRow | None:
    row = db.conn.execute(f"SELECT {_JOB_COLS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return None if row is None else _job(row)


def get_job(db: sqlite_utils.Database, job_id: str, *, tenant: str | None = None) -> JobRow | None:
    """The job, or None if unknown or (with ``tenant``) another tenant's."""
    job = _get(db, job_id)
    if job is None or (tenant is not None and job.tenant != tenant):
        return None
    return job


def list_jobs(db: sqlite_utils.Database, tenant: str, *, state: JobState | None = None,
              limit: int = 100) -> list[JobRow]:
    """A tenant's jobs, newest first, optionally in one state."""
    sql = f"SELECT {_JOB_COLS} FROM jobs WHERE tenant = ?"
    args: list[Any] = [tenant]
    if state is not None:
        sql += " AND state = ?"
        args.append(JobState(state).value)
    sql += " ORDER BY submitted_at DESC, id DESC LIMIT ?"
    args.append(int(limit))
    return [_job(r) for r in db.conn.execute(sql, args)]


def held_cards_by_tenant(db: sqlite_utils.Database, states: Iterable[JobState | str]) -> dict[str, int]:
    """Cards each tenant's jobs in ``states`` (the ones holding cards) need, summed."""
    wanted = [JobState(s).value for s in states]
    marks = ", ".join("?" for _ in wanted)
    sql = f"SELECT tenant, SUM(cards) FROM jobs WHERE state IN ({marks}) GROUP BY tenant"
    return {tenant: int(cards) for tenant, cards in db.conn.execute(sql, wanted)}


def jobs_in_states(db: sqlite_utils.Database, states: Iterable[JobState]) -> list[JobRow]:
    """Every job in one of ``states``, oldest first (the hub rebuilds its queue from these)."""
    return list(read_jobs_in_states(db, states))


class ReadJobs:
    """Job rows read in one query, decoded one by one as they are iterated (:func:`read_jobs_in_states`)."""

    def __init__(self, raws: list[tuple[Any, ...]]) -> None:
        self._raws = raws

    def __len__(self) -> int:
        return len(self._raws)

    def __iter__(self) -> Iterator[JobRow]:
        return map(_job, self._raws)


def read_jobs_in_states(db: sqlite_utils.Database, states: Iterable[JobState]) -> ReadJobs:
    """:func:`jobs_in_states` read at once (one consistent read) and decoded as iterated, so a
    caller on an event loop may let other work run between the rows of a long queue."""
    wanted = [JobState(s).value for s in states]
    marks = ", ".join("?" for _ in wanted)
    sql = f"SELECT {_JOB_COLS} FROM jobs WHERE state IN ({marks}) ORDER BY submitted_at, id"
    return ReadJobs(db.conn.execute(sql, wanted).fetchall())


def accelerators_wanted(db: sqlite_utils.Database, states: Iterable[JobState]) -> frozenset[str]:
    """Every accelerator type some job in ``states`` accepts (its spec's ``accelerators``)."""
    wanted = [JobState(s).value for s in states]
    marks = ", ".join("?" for _ in wanted)
    sql = (f"SELECT DISTINCT a.value FROM jobs, json_each(jobs.spec, '$.accelerators') AS a "
           f"WHERE jobs.state IN ({marks})")
    return frozenset(str(row[0]) for row in db.conn.execute(sql, wanted))


def jobs_mark(db: sqlite_utils.Database) -> int:
    """The newest job row's rowid (0 for none): every job created later has a higher one (rows
    are never deleted but by a rebuild of the whole table; an upsert keeps its row's rowid)."""
    return int(db.conn.execute("SELECT coalesce(max(rowid), 0) FROM jobs").fetchone()[0])


def jobs_added(db: sqlite_utils.Database, states: Iterable[JobState], after: int, upto: int) -> list[JobRow]:
    """The jobs in one of ``states`` created after the :func:`jobs_mark` ``after``, up to the
    mark ``upto``, oldest first (a scheduler tick reads only what was submitted since its last
    full read)."""
    wanted = [JobState(s).value for s in states]
    marks = ", ".join("?" for _ in wanted)
    sql = (f"SELECT {_JOB_COLS} FROM jobs WHERE rowid > ? AND rowid <= ? AND state IN ({marks}) "
           "ORDER BY submitted_at, id")
    return [_job(r) for r in db.conn.execute(sql, [after, upto, *wanted])]


class Decoded:
    """Job rows decoded once: a row read again with every stored value as before is the same
    :class:`JobRow` object, not decoded again (a scheduler's full read of a long, mostly unchanged
    queue spent half its time decoding the same specs). Keyed on the whole stored row, so a row
    changed in any way, at any clock, is decoded afresh. Holds the rows of the last reads only
    (:meth:`keep`)."""

    def __init__(self) -> None:
        self._rows: dict[str, tuple[tuple[Any, ...], JobRow]] = {}
        self.hits = 0

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return f"<Decoded rows={len(self._rows)} hits={self.hits}>"

    def decode(self, raw: tuple[Any, ...]) -> JobRow:
        hit = self._rows.get(raw[0])  # the id, _JOB_COLS's first column
        if hit is not None and hit[0] == raw:
            self.hits += 1
            return hit[1]
        row = _job(raw)
        self._rows[row.id] = (raw, row)
        return row

    def keep(self, ids: set[str]) -> None:
        """Forget every row but ``ids``'s (the jobs still read)."""
        self._rows = {k: v for k, v in self._rows.items() if k in ids}


def jobs_page(db: sqlite_utils.Database, state: JobState, after: int, upto: int, limit: int,
              decoded: Decoded | None = None) -> tuple[list[JobRow], int]:
    """At most ``limit`` jobs in ``state`` with a rowid in (``after``, ``upto``], by rowid (the
    state index's order: no sort), and the last rowid read (``after`` if none): a long queue read
    a page at a time, so a caller on an event loop lets other work run between the pages.
    ``decoded``: rows read before and unchanged are not decoded again."""
    sql = f"SELECT rowid, {_JOB_COLS} FROM jobs WHERE state = ? AND rowid > ? AND rowid <= ? ORDER BY rowid LIMIT ?"
    raws = db.conn.execute(sql, [JobState(state).value, after, upto, limit]).fetchall()
    decode = decoded.decode if decoded is not None else _job
    return [decode(r[1:]) for r in raws], (int(raws[-1][0]) if raws else after)


def count_in_states(db: sqlite_utils.Database, states: Iterable[JobState]) -> int:
    """How many jobs are in one of ``states`` (from the state index, without reading the rows)."""
    wanted = [JobState(s).value for s in states]
    marks = ", ".join("?" for _ in wanted)
    return int(db.conn.execute(f"SELECT count(*) FROM jobs WHERE state IN ({marks})", wanted).fetchone()[0])


def states_of(db: sqlite_utils.Database, ids: Iterable[str]) -> dict[str, tuple[str, int, float]]:
    """``id -> (state, attempt, updated_at)`` of the jobs among ``ids`` that exist (a decision
    made from an older read checks against these before it is written)."""
    out: dict[str, tuple[str, int, float]] = {}
    ids = list(ids)
    for i in range(0, len(ids), 500):  # SQLite's bound-parameter limit
        chunk = ids[i:i + 500]
        sql = f"SELECT id, state, attempt, updated_at FROM jobs WHERE id IN ({', '.join('?' for _ in chunk)})"
        for job_id, state, attempt, updated in db.conn.execute(sql, chunk):
            out[job_id] = (str(state), int(attempt), float(updated))
    return out


def update_job(db: sqlite_utils.Database, job_id: str, now: float, **fields: Any) -> JobRow:
    """Set some columns of a job (and ``updated_at``); returns the new row.

    Raises:
        ValueError: a field that is not updatable (a caller bug).
        NotFound: no such job.
    """
    bad = set(fields) - _UPDATABLE
    if bad:
        raise ValueError(f"not updatable: {sorted(bad)}")
    sets = ["updated_at = ?"]
    args: list[Any] = [now]
    for name, value in fields.items():
        sets.append(f"{name} = ?")
        if name in _JSON_COLS and value is not None:
            value = _encode(value)
        elif isinstance(value, lifecycle.JobState):
            value = value.value
        args.append(value)
    args.append(job_id)
    with transaction(db):
        cur = db.conn.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?", args)
        if cur.rowcount == 0:
            raise NotFound(f"job {job_id} not found", field="job_id")
        row = _get(db, job_id)
    assert row is not None
    return row


_RECORD_SQL = (
    "UPDATE jobs SET state = ?, attempt = ?, pool = ?, accelerator = ?, progress = ?, checkpoint = ?, "
    "checkpoint_pool = ?, user_retries = ?, infra_restarts = ?, attempt_since = ?, reason = ?, "
    "updated_at = ?, finished_at = CASE WHEN ? THEN COALESCE(finished_at, ?) ELSE NULL END"
)


def _record_args(rec: lifecycle.JobRecord) -> list[Any]:
    terminal = rec.state in lifecycle.TERMINAL
    return [rec.state.value, rec.attempt, rec.pool, rec.accelerator, rec.progress, rec.checkpoint,
            rec.checkpoint_pool, rec.user_retries, rec.infra_restarts, rec.attempt_since, rec.reason,
            rec.updated_at, terminal, rec.updated_at]


def save_record(db: sqlite_utils.Database, rec: lifecycle.JobRecord, *, placement: Placed | None = None) -> None:
    """Write the lifecycle fields of ``rec`` (and the placement explanation, if given).

    Raises:
        NotFound: no such job.
    """
    sql, args = _RECORD_SQL, _record_args(rec)
    if placement is not None:
        sql += ", placement = ?"
        args.append(_encode(placement))
    with transaction(db):
        cur = db.conn.execute(sql + " WHERE id = ?", [*args, rec.id])
        if cur.rowcount == 0:
            raise NotFound(f"job {rec.id} not found", field="job_id")


def load_record(db: sqlite_utils.Database, job_id: str) -> lifecycle.JobRecord | None:
    job = _get(db, job_id)
    return None if job is None else job.record()


def add_attempt(
    db: sqlite_utils.Database,
    job_id: str,
    attempt: int,
    pool: str,
    accelerator: str,
    cards: int,
    now: float,
    *,
    breakdown: CostBreakdown | None = None,
) -> None:
    """Record a new attempt (placed at ``now``).

    Raises:
        Conflict: that attempt number exists already for the job.
    """
    with transaction(db):
        cur = db.conn.execute(
            "INSERT INTO attempts (job_id, attempt, pool, accelerator, cards, placed_at, breakdown) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (job_id, attempt) DO NOTHING",
            (job_id, attempt, pool, accelerator, cards, now, _encode(breakdown) if breakdown else None),
        )
        if cur.rowcount == 0:
            raise Conflict(f"job {job_id} attempt {attempt} exists already", field="attempt")


def mark_attempt_started(db: sqlite_utils.Database, job_id: str, attempt: int, at: float) -> None:
    """Note when the agent reported the attempt started (first report wins)."""
    with transaction(db):
        db.conn.execute(
            "UPDATE attempts SET started_at = COALESCE(started_at, ?) WHERE job_id = ? AND attempt = ?",
            (at, job_id, attempt),
        )


def end_attempt(
    db: sqlite_utils.Database,
    meter: lifecycle.Meter,
    *,
    energy_cny: float,
    exit_reason: str,
    exit_code: int | None = None,
    detail: str = "",
) -> bool:
    """Close an attempt with its metering; add its card-hours and energy to the job's totals.

    ``energy_cny`` comes from the caller (``placement.metered_energy_cny`` over the attempt's window).
    Returns False (and changes nothing) if the attempt was already ended or does not exist.
    """
    hours = meter.card_hours
    with transaction(db):
        cur = db.conn.execute(
            "UPDATE attempts SET ended_at = ?, started_at = COALESCE(started_at, ?), exit_reason = ?, "
            "exit_code = ?, detail = ?, card_hours = ?, energy_cny = ? "
            "WHERE job_id = ? AND attempt = ? AND ended_at IS NULL",
            (meter.end_at, meter.start_at, exit_reason, exit_code, detail, hours, energy_cny,
             meter.job_id, meter.attempt),
        )
        if cur.rowcount == 0:
            return False
        db.conn.execute(
            "UPDATE jobs SET card_hours = card_hours + ?, energy_cny = energy_cny + ? WHERE id = ?",
            (hours, energy_cny, meter.job_id),
        )
    return True


def attempts(db: sqlite_utils.Database, job_id: str) -> list[AttemptRow]:
    rows = db.conn.execute(
        "SELECT job_id, attempt, pool, accelerator, cards, placed_at, started_at, ended_at, exit_reason, "
        "exit_code, detail, card_hours, energy_cny, breakdown FROM attempts WHERE job_id = ? ORDER BY attempt",
        (job_id,),
    )
    out = []
    for r in rows:
        out.append(AttemptRow(
            job_id=r[0], attempt=r[1], pool=r[2], accelerator=r[3], cards=r[4], placed_at=r[5], started_at=r[6],
            ended_at=r[7], exit_reason=r[8], exit_code=r[9], detail=r[10], card_hours=r[11], energy_cny=r[12],
            breakdown=_BREAKDOWN.decode(r[13]) if r[13] else None,
        ))
    return out


def record_event(
    db: sqlite_utils.Database,
    job_id: str,
    attempt: int,
    seq: int,
    kind: str,
    body_json: str | bytes,
    now: float,
    *,
    site: str = "",
) -> bool:
    """Store one agent event; False if ``job:attempt:site:seq`` was stored before (apply it only on True)."""
    body = body_json.decode() if isinstance(body_json, bytes) else body_json
    with transaction(db):
        cur = db.conn.execute(
            "INSERT INTO job_events (job_id, attempt, site, seq, kind, body, at) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (job_id, attempt, site, seq) DO NOTHING",
            (job_id, attempt, site, seq, kind, body, now),
        )
    return cur.rowcount == 1


HUB_EVENT_SITE = "(hub)"
"""The ``site`` of events the hub writes into a job's history itself (never a valid site id)."""


def record_hub_event(db: sqlite_utils.Database, job_id: str, attempt: int, kind: str, body: dict[str, Any],
                     now: float) -> None:
    """Add a hub-made event to a job's history (a refused start, a vanished attempt, why it cannot
    be placed), numbered after the hub's earlier events of that attempt."""
    with transaction(db):
        (seq,) = db.conn.execute(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM job_events WHERE job_id = ? AND attempt = ? AND site = ?",
            (job_id, attempt, HUB_EVENT_SITE)).fetchone()
        full = {"type": kind, "job": job_id, "attempt": attempt, "seq": seq, "site": HUB_EVENT_SITE, "at": now, **body}
        db.conn.execute(
            "INSERT INTO job_events (job_id, attempt, site, seq, kind, body, at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (job_id, attempt, HUB_EVENT_SITE, seq, kind, _encode(full), now))


def attempt_pools(db: sqlite_utils.Database, keys: Iterable[tuple[str, int]]) -> dict[tuple[str, int], str]:
    """Where each of ``keys`` (job, attempt) was placed; attempts the hub never placed are absent."""
    out: dict[tuple[str, int], str] = {}
    keys = list(keys)
    for i in range(0, len(keys), 400):  # SQLite's bound-parameter limit
        chunk = keys[i:i + 400]
        where = " OR ".join("(job_id = ? AND attempt = ?)" for _ in chunk)
        params = [v for k in chunk for v in k]
        for job_id, attempt, pool in db.conn.execute(
                f"SELECT job_id, attempt, pool FROM attempts WHERE {where}", params):  # noqa: S608 (placeholders only)
            out[(job_id, attempt)] = pool
    return out


def events(db: sqlite_utils.Database, job_id: str) -> list[EventRow]:
    """A job's events in order (attempt, then seq)."""
    rows = db.conn.execute(
        "SELECT job_id, attempt, seq, kind, body, at FROM job_events WHERE job_id = ? ORDER BY attempt, at, seq",
        (job_id,),
    )
    return [EventRow(job_id=r[0], attempt=r[1], seq=r[2], kind=r[3], body=json.loads(r[4]), at=r[5]) for r in rows]


def record_placements(
    db: sqlite_utils.Database,
    placed: Iterable[tuple[lifecycle.JobRecord, Placed]],
    now: float,
) -> int:
    """Persist one scheduler tick's placements in one transaction: each job's new lifecycle record
    (from ``lifecycle.place``), its placement explanation, and its new attempt row.

    The explanation's ``breakdown``, if any, is also kept on the attempt.
    Returns the number of jobs written. Raises NotFound/Conflict (and writes nothing) if a job is
    missing or its attempt exists already.
    """
    rows = []
    attempt_rows = []
    for rec, placement in placed:
        breakdown = placement.breakdown
        rows.append([*_record_args(rec), _encode(placement), rec.id])
        attempt_rows.append((rec.id, rec.attempt, rec.pool, rec.accelerator, rec.cards, now,
                             _encode(breakdown) if breakdown else None))
    if not rows:
        return 0
    with transaction(db):
        conn = db.conn
        # executemany: one statement prepared once; rowcount sums, so a shortfall names the culprit
        cur = conn.executemany(_RECORD_SQL + ", placement = ? WHERE id = ?", rows)
        if cur.rowcount != len(rows):
            missing = [r[-1] for r in rows if not conn.execute("SELECT 1 FROM jobs WHERE id = ?", (r[-1],)).fetchone()]
            raise NotFound(f"job(s) {missing} not found", field="job_id")
        cur = conn.executemany(
            "INSERT INTO attempts (job_id, attempt, pool, accelerator, cards, placed_at, breakdown) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (job_id, attempt) DO NOTHING",
            attempt_rows,
        )
        if cur.rowcount != len(attempt_rows):
            raise Conflict(f"{len(attempt_rows) - cur.rowcount} attempt(s) exist already", field="attempt")
    return len(rows)


Wait = tuple[str, int, str]
"""(job id, attempt, why it waits): a job waiting after that attempt (0: never placed yet)."""


def apply_waits(db: sqlite_utils.Database, waits: Iterable[Wait]) -> list[Wait]:
    """Set why each job waits, if it still waits after that attempt, in the caller's transaction
    (``db.derived``: a reason is derived state, not a change of the job, so ``updated_at`` stays).

    Returns the waits that matched no waiting job here (not yet here, or no longer waiting)."""
    waits = list(waits)
    current: dict[str, tuple[int, str, str]] = {}
    for i in range(0, len(waits), 400):  # SQLite's bound-parameter limit
        ids = [w[0] for w in waits[i:i + 400]]
        for job_id, attempt, state, reason in db.conn.execute(
                f"SELECT id, attempt, state, reason FROM jobs WHERE id IN ({', '.join('?' for _ in ids)})", ids):
            current[job_id] = (attempt, state, reason)
    unmatched: list[Wait] = []
    changed: list[tuple[str, str]] = []
    for job_id, attempt, reason in waits:
        here = current.get(job_id)
        if here is None or here[0] != attempt or here[1] not in _WAITING:
            unmatched.append((job_id, attempt, reason))
        elif here[2] != reason:
            changed.append((reason, job_id))
    if changed:
        db.conn.executemany("UPDATE jobs SET reason = ? WHERE id = ?", changed)
    return unmatched


def waiting_reasons(db: sqlite_utils.Database) -> list[Wait]:
    """Why every waiting job waits, as this process last said or heard it."""
    marks = ", ".join("?" for _ in _WAITING)
    return [(r[0], r[1], r[2]) for r in db.conn.execute(
        f"SELECT id, attempt, reason FROM jobs WHERE state IN ({marks}) AND reason != ''", sorted(_WAITING))]


def usage_by_tenant(db: sqlite_utils.Database, tenant: str) -> dict[str, Any]:
    """Training usage of a tenant: jobs, ended attempts, card-hours and energy cost (CNY)."""
    jobs_n, hours, energy = db.conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(card_hours), 0), COALESCE(SUM(energy_cny), 0) FROM jobs WHERE tenant = ?",
        (tenant,),
    ).fetchone()
    (attempts_n,) = db.conn.execute(
        "SELECT COUNT(*) FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE j.tenant = ? AND a.ended_at IS NOT NULL",
        (tenant,),
    ).fetchone()
    return {"jobs": jobs_n, "attempts": attempts_n, "card_hours": float(hours), "energy_cny": float(energy)}
