"""store/jobs.py against a real SQLite file: idempotent submission, events applied once,
metering once, a whole plan tick in one transaction, and everything still there after reopening."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controlplane.core import jobspec
from controlplane.core import lifecycle as lc
from controlplane.core.errors import Conflict, NotFound, Unprocessable
from controlplane.core.placement import CostBreakdown
from controlplane.core.scheduler import Explanation
from controlplane.store import db as dbmod
from controlplane.store import jobs
from tests.support.olddb import migrated_before

T0 = 1_700_000_000.0
SPEC = {"name": "llama-ft", "cards": 16, "accelerators": ["A800"], "est_hours": 10, "priority": 2}


BD = CostBreakdown(pool="p1", accelerator="A800", energy_cny=9.0, failure_waste_cny=0.5, move_cny=0.0,
                   total_cny=9.5, start_at=T0, work_s=36_000.0, run_s=37_000.0, interval_s=1800.0, mtbf_h=40.0,
                   waste_fraction=0.03, notes=["deadline at risk"])


def placed(pool: str, **kw: object) -> jobs.Placed:
    return jobs.Placed(pool=pool, explanation=Explanation(chosen=f"{pool}: 9.50 CNY"), **kw)  # type: ignore[arg-type]


def body(**kw: object) -> jobspec.JobSpec:
    return jobspec.decode(json.dumps({**SPEC, **kw}))


def h(spec: jobspec.JobSpec) -> str:
    import hashlib

    return hashlib.sha256(jobspec.encode(spec)).hexdigest()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "cpn.db"


@pytest.fixture
def db(path: Path):  # type: ignore[no-untyped-def]
    d = dbmod.open_db(path)
    yield d
    d.conn.close()


def test_schema_is_durable_wal_full(db) -> None:  # type: ignore[no-untyped-def]
    assert dbmod.pragmas(db) == {"journal_mode": "wal", "synchronous": 2}
    assert {"jobs", "attempts", "job_events", "idempotency"} <= set(db.table_names())


def test_same_key_same_body_replays_the_first_answer(db) -> None:  # type: ignore[no-untyped-def]
    first, replayed = jobs.create_job(db, "acme", body(), "k1", h(body()), T0)
    assert not replayed and first.state == "queued" and first.cards == 16 and first.priority == 2
    assert first.id.startswith("job-") and first.name == "llama-ft"
    jobs.update_job(db, first.id, T0 + 5, state="placed", pool="p1")  # the job moves on ...
    again, replayed = jobs.create_job(db, "acme", body(), "k1", h(body()), T0 + 10)
    assert replayed and again == first  # ... the replay is the first answer, not the current state
    assert len(jobs.list_jobs(db, "acme")) == 1


def test_same_key_other_body_is_a_422_naming_the_header(db) -> None:  # type: ignore[no-untyped-def]
    jobs.create_job(db, "acme", body(), "k1", h(body()), T0)
    other = body(cards=32)
    with pytest.raises(Unprocessable) as info:
        jobs.create_job(db, "acme", other, "k1", h(other), T0 + 1)
    assert info.value.status == 422 and info.value.field == "Idempotency-Key"
    assert len(jobs.list_jobs(db, "acme")) == 1


def test_keys_are_per_tenant_and_requests_without_a_key_always_create(db) -> None:  # type: ignore[no-untyped-def]
    a, _ = jobs.create_job(db, "acme", body(), "k1", h(body()), T0)
    b, replayed = jobs.create_job(db, "globex", body(), "k1", h(body()), T0)
    assert not replayed and a.id != b.id
    jobs.create_job(db, "acme", body(), None, h(body()), T0 + 1)
    jobs.create_job(db, "acme", body(), None, h(body()), T0 + 2)
    assert len(jobs.list_jobs(db, "acme")) == 3


@pytest.mark.parametrize(
    ("text", "field"),
    [("not json", "body"), ("[1]", "body"), (json.dumps({**SPEC, "cards": "8"}), "cards"),
     (json.dumps({**SPEC, "priority": 1.5}), "priority"), (json.dumps({"cards": 8}), "accelerators"),
     (json.dumps({**SPEC, "accelerators": [3]}), "accelerators")],
)
def test_a_bad_spec_is_refused_naming_the_field(text: str, field: str) -> None:
    with pytest.raises(Unprocessable) as info:
        jobspec.decode(text)
    assert info.value.field == field


def test_a_spec_without_cards_is_refused_and_nothing_is_stored(db) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(Unprocessable) as info:
        jobs.create_job(db, "acme", body(cards=0), "k", h(body(cards=0)), T0)
    assert info.value.field == "cards"
    assert db.conn.execute("SELECT COUNT(*) FROM idempotency").fetchone()[0] == 0


def test_the_spec_is_stored_as_msgspec_json_and_read_back_typed(db) -> None:  # type: ignore[no-untyped-def]
    spec = body(regions=["ningxia"], deadline=T0 + 3600, command=["python", "train.py"])
    job, _ = jobs.create_job(db, "acme", spec, None, "x", T0)
    (text,) = db.conn.execute("SELECT spec FROM jobs WHERE id = ?", (job.id,)).fetchone()
    assert text == jobspec.encode(spec).decode()
    got = jobs.get_job(db, job.id)
    assert got is not None and got.spec == spec and isinstance(got.spec, jobspec.JobSpec)
    assert got.state is lc.JobState.QUEUED and got.spec.workload == "process"
    assert [j.state for j in jobs.jobs_in_states(db, [lc.JobState.QUEUED])] == [lc.JobState.QUEUED]


def test_migration_quarantines_stored_specs_that_do_not_decode(tmp_path: Path) -> None:
    """A database from before 0012: a spec the typed decoder cannot read is kept aside, counted in
    the quarantine table, and its job (if still waiting) fails with the reason; good rows are untouched."""
    path = tmp_path / "old.db"
    conn = migrated_before(path, "0012")
    old = [("good", json.dumps(SPEC), "queued"), ("bad-queued", json.dumps({"cards": 4}), "queued"),
           ("bad-done", '{"cards": 4, "accelerators": "A800"}', "succeeded")]
    for jid, text, state in old:
        conn.execute("INSERT INTO jobs (id, tenant, name, spec, state, priority, cards, submitted_at, updated_at) "
                     "VALUES (?, 'acme', 'n', ?, ?, 1, 4, ?, ?)", (jid, text, state, T0, T0))
    conn.execute("INSERT INTO idempotency (tenant, key, body_hash, job_id, status, response, created_at) "
                 "VALUES ('acme', 'k-old', 'h-old', 'bad-queued', 201, ?, ?)",
                 (json.dumps({"id": "bad-queued", "spec": {"cards": 4}, "state": "queued"}), T0))
    conn.close()
    db = dbmod.open_db(path)
    try:
        replay, replayed = jobs.create_job(db, "acme", body(cards=4), "k-old", "h-old", T0 + 1)
        assert replayed and replay.id == "bad-queued"  # the old answer no longer decodes: the job as it is
        got = {j.id: j for j in jobs.list_jobs(db, "acme")}
        assert got["good"].spec == body() and got["good"].state is lc.JobState.QUEUED
        assert got["bad-queued"].state is lc.JobState.FAILED and "unusable" in got["bad-queued"].reason
        assert got["bad-done"].state is lc.JobState.SUCCEEDED
        assert got["bad-queued"].spec.accelerators == () and got["bad-queued"].spec.cards == 4
        kept = dict(db.conn.execute("SELECT job_id, spec FROM job_spec_quarantine").fetchall())
        assert kept == {"bad-queued": json.dumps({"cards": 4}), "bad-done": '{"cards": 4, "accelerators": "A800"}'}
        assert jobs.jobs_in_states(db, [lc.JobState.QUEUED]) == [got["good"]]
    finally:
        db.conn.close()


def test_a_quoted_job_stored_as_a_dict_keeps_its_market_fields_through_0012(tmp_path: Path) -> None:
    """A job the market bound to a quote, stored before specs were typed (a dict with ``pools`` and
    the quote's fields): migration 0012 leaves it alone, it reads back typed with every market field
    (the scheduler keeps it on its pool, billing finds its quote), and its stored idempotent answer
    replays typed through ``idempotent_answer`` (the gateway's first check)."""
    path = tmp_path / "old.db"
    conn = migrated_before(path, "0012")
    quoted = {**SPEC, "quote_id": "q-1", "quote_pool": "hz-edge", "quote_accelerator": "910B", "pools": ["hz-edge"],
              "accelerators": ["910B"]}
    conn.execute("INSERT INTO jobs (id, tenant, name, spec, state, priority, cards, submitted_at, updated_at) "
                 "VALUES ('quoted', 'acme', 'n', ?, 'queued', 2, 16, ?, ?)", (json.dumps(quoted), T0, T0))
    conn.execute("INSERT INTO idempotency (tenant, key, body_hash, job_id, status, response, created_at) "
                 "VALUES ('acme', 'k', 'h', 'quoted', 201, ?, ?)",
                 (json.dumps({"id": "quoted", "tenant": "acme", "name": "n", "spec": quoted, "state": "queued",
                              "priority": 2, "cards": 16, "attempt": 0, "pool": "", "accelerator": "",
                              "progress": 0.0, "checkpoint": "", "checkpoint_pool": "", "user_retries": 0,
                              "infra_restarts": 0, "max_user_retries": 2, "max_infra_restarts": 5,
                              "attempt_since": None, "reason": "", "placement": None, "card_hours": 0.0,
                              "energy_cny": 0.0, "submitted_at": T0, "updated_at": T0, "finished_at": None}), T0))
    conn.close()
    db = dbmod.open_db(path)
    try:
        assert db.conn.execute("SELECT COUNT(*) FROM job_spec_quarantine").fetchone()[0] == 0
        got = jobs.get_job(db, "quoted")
        assert got is not None and got.state is lc.JobState.QUEUED
        s = got.spec
        assert (s.quote_id, s.quote_pool, s.quote_accelerator, s.pools, s.accelerators) == \
            ("q-1", "hz-edge", "910B", ("hz-edge",), ("910B",))
        waiting = s.waiting(id=got.id, tenant=got.tenant, priority=got.priority, submitted_at=got.submitted_at,
                            progress=0.0, checkpoint_pool="", restarting=False)
        assert waiting.pools == ("hz-edge",)
        assert s.public() == {**quoted, "pools": ("hz-edge",), "accelerators": ("910B",),
                              "checkpoint_cost_s": jobspec.DEFAULT_CHECKPOINT_COST_S, "tee": False,
                              "regions": (), "providers": (), "command": (), "est_hours": 10.0}
        replay = jobs.idempotent_answer(db, "acme", "k", "h")
        assert replay is not None and replay.spec == s
        with pytest.raises(Unprocessable) as info:
            jobs.idempotent_answer(db, "acme", "k", "other")
        assert info.value.field == "Idempotency-Key"
        assert jobs.idempotent_answer(db, "acme", "new-key", "h") is None
    finally:
        db.conn.close()


def test_another_tenants_job_is_invisible_and_ids_are_unique(db) -> None:  # type: ignore[no-untyped-def]
    job, _ = jobs.create_job(db, "acme", body(), None, "x", T0, job_id="job-1")
    assert jobs.get_job(db, "job-1", tenant="globex") is None
    assert jobs.get_job(db, "job-1", tenant="acme") == job
    with pytest.raises(Conflict):
        jobs.create_job(db, "acme", body(), None, "x", T0, job_id="job-1")


def test_lifecycle_records_round_trip_and_terminal_states_get_finished_at(db) -> None:  # type: ignore[no-untyped-def]
    job, _ = jobs.create_job(db, "acme", body(), None, "x", T0)
    rec = jobs.load_record(db, job.id)
    assert rec is not None and rec.state is lc.JobState.QUEUED and rec.cards == 16
    rec = lc.place(rec, "p1", "A800", T0 + 1)
    chosen = jobs.Placed(attempt=1, pool="p1", explanation=Explanation(chosen="p1: 12.00 CNY"), breakdown=BD)
    jobs.save_record(db, rec, placement=chosen)
    got = jobs.get_job(db, job.id)
    assert got is not None and got.record() == rec and got.placement == chosen
    assert got.finished_at is None
    done = lc.cancel(rec, T0 + 2).record
    jobs.save_record(db, done)
    assert jobs.get_job(db, job.id).finished_at == T0 + 2  # type: ignore[union-attr]
    with pytest.raises(NotFound):
        jobs.save_record(db, lc.JobRecord(id="nope", tenant="acme", cards=1))


def test_update_job_refuses_unknown_fields_and_missing_jobs(db) -> None:  # type: ignore[no-untyped-def]
    job, _ = jobs.create_job(db, "acme", body(), None, "x", T0)
    with pytest.raises(ValueError, match="tenant"):
        jobs.update_job(db, job.id, T0, tenant="globex")
    with pytest.raises(NotFound):
        jobs.update_job(db, "nope", T0, reason="x")


def test_events_are_applied_once_by_job_attempt_seq(db) -> None:  # type: ignore[no-untyped-def]
    job, _ = jobs.create_job(db, "acme", body(), None, "x", T0)
    ev = '{"kind": "checkpointed", "progress": 0.5}'
    assert jobs.record_event(db, job.id, 1, 1, "attempt_started", "{}", T0)
    assert jobs.record_event(db, job.id, 1, 2, "checkpointed", ev, T0 + 1)
    assert not jobs.record_event(db, job.id, 1, 2, "checkpointed", ev, T0 + 2)  # redelivery
    assert jobs.record_event(db, job.id, 2, 1, "attempt_started", b"{}", T0 + 3)  # same seq, new attempt
    got = [(e.attempt, e.seq, e.kind) for e in jobs.events(db, job.id)]
    assert got == [(1, 1, "attempt_started"), (1, 2, "checkpointed"), (2, 1, "attempt_started")]
    assert jobs.events(db, job.id)[1].body == {"kind": "checkpointed", "progress": 0.5}


def test_metering_is_added_once_per_attempt_and_summed_per_tenant(db) -> None:  # type: ignore[no-untyped-def]
    job, _ = jobs.create_job(db, "acme", body(), None, "x", T0)
    jobs.add_attempt(db, job.id, 1, "p1", "A800", 16, T0, breakdown=BD)
    with pytest.raises(Conflict):
        jobs.add_attempt(db, job.id, 1, "p1", "A800", 16, T0)
    jobs.mark_attempt_started(db, job.id, 1, T0 + 30)
    meter = lc.Meter(job_id=job.id, attempt=1, pool="p1", accelerator="A800", cards=16, start_at=T0 + 30,
                     end_at=T0 + 30 + 2 * 3600)
    assert jobs.end_attempt(db, meter, energy_cny=12.5, exit_reason="infra_failure", detail="XID 79")
    assert not jobs.end_attempt(db, meter, energy_cny=12.5, exit_reason="infra_failure")  # applied once
    jobs.add_attempt(db, job.id, 2, "p2", "A800", 16, T0 + 8000)
    meter2 = lc.Meter(job_id=job.id, attempt=2, pool="p2", accelerator="A800", cards=16, start_at=T0 + 8000,
                      end_at=T0 + 8000 + 3600)
    assert jobs.end_attempt(db, meter2, energy_cny=5.0, exit_reason="completed", exit_code=0)
    a1, a2 = jobs.attempts(db, job.id)
    assert (a1.card_hours, a1.energy_cny, a1.exit_reason, a1.detail) == (32.0, 12.5, "infra_failure", "XID 79")
    assert a1.breakdown == BD and a1.started_at == T0 + 30 and a2.exit_code == 0
    row = jobs.get_job(db, job.id)
    assert row is not None and (row.card_hours, row.energy_cny) == (48.0, 17.5)
    other, _ = jobs.create_job(db, "globex", body(), None, "x", T0)
    assert jobs.usage_by_tenant(db, "acme") == {"jobs": 1, "attempts": 2, "card_hours": 48.0, "energy_cny": 17.5}
    assert jobs.usage_by_tenant(db, "globex") == {"jobs": 1, "attempts": 0, "card_hours": 0.0, "energy_cny": 0.0}


def test_a_plan_tick_is_one_transaction_all_or_nothing(db) -> None:  # type: ignore[no-untyped-def]
    a, _ = jobs.create_job(db, "acme", body(), None, "x", T0)
    b, _ = jobs.create_job(db, "acme", body(), None, "x", T0)
    ra = lc.place(a.record(), "p1", "A800", T0 + 1)
    ghost = lc.place(lc.JobRecord(id="ghost", tenant="acme", cards=1), "p1", "A800", T0 + 1)
    with pytest.raises(NotFound):
        jobs.record_placements(db, [(ra, placed("p1")), (ghost, jobs.Placed())], T0 + 1)
    assert jobs.get_job(db, a.id).state == "queued" and jobs.attempts(db, a.id) == []  # type: ignore[union-attr]
    rb = lc.place(b.record(), "p2", "A800", T0 + 1)
    assert jobs.record_placements(db, [(ra, placed("p1", breakdown=BD)), (rb, placed("p2"))], T0 + 1) == 2
    assert jobs.attempts(db, a.id)[0].breakdown == BD and jobs.attempts(db, b.id)[0].breakdown is None
    assert jobs.get_job(db, a.id).state == "placed" and jobs.attempts(db, a.id)[0].pool == "p1"  # type: ignore[union-attr]
    assert [j.id for j in jobs.jobs_in_states(db, [lc.JobState.PLACED])] == sorted([a.id, b.id], key=lambda i: (T0, i))


def test_waits_are_said_only_to_jobs_still_waiting_after_that_attempt(db) -> None:  # type: ignore[no-untyped-def]
    """A wait reason is derived state (``db.derived``): set only on a job still waiting after the
    attempt it was planned at, without touching ``updated_at``; the others come back unmatched."""
    a, _ = jobs.create_job(db, "acme", body(), None, "x", T0)
    b, _ = jobs.create_job(db, "acme", body(), None, "x", T0)
    jobs.record_placements(db, [(lc.place(b.record(), "p1", "A800", T0 + 1), placed("p1"))], T0 + 1)
    said = [(a.id, 0, "quota"), (a.id, 1, "cards"), (b.id, 0, "quota"), ("job-none", 0, "quota")]
    with dbmod.derived(db):
        unmatched = jobs.apply_waits(db, said)
    assert unmatched == said[1:]  # another attempt; placed, not waiting; not here
    row = jobs.get_job(db, a.id)
    assert row is not None and (row.reason, row.updated_at) == ("quota", a.updated_at)
    assert jobs.waiting_reasons(db) == [(a.id, 0, "quota")]
    with pytest.raises(RuntimeError), dbmod.transaction(db), dbmod.derived(db):
        pass  # never inside another transaction (it could not stay out of the record's batch)


def test_everything_survives_reopening_the_file(path: Path) -> None:
    first = dbmod.open_db(path)
    try:
        job, _ = jobs.create_job(first, "acme", body(), "k1", h(body()), T0)
        rec = lc.place(job.record(), "p1", "A800", T0 + 1)
        jobs.record_placements(first, [(rec, placed("p1", breakdown=BD))], T0 + 1)
        jobs.record_event(first, job.id, 1, 1, "attempt_started", "{}", T0 + 2)
    finally:
        first.conn.close()
    again = dbmod.open_db(path)
    try:
        got = jobs.get_job(again, job.id)
        assert got is not None and got.record() == rec and got.placement == placed("p1", breakdown=BD)
        assert not jobs.record_event(again, job.id, 1, 1, "attempt_started", "{}", T0 + 3)
        replay, replayed = jobs.create_job(again, "acme", body(), "k1", h(body()), T0 + 4)
        assert replayed and replay.id == job.id
        assert jobs.attempts(again, job.id)[0].attempt == 1
    finally:
        again.conn.close()


def test_two_connections_on_one_file_share_idempotency(path: Path) -> None:
    one, two = dbmod.open_db(path), dbmod.open_db(path)
    try:
        a, r1 = jobs.create_job(one, "acme", body(), "k", h(body()), T0)
        b, r2 = jobs.create_job(two, "acme", body(), "k", h(body()), T0)
        assert (r1, r2) == (False, True) and a.id == b.id
    finally:
        one.conn.close()
        two.conn.close()


def test_the_scheduler_bench_persists_every_decision_on_a_small_network(tmp_path: Path) -> None:
    from bench import scheduler as bench

    out = tmp_path / "scheduler.json"
    rc = bench.main(["--pools", "30", "--jobs", "300", "--repeat", "1", "--out", str(out)])
    # 30 pools, cap 32: the capped plan must be the uncapped one
    assert json.loads(out.read_text())["quality"]["capped_over_uncapped"] == pytest.approx(1.0)
    res = json.loads(out.read_text())
    assert rc in (0, 1) and res["pass"]["memory"] is (res["memory"]["decisions_per_s"] >= 5000)
    assert res["memory"]["decisions"] == res["sqlite"]["decisions"] == 300
    assert res["memory"]["starts"] > 0 and res["memory"]["waits"] > 0
    # every start became an attempt row, plus the one-commit-per-decision comparison slice
    assert res["sqlite"]["attempt_rows"] == res["memory"]["starts"] * 2
    # and every job left waiting says why, as the hub's tick says it (derived state)
    assert res["sqlite"]["reasons"] == res["memory"]["waits"] + res["memory"]["infeasible"]


def test_a_placement_on_a_pool_that_declares_no_failures_reads_back(db) -> None:  # type: ignore[no-untyped-def]
    """A pool with ``failure_rate_per_card_hour = 0`` has an infinite MTBF: stored as JSON it came back
    as ``null`` and the job could no longer be read (a ValidationError on every GET)."""
    from controlplane.core import placement

    pool = placement.Pool(id="p0", cards_total={"A800": 16}, cards_free={"A800": 16},
                          failure_rate_per_card_hour=0.0)
    spec = body()
    est = placement.rank(spec.waiting(id="j", tenant="acme", priority=2, submitted_at=T0, progress=0.0,
                                      checkpoint_pool=None, restarting=False),
                         [pool], T0)[0][0]
    assert est.mtbf_h is None
    job, _ = jobs.create_job(db, "acme", spec, "k0", h(spec), T0)
    rec = lc.place(job.record(), "p0", "A800", T0 + 1)
    jobs.record_placements(db, [(rec, placed("p0", breakdown=est))], T0 + 1)
    got = jobs.get_job(db, job.id)
    assert got is not None and got.placement is not None and got.placement.breakdown == est


def test_the_accelerators_waiting_jobs_accept(db) -> None:  # type: ignore[no-untyped-def]
    """What new inference replicas should leave free while cards are lent (autoscale.lending_preference)."""
    a, _ = jobs.create_job(db, "acme", body(accelerators=["A800", "910B"]), None, "", T0)
    jobs.create_job(db, "acme", body(accelerators=["L20"]), None, "", T0)
    c, _ = jobs.create_job(db, "acme", body(accelerators=["H800"]), None, "", T0)
    jobs.update_job(db, c.id, T0 + 1, state="running", pool="p1")  # running: no longer waiting
    assert jobs.accelerators_wanted(db, lc.WAITING) == {"A800", "910B", "L20"}
    jobs.update_job(db, a.id, T0 + 2, state="placed", pool="p1")
    assert jobs.accelerators_wanted(db, lc.WAITING) == {"L20"}
