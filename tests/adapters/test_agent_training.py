"""Training attempts and their events in JetStream: sim and process executors, the outbox."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import msgspec
import nats

from controlplane.nats.natsserver import NatsServer
from edge_agent import wire
from edge_agent.events import PubAck
from edge_agent.executors.sim import SimAttempt
from tests.support.engines import needs
from tests.support.fakehub import FakeHub, StreamedEvent, agent_config, exit_event, running, wait_for

PYTHON = "/usr/bin/python3"
"""The host's Python: the sandbox's user can run it (a Python under /root or /home is hidden)."""


def process_executor(**overrides: object) -> dict[str, object]:
    """``executors`` of a site that runs allow-listed Python in the bubblewrap sandbox."""
    return {"enabled": ["sim", "process"], "process": {"commands": [PYTHON], **overrides}}


sandboxed = needs("bwrap", package="bubblewrap")


def _kinds(events: list[StreamedEvent], job: str | None = None) -> list[str]:
    return [type(e.event).__name__ for e in events if job is None or e.event.job == job]


async def test_sim_attempt_runs_to_completion_with_checkpoints(nats_server: NatsServer, tmp_path: Path) -> None:
    async with FakeHub(nats_server.url) as hub:
        await hub.create_stream()
        async with running(agent_config(nats_server.url, data_dir=str(tmp_path / "agent"))) as agent:
            await asyncio.wait_for(agent.registered.wait(), 5)
            # 100 simulated seconds at 200x: 0.5 s of wall time, a checkpoint every 30 s of work.
            start = wire.StartAttempt(job="job-1", attempt=1, cards=2, accelerator="H20", executor="sim",
                                      work_s=100, checkpoint_interval_s=30, checkpoint_cost_s=2, time_scale=200)
            assert isinstance(await hub.command("edge-a", start), wire.Ack)
            again = await hub.command("edge-a", start)
            assert isinstance(again, wire.Ack) and "already running" in again.detail
            hb = await hub.wait_heartbeat("edge-a", lambda hb: bool(hb.attempts), what="the attempt in heartbeats")
            assert hb.free_cards["H20"] == 4 - 0.5 - 2 and hb.attempts[0].job == "job-1"

            events = await hub.wait_events(lambda ev: exit_event(ev, "job-1") is not None, what="the exit")
            assert _kinds(events) == ["AttemptStarted", "Checkpointed", "Checkpointed", "Checkpointed", "AttemptExited"]
            assert [e.msg_id for e in events] == [f"job-1:1:{seq}" for seq in range(1, 6)]
            assert [e.event.seq for e in events] == [1, 2, 3, 4, 5]
            assert all(e.subject == wire.event_subject("edge-a") for e in events)
            progress = [e.event.progress for e in events if isinstance(e.event, wire.Checkpointed)]
            assert progress == [0.3, 0.6, 0.9]
            exited = exit_event(events, "job-1")
            assert exited is not None and exited.reason == "completed" and exited.progress == 1.0
            ats = [e.event.at for e in events]
            assert ats == sorted(ats)
            await hub.wait_heartbeat("edge-a", lambda hb: not hb.attempts and hb.free_cards["H20"] == 3.5,
                                     what="cards released")
            # A resent StartAttempt for a finished attempt does not run it again.
            done = await hub.command("edge-a", start)
            assert isinstance(done, wire.Ack) and "already exited" in done.detail
            assert len(agent.outbox) == 0


async def test_duplicate_event_publish_is_deduplicated_by_msg_id(nats_server: NatsServer) -> None:
    async with FakeHub(nats_server.url) as hub:
        await hub.create_stream()
        nc = await nats.connect(nats_server.url)
        try:
            body = wire.encode(wire.AttemptStarted(job="j", attempt=1, seq=1, site="edge-a", at=1.0))
            headers = {"Nats-Msg-Id": wire.event_msg_id("j", 1, 1)}
            first = await nc.request(wire.event_subject("edge-a"), body, timeout=2, headers=headers)
            second = await nc.request(wire.event_subject("edge-a"), body, timeout=2, headers=headers)
            acks = [msgspec.json.decode(m.data, type=PubAck) for m in (first, second)]
            assert [(a.seq, a.duplicate) for a in acks] == [(1, False), (1, True)]
        finally:
            await nc.close()
        assert [e.msg_id for e in await hub.stream_events()] == ["j:1:1"]

        # The agent resending an event whose ack it lost (e.g. killed after JetStream stored it).
        async with running(agent_config(nats_server.url)) as agent:
            agent._emit(wire.AttemptStarted(job="j", attempt=1, seq=1, site="edge-a", at=1.0))
            await wait_for(lambda: agent.events.counters["duplicates"] == 1, 5, "a duplicate PubAck")
            assert len(agent.outbox) == 0
        assert [e.msg_id for e in await hub.stream_events()] == ["j:1:1"]


async def test_another_publisher_cannot_pre_empt_an_attempts_event_ids(nats_server: NatsServer) -> None:
    """All sites share one stream and de-duplication looks at Nats-Msg-Id alone, which any publisher
    may set. Without an event key, junk published first under an attempt's predictable ids makes
    JetStream drop the genuine events (and the agent raises the alarm); with the key the hub sends,
    the ids cannot be worked out and every event is stored."""
    fast = dict(cards=1, accelerator="H20", executor="sim", work_s=100, checkpoint_interval_s=50, time_scale=500)
    async with FakeHub(nats_server.url) as hub:
        await hub.create_stream()
        rogue = await nats.connect(nats_server.url)
        try:
            for job in ("plain", "keyed"):
                for seq in range(1, 6):  # a site publishing on its own subject, under ids it guessed
                    junk = wire.encode(wire.AttemptStarted(job=job, attempt=1, seq=seq, site="rogue", at=1.0))
                    await rogue.request(wire.event_subject("rogue"), junk, timeout=2,
                                        headers={"Nats-Msg-Id": wire.event_msg_id(job, 1, seq)})
        finally:
            await rogue.close()
        async with running(agent_config(nats_server.url)) as agent:
            await asyncio.wait_for(agent.registered.wait(), 5)
            assert isinstance(await hub.command("edge-a", wire.StartAttempt(job="plain", attempt=1, **fast)), wire.Ack)
            await wait_for(lambda: agent.events.counters["id_collisions"] >= 3 and not agent.training.attempts, 10,
                           "the agent noticing its events were taken")
            assert not [e for e in await hub.stream_events() if e.subject == wire.event_subject("edge-a")]

            key = "k3y-only-edge-a-knows"
            start = wire.StartAttempt(job="keyed", attempt=1, event_key=key, **fast)
            assert isinstance(await hub.command("edge-a", start), wire.Ack)
            events = await hub.wait_events(lambda ev: exit_event(ev, "keyed") is not None, what="the keyed attempt's exit")
            mine = [e for e in events if e.subject == wire.event_subject("edge-a")]
            assert _kinds(mine) == ["AttemptStarted", "Checkpointed", "AttemptExited"]
            assert [e.msg_id for e in mine] == [wire.event_msg_id("keyed", 1, seq, key) for seq in (1, 2, 3)]
            assert all(e.msg_id.startswith(f"keyed:1:{e.event.seq}:") for e in mine)
            assert agent.events.counters["id_collisions"] == 3  # none more


async def test_fail_now_is_an_infra_failure_and_higher_attempt_supersedes(nats_server: NatsServer) -> None:
    async with FakeHub(nats_server.url) as hub:
        await hub.create_stream()
        async with running(agent_config(nats_server.url)) as agent:
            slow = dict(cards=1, accelerator="H20", executor="sim", work_s=3600, checkpoint_interval_s=600,
                        time_scale=1.0)
            assert isinstance(await hub.command("edge-a", wire.StartAttempt(job="jf", attempt=1, **slow)), wire.Ack)
            attempt = agent.training.attempts["jf"]
            assert isinstance(attempt, SimAttempt)
            attempt.fail_now("card 3 ECC error")
            events = await hub.wait_events(lambda ev: exit_event(ev, "jf") is not None, what="the failure")
            exited = exit_event(events, "jf")
            assert exited is not None and exited.reason == "infra_failure" and "ECC" in exited.detail

            assert isinstance(await hub.command("edge-a", wire.StartAttempt(job="js", attempt=1, **slow)), wire.Ack)
            stale = await hub.command("edge-a", wire.StartAttempt(job="js", attempt=0, **slow))
            assert isinstance(stale, wire.ErrorReply) and stale.code == "stale_attempt"
            newer = await hub.command("edge-a", wire.StartAttempt(job="js", attempt=2, progress=0.5,
                                                                   resume_from="sim://x", **slow))
            assert isinstance(newer, wire.Ack)
            events = await hub.wait_events(lambda ev: len(_kinds(ev, "js")) >= 3, what="supersede events")
            js_events = [e for e in events if e.event.job == "js"]
            assert [e.msg_id for e in js_events] == ["js:1:1", "js:1:2", "js:2:1"]
            old_exit = js_events[1].event
            assert isinstance(old_exit, wire.AttemptExited) and old_exit.reason == "stopped"
            assert isinstance(js_events[2].event, wire.AttemptStarted) and js_events[2].event.resumed_from == "sim://x"
            assert agent.training.attempts["js"].attempt == 2

            stop = await hub.command("edge-a", wire.StopAttempt(job="js", attempt=2, checkpoint=True))
            assert isinstance(stop, wire.Ack)
            events = await hub.wait_events(lambda ev: len(_kinds(ev, "js")) >= 5, what="stop events")
            tail = [e.event for e in events if e.event.job == "js"][-2:]
            assert isinstance(tail[0], wire.Checkpointed) and tail[0].progress >= 0.5
            assert isinstance(tail[1], wire.AttemptExited) and tail[1].reason == "stopped"
            unknown = await hub.command("edge-a", wire.StopAttempt(job="nobody", attempt=1))
            assert isinstance(unknown, wire.Ack) and "not running" in unknown.detail
            too_big = await hub.command("edge-a", wire.StartAttempt(job="jb", attempt=1, cards=9, accelerator="H20"))
            assert isinstance(too_big, wire.ErrorReply) and too_big.code == "no_capacity"


async def test_sim_failures_follow_the_failure_rate_deterministically(nats_server: NatsServer) -> None:
    async with FakeHub(nats_server.url) as hub:
        await hub.create_stream()
        async with running(agent_config(nats_server.url)):
            # 3600 failures per card-hour on 2 cards: mean time to failure 0.5 simulated s.
            for job in ("jr-a", "jr-b"):
                cmd = wire.StartAttempt(job="jr", attempt=1 if job == "jr-a" else 2, cards=2, accelerator="H20",
                                        work_s=1e6, failure_rate_per_card_hour=3600, time_scale=10, seed=7)
                assert isinstance(await hub.command("edge-a", cmd), wire.Ack)
                await hub.wait_events(lambda ev: any(isinstance(e.event, wire.AttemptExited) and
                                                     e.event.attempt == cmd.attempt for e in ev),
                                      what="a drawn failure")
            exits = [e.event for e in await hub.stream_events() if isinstance(e.event, wire.AttemptExited)]
            assert [x.reason for x in exits] == ["infra_failure", "infra_failure"]
            assert all("failure rate" in x.detail for x in exits)


TRAIN_OK = """
import os, pathlib, sys
ckdir = pathlib.Path(os.environ["CPN_CHECKPOINT_DIR"])
print("job", os.environ["CPN_JOB_ID"], "attempt", os.environ["CPN_ATTEMPT"],
      "resume", repr(os.environ["CPN_RESUME_FROM"]), flush=True)
for i in (1, 2):
    p = ckdir / f"step-{i}.ckpt"
    p.write_text(str(i))
    print(f"CPN_PROGRESS {i * 0.25}", flush=True)
    print(f"CPN_CHECKPOINT {p} {i * 0.5}", flush=True)
print("CPN_CHECKPOINT broken-line", flush=True)
"""

TRAIN_FAIL = """
import sys
print("CPN_CHECKPOINT rel/ck-1 0.2", flush=True)
print("loading data", file=sys.stderr)
print("ValueError: bad learning rate", file=sys.stderr)
sys.exit(3)
"""

TRAIN_HANG = """
import signal, sys, time
def on_term(*_):
    print("CPN_CHECKPOINT final.ckpt 0.4", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print("CPN_PROGRESS 0.1", flush=True)
while True:
    time.sleep(0.05)
"""


@sandboxed
async def test_process_attempts_complete_fail_and_stop(nats_server: NatsServer, tmp_path: Path) -> None:
    data = tmp_path / "agent"
    async with FakeHub(nats_server.url) as hub:
        await hub.create_stream()
        cfg = agent_config(nats_server.url, data_dir=str(data), executors=process_executor(grace_s=2.0))
        async with running(cfg) as agent:
            ok = wire.StartAttempt(job="pj", attempt=1, cards=1, accelerator="H20", executor="process",
                                   command=[PYTHON, "-c", TRAIN_OK], resume_from="/ck/old")
            assert isinstance(await hub.command("edge-a", ok), wire.Ack)
            fail = wire.StartAttempt(job="pf", attempt=1, cards=1, accelerator="H20", executor="process",
                                     command=[PYTHON, "-c", TRAIN_FAIL])
            assert isinstance(await hub.command("edge-a", fail), wire.Ack)
            events = await hub.wait_events(lambda ev: exit_event(ev, "pj") is not None and exit_event(ev, "pf") is not None,
                                           what="both processes to exit")
            pj = [e.event for e in events if e.event.job == "pj"]
            assert [type(e).__name__ for e in pj] == ["AttemptStarted", "Checkpointed", "Checkpointed", "AttemptExited"]
            ckpts = [e for e in pj if isinstance(e, wire.Checkpointed)]
            assert [c.progress for c in ckpts] == [0.5, 1.0]
            assert ckpts[0].checkpoint == str(data / "checkpoints" / "pj" / "step-1.ckpt")
            assert Path(ckpts[1].checkpoint).read_text() == "2"
            exit_ok = pj[-1]
            assert isinstance(exit_ok, wire.AttemptExited) and exit_ok.reason == "completed" and exit_ok.exit_code == 0

            pf = exit_event(events, "pf")
            assert pf is not None and pf.reason == "user_error" and pf.exit_code == 3
            assert "exit code 3" in pf.detail and "ValueError: bad learning rate" in pf.detail
            pf_ck = [e.event for e in events if e.event.job == "pf" and isinstance(e.event, wire.Checkpointed)]
            assert pf_ck[0].checkpoint == str(data / "checkpoints" / "pf" / "rel" / "ck-1")

            hang = wire.StartAttempt(job="ph", attempt=1, cards=1, accelerator="H20", executor="process",
                                     command=[PYTHON, "-u", "-c", TRAIN_HANG])
            assert isinstance(await hub.command("edge-a", hang), wire.Ack)
            handle = agent.training.attempts["ph"]
            # CPN_PROGRESS reaches the heartbeats (and tells us its SIGTERM handler is in place).
            await hub.wait_heartbeat("edge-a", lambda hb: any(a.job == "ph" and a.progress == 0.1 for a in hb.attempts),
                                     what="progress 0.1 of ph")
            assert isinstance(await hub.command("edge-a", wire.StopAttempt(job="ph", attempt=1)), wire.Ack)
            events = await hub.wait_events(lambda ev: exit_event(ev, "ph") is not None, what="the stop")
            ph = [e.event for e in events if e.event.job == "ph"]
            assert isinstance(ph[1], wire.Checkpointed) and ph[1].progress == 0.4  # it checkpointed on SIGTERM
            stopped = exit_event(events, "ph")
            assert stopped is not None and stopped.reason == "stopped"
            assert handle.done and getattr(handle, "protocol_errors") == 0
            assert agent.training.attempts == {}
            missing = wire.StartAttempt(job="pm", attempt=1, cards=1, accelerator="H20", executor="process",
                                        command=["/nonexistent/train"])
            reply = await hub.command("edge-a", missing)
            assert isinstance(reply, wire.ErrorReply) and reply.code == "not_allowed", reply
            assert "'/nonexistent/train' is not allowed" in reply.message and PYTHON in reply.message
            assert "pm" not in agent.training.attempts and agent.inventory.free_cards()["H20"] == 3.5


@sandboxed
async def test_stop_kills_a_process_that_ignores_sigterm(nats_server: NatsServer, tmp_path: Path) -> None:
    # It says "progress 0.1" once its SIGTERM handler is in place: the test waits for that, not a while.
    stubborn = ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('CPN_PROGRESS 0.1', flush=True)\n"
                "time.sleep(60)\n")
    async with FakeHub(nats_server.url) as hub:
        await hub.create_stream()
        cfg = agent_config(nats_server.url, data_dir=str(tmp_path / "a"), executors=process_executor(grace_s=0.3))
        async with running(cfg) as agent:
            cmd = wire.StartAttempt(job="pk", attempt=1, cards=1, accelerator="H20", executor="process",
                                    command=[PYTHON, "-c", stubborn])
            assert isinstance(await hub.command("edge-a", cmd), wire.Ack)
            pid = getattr(agent.training.attempts["pk"], "pid")
            await hub.wait_heartbeat("edge-a", lambda hb: any(a.job == "pk" and a.progress > 0 for a in hb.attempts),
                                     what="the SIGTERM handler installed (progress 0.1)")
            await hub.command("edge-a", wire.StopAttempt(job="pk", attempt=1))
            events = await hub.wait_events(lambda ev: exit_event(ev, "pk") is not None, what="the kill")
            exited = exit_event(events, "pk")
            assert exited is not None and exited.reason == "stopped" and exited.exit_code == -9
            assert not Path(f"/proc/{pid}").exists()


async def test_events_wait_for_the_stream_and_survive_a_server_restart(nats_server: NatsServer,
                                                                       tmp_path: Path) -> None:
    async with FakeHub(nats_server.url) as hub:
        async with running(agent_config(nats_server.url, data_dir=str(tmp_path / "a"))) as agent:
            # No stream yet: the events wait in the outbox.
            cmd = wire.StartAttempt(job="jw", attempt=1, cards=1, accelerator="H20", work_s=10, time_scale=100,
                                    checkpoint_interval_s=5)
            assert isinstance(await hub.command("edge-a", cmd), wire.Ack)
            await wait_for(lambda: len(agent.outbox) == 3, 5, "started, checkpoint, exited in the outbox")
            await wait_for(lambda: agent.events.counters["retries"] >= 2, 5, "failed publishes")
            assert len(agent.outbox) == 3 and not agent.training.attempts
            await hub.create_stream()
            events = await hub.wait_events(lambda ev: len(ev) == 3, what="the queued events")
            assert [e.msg_id for e in events] == ["jw:1:1", "jw:1:2", "jw:1:3"]
            await wait_for(lambda: len(agent.outbox) == 0, 3, "the outbox to drain")

            # Server down: events produced meanwhile are delivered after it comes back.
            cmd2 = wire.StartAttempt(job="jx", attempt=1, cards=1, accelerator="H20", work_s=1e6)
            assert isinstance(await hub.command("edge-a", cmd2), wire.Ack)
            await hub.wait_events(lambda ev: len(ev) == 4, what="jx started")
            await nats_server.stop()
            await wait_for(lambda: not agent.bus.is_connected, 5, "the disconnect")
            agent.training.attempts["jx"].fail_now("power loss in row 4")  # type: ignore[attr-defined]
            await wait_for(lambda: len(agent.outbox) == 1, 2, "the exit event queued")
            await nats_server.start()
            events = await hub.wait_events(lambda ev: len(ev) == 5, timeout_s=15, what="the exit after restart")
            assert events[-1].msg_id == "jx:1:2" and isinstance(events[-1].event, wire.AttemptExited)


async def test_outbox_file_survives_an_agent_restart(nats_server: NatsServer, tmp_path: Path) -> None:
    data = tmp_path / "agent"
    async with FakeHub(nats_server.url) as hub:
        async with running(agent_config(nats_server.url, data_dir=str(data))) as agent:
            cmd = wire.StartAttempt(job="jo", attempt=1, cards=1, accelerator="H20", work_s=1, time_scale=100)
            assert isinstance(await hub.command("edge-a", cmd), wire.Ack)
            await wait_for(lambda: len(agent.outbox) == 2, 5, "two unsent events")
        # The agent is gone, its events were never acknowledged: a new agent sends them.
        await hub.create_stream()
        async with running(agent_config(nats_server.url, data_dir=str(data))) as agent2:
            events = await hub.wait_events(lambda ev: len(ev) == 2, what="recovered events")
            assert [e.msg_id for e in events] == ["jo:1:1", "jo:1:2"]
            await wait_for(lambda: len(agent2.outbox) == 0, 3, "outbox drained")
        assert (data / "outbox.jsonl").read_text() == ""


@sandboxed
async def test_agent_stop_ends_attempts_as_infra_failure(nats_server: NatsServer, tmp_path: Path) -> None:
    async with FakeHub(nats_server.url) as hub:
        await hub.create_stream()
        cfg = agent_config(nats_server.url, data_dir=str(tmp_path / "a"), executors=process_executor())
        async with running(cfg) as agent:
            cmd = wire.StartAttempt(job="jq", attempt=1, cards=1, accelerator="H20", executor="process",
                                    command=[PYTHON, "-c", "import time; time.sleep(60)"])
            assert isinstance(await hub.command("edge-a", cmd), wire.Ack)
            pid = getattr(agent.training.attempts["jq"], "pid")
            await hub.wait_events(lambda ev: len(ev) == 1, what="started")
            await agent.stop(drain=True)
        assert not Path(f"/proc/{pid}").exists()
        events = await hub.stream_events()
        exited = exit_event(events, "jq")
        assert exited is not None and exited.reason == "infra_failure" and "agent stopping" in exited.detail
