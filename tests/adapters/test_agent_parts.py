"""The agent's plain parts without NATS: inventory, outbox journal, sim words, checkpoint protocol,
and the sim executor's timing model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent import wire
from edge_agent.backends.sim import sim_words
from edge_agent.executors import EventSink
from edge_agent.executors.process import parse_line
from edge_agent.executors.sim import SimExecutor
from edge_agent.inventory import READY, Inventory, ServiceTimes
from edge_agent.outbox import Outbox


def test_inventory_slots_spread_and_refuse() -> None:
    inv = Inventory({"H20": 2, "910B": 1})
    a = inv.add_replica("m", "d1", 1.0, 2)
    b = inv.add_replica("m", "d2", 1.0, 1)
    assert a and b and a.accelerator == "H20" and b.accelerator in {"H20", "910B"}
    assert inv.acquire_slot("m") == (None, "unknown_model")  # both still loading
    a.state = b.state = READY
    taken = [inv.acquire_slot("m")[0] for _ in range(3)]
    assert sorted(r.deployment for r in taken if r) == ["d1", "d1", "d2"]
    assert inv.acquire_slot("m") == (None, "busy")
    assert inv.inflight() == 3
    Inventory.release_slot(a)
    assert inv.acquire_slot("m")[0] is a
    assert inv.add_replica("x", "d", 1.5, 1) is None  # 1 card left in all, split over two types
    # The hub may name the accelerator: only that type's free cards count.
    assert inv.add_replica("y", "d", 0.5, 1, accelerator="910B") is None  # d2 holds the only 910B
    fresh = Inventory({"H20": 4, "910B": 1})
    on = fresh.add_replica("y", "d", 0.5, 1, accelerator="910B")
    assert on is not None and on.accelerator == "910B"
    assert fresh.add_replica("z", "d", 1.0, 1, accelerator="910B") is None  # H20's room does not help
    assert fresh.add_replica("z", "d", 1.0, 1, accelerator="A800") is None  # nor an unknown type
    assert not inv.reserve_attempt("j", "A800", 1)
    assert not inv.reserve_attempt("j", "H20", 2)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["rep", "att"]), st.floats(0.1, 3.0)), max_size=30))
def test_inventory_never_overcommits(ops: list[tuple[str, float]]) -> None:
    inv = Inventory({"H20": 4, "910B": 2})
    for i, (kind, cards) in enumerate(ops):
        if kind == "rep":
            inv.add_replica(f"m{i}", "d", round(cards, 2), 1)
        else:
            inv.reserve_attempt(f"j{i}", "H20" if i % 2 else "910B", max(1, int(cards)))
        assert all(v >= 0 for v in inv.free_cards().values())
        used_h20 = sum(r.cards for r in inv.replicas.values() if r.accelerator == "H20") + \
            sum(c for a, c in inv.attempt_cards.values() if a == "H20")
        assert used_h20 <= 4 + 1e-9


def test_service_time_percentiles() -> None:
    times = ServiceTimes(size=100)
    assert times.percentile(0.5) == 0.0
    for v in range(1, 201):  # the ring keeps the last 100: 101..200
        times.add(float(v))
    assert len(times) == 100 and times.percentile(0.5) == 150.0 and times.percentile(0.99) == 199.0


def _ev(job: str, seq: int) -> wire.AttemptStarted:
    return wire.AttemptStarted(job=job, attempt=1, seq=seq, site="s1", at=float(seq))


def test_outbox_journal_survives_restart_and_torn_lines(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    box = Outbox(path)
    for seq in (1, 2, 3):
        box.add(_ev("j", seq))
    box.add(_ev("j", 2))  # the same event twice is one entry
    box.ack("j:1:1")
    with path.open("a") as f:
        f.write('{"op":"add","id":"j:1:9","sub')  # a crash mid-write
    again = Outbox(path)
    assert [e.msg_id for e in again] == ["j:1:2", "j:1:3"] and again.corrupt_lines == 1
    assert wire.event_decoder.decode(again.peek().body) == _ev("j", 2)  # type: ignore[union-attr]
    again.ack("j:1:2")
    again.ack("j:1:3")
    assert len(again) == 0 and path.read_text() == "" and len(Outbox(path)) == 0


def test_sim_words_depend_on_site_and_input() -> None:
    req = wire.InferRequest(request_id="r", model="m", prompt="hi", max_tokens=12)
    assert sim_words("a", req) == sim_words("a", req) and len(sim_words("a", req)) == 12
    assert sim_words("a", req) != sim_words("b", req)
    other = wire.InferRequest(request_id="r2", model="m", prompt="hello", max_tokens=12)
    assert sim_words("a", req) != sim_words("a", other)


@pytest.mark.parametrize(("line", "parsed"), [
    ("CPN_CHECKPOINT /ck/a 0.5", ("checkpoint", "/ck/a", 0.5)),
    ("CPN_PROGRESS 0.25", ("progress", "", 0.25)),
    ("epoch 3 loss 0.1", None),
    ("", None),
])
def test_checkpoint_protocol_lines(line: str, parsed: tuple[str, str, float] | None) -> None:
    assert parse_line(line) == parsed


@pytest.mark.parametrize("line", ["CPN_CHECKPOINT /ck", "CPN_PROGRESS 1.5", "CPN_PROGRESS x", "CPN_CHECKPOINT a b c"])
def test_bad_protocol_lines_are_errors(line: str) -> None:
    with pytest.raises(ValueError):
        parse_line(line)


async def test_sim_attempt_resumes_from_progress_and_pays_restart_and_checkpoint_costs() -> None:
    events: list[wire.AttemptStarted | wire.Checkpointed | wire.AttemptExited] = []
    exited: list[object] = []
    cmd = wire.StartAttempt(job="j", attempt=2, cards=1, accelerator="H20", work_s=100, progress=0.5,
                            resume_from="ck-1", checkpoint_interval_s=20, checkpoint_cost_s=10, restart_s=30,
                            time_scale=1000)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    attempt = await SimExecutor().start(cmd, EventSink("s1", "j", 2, lambda event, _msg_id: events.append(event)), exited.append)
    done = await asyncio.wait_for(attempt.wait(), 5)
    wall_s = loop.time() - t0
    # 30 restart + 50 work + 2 checkpoints x 10 = 100 simulated s = 0.1 wall s at 1000x.
    assert 0.09 <= wall_s < 5.0  # 100 simulated s at 1000x, not 100 s
    assert [type(e).__name__ for e in events] == ["AttemptStarted", "Checkpointed", "Checkpointed", "AttemptExited"]
    assert isinstance(events[0], wire.AttemptStarted) and events[0].resumed_from == "ck-1"
    assert [e.progress for e in events if isinstance(e, wire.Checkpointed)] == [0.7, 0.9]
    assert done.reason == "completed" and exited == [attempt]
