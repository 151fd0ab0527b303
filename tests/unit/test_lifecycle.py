"""The job lifecycle: the transition table, attempt fencing, retry budgets, metering effects."""

from __future__ import annotations

import pytest

from controlplane.core import lifecycle as lc
from controlplane.core.errors import Conflict
from controlplane.core.lifecycle import JobEvent as E
from controlplane.core.lifecycle import JobState as S
from edge_agent import wire

T0 = 1_700_000_000.0


def job(**kw: object) -> lc.JobRecord:
    base: dict[str, object] = {"id": "j1", "tenant": "acme", "cards": 8}
    base.update(kw)
    return lc.JobRecord(**base)  # type: ignore[arg-type]


def started(rec: lc.JobRecord, at: float, seq: int = 1, attempt: int | None = None, site: str = "p1") -> lc.Outcome:
    return lc.apply_event(rec, wire.AttemptStarted(job=rec.id, attempt=attempt or rec.attempt, seq=seq, site=site, at=at))


def exited(rec: lc.JobRecord, at: float, reason: str, *, attempt: int | None = None, code: int | None = None,
           detail: str = "") -> lc.Outcome:
    return lc.apply_event(rec, wire.AttemptExited(job=rec.id, attempt=attempt or rec.attempt, seq=9, site=rec.pool,
                                                  at=at, reason=reason, exit_code=code, detail=detail))  # type: ignore[arg-type]


def running(**kw: object) -> lc.JobRecord:
    """A job placed on p1 at T0 and running since T0 + 60."""
    rec = lc.place(job(**kw), "p1", "A800", T0)
    rec = lc.dispatched(rec, T0 + 1)
    return started(rec, T0 + 60).record


# --------------------------------------------------------------------------- the table


LEGAL = [(s, e, t) for s, out in lc.TRANSITIONS.items() for e, t in out.items()]


@pytest.mark.parametrize(("state", "event", "target"), LEGAL)
def test_every_edge_of_the_table_is_taken_by_transition(state: S, event: E, target: S) -> None:
    assert lc.transition(state, event) is target


ILLEGAL = [(s, e) for s in S for e in E if e not in lc.TRANSITIONS[s]]


@pytest.mark.parametrize(("state", "event"), ILLEGAL)
def test_illegal_transition_names_state_and_event(state: S, event: E) -> None:
    with pytest.raises(lc.IllegalTransition) as info:
        lc.transition(state, event)
    assert info.value.state is state and info.value.event is event
    assert state.value in str(info.value) and event.value in str(info.value)
    assert isinstance(info.value, Conflict) and info.value.status == 409


def test_terminal_states_have_no_way_out_and_every_other_state_can_be_cancelled() -> None:
    assert lc.TERMINAL == {S.SUCCEEDED, S.FAILED, S.CANCELLED}
    for state in S:
        if state not in lc.TERMINAL:
            assert lc.transition(state, E.CANCEL) is S.CANCELLED


# --------------------------------------------------------------------------- a job's life


def test_happy_path_places_runs_checkpoints_and_succeeds_with_one_meter() -> None:
    rec = lc.place(job(), "p1", "A800", T0)
    assert (rec.state, rec.attempt, rec.pool) == (S.PLACED, 1, "p1")
    rec = lc.dispatched(rec, T0 + 1)
    assert rec.state is S.STARTING
    out = started(rec, T0 + 60)
    assert out.applied and out.record.state is S.RUNNING and out.record.attempt_since == T0 + 60
    ck = lc.apply_event(out.record, wire.Checkpointed(job="j1", attempt=1, seq=2, site="p1", at=T0 + 3660,
                                                       progress=0.4, checkpoint="s3://ck/1"))
    assert ck.record.state is S.RUNNING
    assert (ck.record.progress, ck.record.checkpoint, ck.record.checkpoint_pool) == (0.4, "s3://ck/1", "p1")
    done = exited(ck.record, T0 + 60 + 2 * 3600, "completed")
    assert done.record.state is S.SUCCEEDED and done.record.progress == 1.0
    (meter,) = done.effects
    assert isinstance(meter, lc.Meter)
    assert meter.card_hours == pytest.approx(8 * 2.0)  # 8 cards from AttemptStarted to exit


def test_started_may_overtake_the_dispatch_ack() -> None:
    rec = lc.place(job(), "p1", "A800", T0)
    rec = started(rec, T0 + 5).record
    assert rec.state is S.RUNNING
    assert lc.dispatched(rec, T0 + 6) is rec  # the late ack changes nothing


# --------------------------------------------------------------------------- fencing


def test_events_of_an_older_attempt_are_stale_and_a_zombie_is_told_to_stop() -> None:
    rec = running()
    lost = lc.infra_failure(rec, T0 + 100, "site p1 lost")
    rec2 = lc.place(lost.record, "p2", "A800", T0 + 101)
    assert rec2.attempt == 2
    out = lc.apply_event(rec2, wire.Checkpointed(job="j1", attempt=1, seq=7, site="p1", at=T0 + 102,
                                                  progress=0.9, checkpoint="s3://zombie"))
    assert out.ignored == "stale_attempt" and out.record is rec2
    assert out.effects == [lc.Stop(job_id="j1", attempt=1, pool="p1", checkpoint=False, reason=out.effects[0].reason)]  # type: ignore[union-attr]
    # a stale exit is ignored without a stop (it has stopped already)
    late = exited(rec2, T0 + 103, "completed", attempt=1)
    assert late.ignored == "stale_attempt" and late.effects == [] and late.record.state is S.PLACED


def test_events_of_the_current_number_after_it_was_lost_are_stale_too() -> None:
    rec = lc.infra_failure(running(), T0 + 100, "site lost").record
    assert rec.state is S.RESTARTING and rec.attempt == 1
    out = exited(rec, T0 + 120, "completed", attempt=1)
    assert out.ignored == "stale_attempt" and out.record.state is S.RESTARTING


def test_events_after_the_end_are_ignored_as_terminal() -> None:
    rec = lc.cancel(running(), T0 + 200).record
    out = exited(rec, T0 + 201, "stopped")
    assert out.ignored == "terminal" and out.record.state is S.CANCELLED


def test_an_event_that_does_not_fit_the_table_is_ignored_not_raised() -> None:
    rec = lc.place(job(), "p1", "A800", T0)
    out = lc.apply_event(rec, wire.Checkpointed(job="j1", attempt=1, seq=2, site="p1", at=T0 + 1,
                                                 progress=0.1, checkpoint="x"))
    assert out.ignored == "illegal" and "placed" in out.detail and out.record is rec


def test_an_event_for_another_job_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="j2"):
        lc.apply_event(running(), wire.AttemptStarted(job="j2", attempt=1, seq=1, site="p1", at=T0))


# --------------------------------------------------------------------------- failures and budgets


def test_user_errors_use_the_retry_budget_then_fail_with_the_reason() -> None:
    rec = running()
    for i in (1, 2):
        out = exited(rec, T0 + 100 * i, "user_error", code=3, detail="loss is NaN")
        assert out.record.state is S.QUEUED and out.record.user_retries == i
        assert any(isinstance(e, lc.Replan) for e in out.effects)
        rec = started(lc.place(out.record, "p1", "A800", T0 + 100 * i + 1), T0 + 100 * i + 2).record
    out = exited(rec, T0 + 999, "user_error", code=3, detail="loss is NaN")
    assert out.record.state is S.FAILED
    assert "code 3" in out.record.reason and "loss is NaN" in out.record.reason and "exhausted" in out.record.reason


def test_infrastructure_failures_do_not_use_the_user_budget_but_a_crash_loop_stops() -> None:
    rec = running(max_infra_restarts=5)
    for i in range(1, 6):
        out = exited(rec, T0 + 1000 * i, "infra_failure", detail="XID 79 on card 3")
        assert out.record.state is S.RESTARTING and out.record.user_retries == 0
        assert out.record.infra_restarts == i and "XID 79" in out.record.reason
        rec = started(lc.place(out.record, "p2", "A800", T0 + 1000 * i + 1), T0 + 1000 * i + 2).record
    out = exited(rec, T0 + 9000, "infra_failure")
    assert out.record.state is S.FAILED and "gave up after 5" in out.record.reason


def test_restart_resumes_from_the_last_checkpoint_and_remembers_where_it_is() -> None:
    rec = running()
    rec = lc.apply_event(rec, wire.Checkpointed(job="j1", attempt=1, seq=2, site="p1", at=T0 + 500,
                                                 progress=0.3, checkpoint="ck-1")).record
    out = lc.infra_failure(rec, T0 + 900, "site lost", attempt=1)
    assert out.record.state is S.RESTARTING
    assert (out.record.progress, out.record.checkpoint, out.record.checkpoint_pool) == (0.3, "ck-1", "p1")
    meter = next(e for e in out.effects if isinstance(e, lc.Meter))
    assert (meter.start_at, meter.end_at) == (T0 + 60, T0 + 900)
    assert lc.infra_failure(out.record, T0 + 901, "again", attempt=1).ignored == "stale_attempt"


def test_cancel_stops_a_live_attempt_without_checkpoint_and_bills_it() -> None:
    out = lc.cancel(running(), T0 + 3660)
    assert out.record.state is S.CANCELLED
    stop = next(e for e in out.effects if isinstance(e, lc.Stop))
    assert (stop.attempt, stop.pool, stop.checkpoint) == (1, "p1", False)
    meter = next(e for e in out.effects if isinstance(e, lc.Meter))
    assert meter.card_hours == pytest.approx(8.0)
    queued = lc.cancel(job(), T0)
    assert queued.record.state is S.CANCELLED and queued.effects == []
    with pytest.raises(lc.IllegalTransition, match="cancel a job that is cancelled"):
        lc.cancel(out.record, T0 + 3661)


def test_preemption_checkpoints_then_requeues_when_the_attempt_stops() -> None:
    rec = running()
    (stop,) = lc.preempt(rec, "preempted for j9")
    assert isinstance(stop, lc.Stop) and stop.checkpoint and stop.attempt == 1
    out = exited(rec, T0 + 700, "stopped", detail="preempted for j9")
    assert out.record.state is S.QUEUED and out.record.user_retries == 0 and out.record.infra_restarts == 0
    with pytest.raises(lc.IllegalTransition):
        lc.preempt(out.record, "nothing to stop")


def test_place_is_only_legal_from_the_queue() -> None:
    with pytest.raises(lc.IllegalTransition, match="cannot place a job that is running"):
        lc.place(running(), "p2", "A800", T0)
