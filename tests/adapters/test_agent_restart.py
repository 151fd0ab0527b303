"""An agent killed mid-attempt (SIGKILL of a real ``cpn agent`` subprocess) and started again on the
same data dir reports the attempt it lost, with a fresh, valid event id; the attempt journal is
written atomically and privately."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
import textwrap
from pathlib import Path

import msgspec

from controlplane.nats.natsserver import NatsServer
from edge_agent import wire
from edge_agent.attempt_journal import SEQ_BLOCK, AttemptJournal, AttemptRecord
from edge_agent.training import LOST_DETAIL
from tests.support.engines import needs
from tests.support.fakehub import FakeHub, StreamedEvent, wait_for

ROOT = Path(__file__).resolve().parents[2]
KEY = "k-secret-of-attempt-1"


def _start(job: str = "job-r", attempt: int = 1) -> wire.StartAttempt:
    # A long sim attempt checkpointing every 0.1 s of wall time (10 simulated s at 100x).
    return wire.StartAttempt(job=job, attempt=attempt, cards=2, accelerator="H20", executor="sim", work_s=1e6,
                             checkpoint_interval_s=10, time_scale=100, event_key=KEY)


async def _cpn_agent(config: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controlplane.cli", "agent", "--config", str(config), "--log-level", "WARNING",
        cwd=ROOT, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


sandboxed = needs("bwrap", package="bubblewrap")


def _site_config(tmp: Path, url: str) -> Path:
    path = tmp / "site.toml"
    path.write_text(textwrap.dedent(f"""
        site = "kill-site"
        nats = "{url}"
        accelerators = {{ H20 = 4 }}
        heartbeat_s = 0.1
        data_dir = "{tmp / 'data'}"
        [bus]
        reconnect_wait_s = 0.2
        register_backoff_max_s = 0.5
        event_backoff_max_s = 0.3
        [executors]
        enabled = ["sim"]
    """))
    return path


def _of(events: list[StreamedEvent], job: str) -> list[StreamedEvent]:
    return [e for e in events if e.event.job == job]


async def test_sigkilled_agent_reports_its_lost_attempt_after_a_restart(nats_server: NatsServer, tmp_path: Path) -> None:
    config = _site_config(tmp_path, nats_server.url)
    async with FakeHub(nats_server.url) as hub:
        await hub.create_stream()
        proc = await _cpn_agent(config)
        try:
            await wait_for(lambda: hub.registrations_of("kill-site"), 20, "the agent to register")
            assert isinstance(await hub.command("kill-site", _start()), wire.Ack)
            # Past the first block of reserved numbers, so the journal's mark has moved at least once.
            before = await hub.wait_events(lambda ev: len(_of(ev, "job-r")) > SEQ_BLOCK + 2, 20,
                                           "checkpoints of the attempt")
            await hub.wait_heartbeat("kill-site", lambda hb: bool(hb.attempts), what="the attempt running")
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        records = list((tmp_path / "data" / "attempts").glob("*.json"))
        assert [p.name for p in records] == ["job-r.1.json"], "the killed agent left its journal"

        beats = len(hub.heartbeats["kill-site"])
        proc = await _cpn_agent(config)
        try:
            events = await hub.wait_events(
                lambda ev: any(isinstance(e.event, wire.AttemptExited) for e in _of(ev, "job-r")), 20,
                "the lost attempt's exit")
            mine = _of(events, "job-r")
            exited = mine[-1]
            assert isinstance(exited.event, wire.AttemptExited)
            assert (exited.event.reason, exited.event.detail) == ("infra_failure", LOST_DETAIL)
            used = [e.event.seq for e in mine[:-1]]
            assert used == sorted(used) and len(used) >= len(_of(before, "job-r"))
            assert exited.event.seq > max(used), "the exit reused a number an earlier event had"
            # A valid id under the attempt's key: JetStream stored it (not dropped as a duplicate),
            # and the hub, which numbers by job:attempt:seq, records it.
            assert exited.msg_id == wire.event_msg_id("job-r", 1, exited.event.seq, KEY)
            assert len({e.msg_id for e in mine}) == len(mine)
            # The restarted agent does not claim the attempt, and frees its cards.
            hb = await hub.wait_heartbeat("kill-site", lambda hb: hb.seq >= 1 and len(hub.heartbeats["kill-site"]) > beats + 1,
                                          what="heartbeats of the restarted agent")
            assert hb.attempts == [] and hb.free_cards == {"H20": 4.0}
            # The hub resending the start (its Ack was lost with the old process) does not run it again.
            again = await hub.command("kill-site", _start())
            assert isinstance(again, wire.Ack) and "already exited here: infra_failure" in again.detail
            assert not list((tmp_path / "data" / "attempts").glob("*.json"))
        finally:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()


_WRITER = """
import sys
from pathlib import Path
from edge_agent import wire
from edge_agent.attempt_journal import AttemptJournal
journal = AttemptJournal(Path(sys.argv[1]))
journal.begin(wire.StartAttempt(job="job-w", attempt=3, cards=1, accelerator="H20", event_key="k" * 200))
print("ready", flush=True)
seq = 0
while True:
    seq += 1
    journal.reserve("job-w", 3, seq)
    journal.set_state("job-w", 3, {"n": str(seq) * 50})
"""


async def test_journal_records_survive_a_sigkill_mid_write_and_are_private(tmp_path: Path) -> None:
    directory = tmp_path / "attempts"
    for round_ in range(4):
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _WRITER, str(directory), cwd=ROOT,
                                                    stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 20)).strip() == b"ready"
        await asyncio.sleep(0.05 + 0.03 * round_)  # the fault's timing: SIGKILL lands mid-rewrite, at a different point each round
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        journal = AttemptJournal(directory)  # a torn record would be counted here
        assert journal.corrupt == 0 and list(journal.records) == [("job-w", 3)]
        record = journal.records[("job-w", 3)]
        assert record.seq >= SEQ_BLOCK and record.command.event_key == "k" * 200
        assert not list(directory.glob("*.tmp")), "a stray temp file was not cleaned up"
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert stat.S_IMODE(journal.path("job-w", 3).stat().st_mode) == 0o600


def test_journal_reserves_numbers_in_blocks_and_sets_aside_unreadable_records(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        journal = AttemptJournal(tmp_path / "attempts")
        cmd = wire.StartAttempt(job="job-b", attempt=2, cards=1, accelerator="H20", event_key="key")
        journal.begin(cmd)
        assert journal.records[("job-b", 2)].seq == SEQ_BLOCK and journal.writes == 1
        for seq in range(1, SEQ_BLOCK + 1):
            journal.reserve("job-b", 2, seq)
        assert journal.writes == 1  # the first block cost nothing more
        journal.reserve("job-b", 2, SEQ_BLOCK + 1)
        assert journal.writes == 2 and journal.records[("job-b", 2)].seq == 2 * SEQ_BLOCK
        assert stat.S_IMODE(journal.path("job-b", 2).stat().st_mode) == 0o600  # whatever the umask
    finally:
        os.umask(old)
    (tmp_path / "attempts" / "job-x.1.json").write_bytes(b'{"command": {"type": "start_attem')
    (tmp_path / "attempts" / "job-y.1.json").write_bytes(msgspec.json.encode(
        AttemptRecord(command=wire.StartAttempt(job="job-z", attempt=1, cards=1, accelerator="H20"))))
    again = AttemptJournal(tmp_path / "attempts")
    assert again.corrupt == 2 and list(again.records) == [("job-b", 2)]
    assert again.records[("job-b", 2)].command == cmd
    assert sorted(p.name for p in (tmp_path / "attempts").iterdir()) == [
        "job-b.2.json", "job-x.1.json.corrupt", "job-y.1.json.corrupt"]
    again.remove("job-b", 2)
    again.remove("job-b", 2)
    assert not again.path("job-b", 2).exists() and AttemptJournal(tmp_path / "attempts").records == {}


class _ReattachingSim:
    """A sim executor that can find its attempts again after a restart (as a container executor
    finds its container): ``recover`` resumes the journalled attempt without a second start event."""

    name = "sim"

    def __init__(self) -> None:
        from edge_agent.executors.sim import SimExecutor

        self._sim = SimExecutor()
        self.offered: list[AttemptRecord] = []

    async def start(self, command, sink, on_exit):  # type: ignore[no-untyped-def]
        return await self._sim.start(command, sink, on_exit)

    async def recover(self, record, sink, on_exit):  # type: ignore[no-untyped-def]
        from edge_agent.executors.sim import SimAttempt

        self.offered.append(record)
        if record.state.get("findable") != "yes":
            return None
        attempt = SimAttempt(record.command, sink, on_exit)
        attempt._launch(attempt._run())
        return attempt


async def test_an_executor_that_can_reattach_keeps_the_attempt_and_numbers_on(nats_server: NatsServer,
                                                                              tmp_path: Path) -> None:
    from tests.support.fakehub import agent_config, running

    journal = AttemptJournal(tmp_path / "data" / "attempts")
    kept, lost = _start("job-kept"), _start("job-gone")
    journal.begin(kept)
    journal.set_state("job-kept", 1, {"findable": "yes"})
    journal.begin(lost)
    cfg = agent_config(nats_server.url, data_dir=str(tmp_path / "data"), executors={"enabled": ["sim"]})
    async with FakeHub(nats_server.url) as hub:
        await hub.create_stream()
        from edge_agent.agent import Agent

        executor = _ReattachingSim()
        agent = Agent(cfg)
        agent.training.executors["sim"] = executor  # type: ignore[assignment]
        await agent.start()
        try:
            assert sorted(r.job for r in executor.offered) == ["job-gone", "job-kept"]
            assert agent.counters["attempts_recovered"] == 1 and agent.counters["attempts_lost"] == 1
            reg = await wait_for(lambda: hub.registrations_of("edge-a"), 5, "registration")
            assert [(a.job, a.attempt) for a in reg[0].attempts] == [("job-kept", 1)]
            events = await hub.wait_events(lambda ev: len(_of(ev, "job-kept")) >= 2 and _of(ev, "job-gone"), 10,
                                           "the kept attempt's checkpoints and the lost one's exit")
            kept_events = _of(events, "job-kept")
            assert all(isinstance(e.event, wire.Checkpointed) for e in kept_events)  # no second AttemptStarted
            assert [e.event.seq for e in kept_events[:2]] == [SEQ_BLOCK + 1, SEQ_BLOCK + 2]
            assert kept_events[0].msg_id == wire.event_msg_id("job-kept", 1, SEQ_BLOCK + 1, KEY)
            (gone,) = _of(events, "job-gone")
            assert isinstance(gone.event, wire.AttemptExited) and gone.event.detail == LOST_DETAIL
            assert gone.event.seq == SEQ_BLOCK + 1
            hb = await hub.wait_heartbeat("edge-a", lambda hb: bool(hb.attempts), what="the kept attempt")
            assert hb.free_cards["H20"] == 4 - 0.5 - 2
            assert list(agent.journal.records) == [("job-kept", 1)]  # type: ignore[union-attr]
        finally:
            await agent.stop()
    # Stopping the agent ended the attempt (infra_failure, reported) and cleared its record.
    assert AttemptJournal(tmp_path / "data" / "attempts").records == {}


_TRAINER = """
import time
print("CPN_CHECKPOINT ckpt-1 0.1", flush=True)
while True:
    time.sleep(0.05)
"""


def _attempt_pids(job: str) -> list[int]:
    """Host pids of live processes whose environment names ``job`` (the sandbox has its own pid space)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f"CPN_JOB_ID={job}".encode() not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            if (proc / "stat").read_text().rpartition(")")[2].split()[0] != "Z":
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@sandboxed
async def test_a_process_attempt_does_not_outlive_a_sigkilled_agent(nats_server: NatsServer, tmp_path: Path) -> None:
    """The sandbox dies with the agent (bwrap --die-with-parent), so no orphan writes on while the hub
    restarts the job elsewhere; the restarted agent reports the attempt lost."""
    config = _site_config(tmp_path, nats_server.url)
    config.write_text(config.read_text().replace(
        'enabled = ["sim"]', 'enabled = ["process"]\n[executors.process]\ncommands = ["/usr/bin/python3"]'))
    start = wire.StartAttempt(job="job-p", attempt=1, cards=1, accelerator="H20", executor="process",
                              command=["/usr/bin/python3", "-c", _TRAINER], event_key=KEY)
    async with FakeHub(nats_server.url) as hub:
        await hub.create_stream()
        proc = await _cpn_agent(config)
        try:
            await wait_for(lambda: hub.registrations_of("kill-site"), 20, "the agent to register")
            assert isinstance(await hub.command("kill-site", start), wire.Ack)
            await hub.wait_events(lambda ev: any(isinstance(e.event, wire.Checkpointed) for e in _of(ev, "job-p")),
                                  20, "the trainer's checkpoint")
            assert _attempt_pids("job-p"), "no trainer process found: nothing to test"
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        try:
            await wait_for(lambda: not _attempt_pids("job-p"), 5, "the sandbox to die with its agent")
            proc = await _cpn_agent(config)
            try:
                events = await hub.wait_events(
                    lambda ev: any(isinstance(e.event, wire.AttemptExited) for e in _of(ev, "job-p")), 20,
                    "the lost attempt's exit")
                exited = _of(events, "job-p")[-1]
                assert isinstance(exited.event, wire.AttemptExited) and exited.event.detail == LOST_DETAIL
            finally:
                proc.send_signal(signal.SIGTERM)
                await proc.wait()
        finally:
            for pid in _attempt_pids("job-p"):
                os.kill(pid, signal.SIGKILL)
