"""The ``slurm`` executor against a real single-node Slurm (munged + slurmctld + slurmd) started here.

One cluster per module (cold start about 1-2 s); every job runs through the real ``sbatch``,
``squeue``, ``scontrol`` and ``scancel``. ``sacct`` is asked too: with no slurmdbd it answers
"accounting storage is disabled", which the executor must survive.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from controlplane.nats.natsserver import NatsServer
from edge_agent import wire
from edge_agent.config import SlurmExecutorConfig
from edge_agent.executors import EventSink, RunningAttempt
from edge_agent.executors.slurm import SlurmAttempt, SlurmExecutor
from tests.support.engines import needs
from tests.support.fakehub import FakeHub, agent_config, running, wait_for
from tests.support.slurm import SlurmCluster

pytestmark = [needs("slurmctld", "slurmd", "munged", "sbatch", "squeue", "scancel", "scontrol", "sinfo",
                    package="slurm-wlm munge"),
              # one worker runs the whole module (``make test`` uses several): one cluster, not one per worker
              pytest.mark.xdist_group("slurm")]

PY = sys.executable

TRAIN = """
import json, os, sys, time
ck = os.environ["CPN_CHECKPOINT_DIR"]
env = {k: v for k, v in os.environ.items() if k.startswith("CPN_")}
env["SECRET"] = os.environ.get("NATS_PASSWORD_FOR_TEST", "")
json.dump(env, open(os.path.join(ck, "env.json"), "w"))
print("CPN_PROGRESS 0.25", flush=True)
open(os.path.join(ck, "step-1"), "w").write("1")
print("CPN_CHECKPOINT", os.path.join(ck, "step-1"), "0.5", flush=True)
print("CPN_CHECKPOINT rel/ck-2 1.0", flush=True)
"""

FAIL = """
import sys
print("CPN_PROGRESS 0.3", flush=True)
print("Traceback (most recent call last):\\nValueError: bad learning rate", file=sys.stderr)
sys.exit(3)
"""

HANG = """
import os, signal, sys, time
def on_term(*_):
    print("CPN_CHECKPOINT", os.path.join(os.environ["CPN_CHECKPOINT_DIR"], "on-term"), "0.4", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print("CPN_PROGRESS 0.1", flush=True)
while True:
    time.sleep(0.05)
"""

STUBBORN = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("CPN_PROGRESS 0.2", flush=True)
while True:
    time.sleep(0.05)
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def make_executor(slurm: SlurmCluster, tmp_path: Path, **overrides: Any) -> SlurmExecutor:
    raw: dict[str, Any] = {"commands": [PY], "gres": {"H20": ""}, "slurm_conf": str(slurm.conf), "poll_s": 0.1,
                           "grace_s": 5.0, "jobcomp_file": str(slurm.jobcomp), **overrides}
    return SlurmExecutor(msgspec.convert(raw, SlurmExecutorConfig), tmp_path / "agent")


class Recorder:
    """An attempt's events as the outbox would receive them, and its on_exit calls."""

    def __init__(self, job: str, attempt: int = 1) -> None:
        self.events: list[Any] = []
        self.exits: list[RunningAttempt] = []
        self.sink = EventSink("slurm-site", job, attempt, lambda ev, _id: self.events.append(ev))

    def on_exit(self, handle: RunningAttempt) -> None:
        self.exits.append(handle)

    @property
    def kinds(self) -> list[str]:
        return [type(e).__name__ for e in self.events]


def start_cmd(job: str, argv: list[str], **kw: Any) -> wire.StartAttempt:
    return wire.StartAttempt(job=job, attempt=kw.pop("attempt", 1), cards=1, accelerator="H20", executor="process",
                             command=argv, **kw)


async def until_exited(handle: RunningAttempt, timeout_s: float = 30.0) -> wire.AttemptExited:
    return await asyncio.wait_for(handle.wait(), timeout_s)


def squeue_names(slurm: SlurmCluster) -> list[str]:
    return slurm.run("squeue", "-h", "-o", "%j").stdout.split()


async def test_command_job_runs_through_sbatch_to_completion(slurm: SlurmCluster, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_PASSWORD_FOR_TEST", "s3cret")  # in the agent's environment, not the job's
    ex = make_executor(slurm, tmp_path, export_env=["PATH"])
    # A job that holds the whole node keeps ours pending: AttemptStarted must wait for RUNNING.
    holder = slurm.run("sbatch", "--parsable", "--exclusive", "--job-name=holder", f"--output={tmp_path}/h.out",
                       "--wrap=sleep 60").stdout.strip()
    rec = Recorder("sj-ok")
    cmd = start_cmd("sj-ok", [PY, "-c", TRAIN], resume_from="/ck/old", progress=0.1, work_s=600.0)
    handle = await ex.start(cmd, rec.sink, rec.on_exit)
    assert isinstance(handle, SlurmAttempt) and handle.slurm_id.isdigit()
    await wait_for(lambda: handle.state == "PENDING", 10, "the executor to see the attempt pending")
    polls = handle.polls
    await wait_for(lambda: handle.polls >= polls + 3, 10, "three more polls while Slurm keeps it pending")
    assert handle.state == "PENDING" and rec.events == [], "AttemptStarted was sent before Slurm ran the job"
    slurm.run("scancel", holder)
    exited = await until_exited(handle)
    assert rec.kinds == ["AttemptStarted", "Checkpointed", "Checkpointed", "AttemptExited"]
    assert rec.events[0].resumed_from == "/ck/old"
    ck = ex.checkpoints / "sj-ok"
    assert [(c.progress, c.checkpoint) for c in rec.events[1:3]] == [
        (0.5, str(ck / "step-1")), (1.0, str(ex.work_dir / "rel" / "ck-2"))]
    assert exited.reason == "completed" and exited.exit_code == 0 and exited.progress == 1.0
    assert [e.seq for e in rec.events] == [1, 2, 3, 4] and rec.exits == [handle]
    env = json.loads((ck / "env.json").read_text())
    assert env["CPN_JOB_ID"] == "sj-ok" and env["CPN_ATTEMPT"] == "1" and env["CPN_CHECKPOINT_DIR"] == str(ck)
    assert env["CPN_RESUME_FROM"] == "/ck/old" and float(env["CPN_PROGRESS_START"]) == 0.1
    assert env["SECRET"] == ""  # the agent's own environment is not exported into the job
    record = slurm.run("scontrol", "show", "job", "-o", handle.slurm_id).stdout
    assert "JobName=cpn-sj-ok-1 " in record and "TimeLimit=00:18:00" in record  # 600 s x 0.9 left x 2.0
    assert "Requeue=0" in record


async def test_failing_command_is_a_user_error_with_exit_code_and_stderr(slurm: SlurmCluster, tmp_path: Path) -> None:
    ex = make_executor(slurm, tmp_path)
    rec = Recorder("sj-fail")
    handle = await ex.start(start_cmd("sj-fail", [PY, "-c", FAIL]), rec.sink, rec.on_exit)
    exited = await until_exited(handle)
    assert rec.kinds == ["AttemptStarted", "AttemptExited"]
    assert exited.reason == "user_error" and exited.exit_code == 3 and exited.progress == 0.3
    assert "exit code 3" in exited.detail and "ValueError: bad learning rate" in exited.detail
    assert f"Slurm job {handle.slurm_id}" in exited.detail  # type: ignore[attr-defined]


async def test_final_state_from_the_jobcomp_log_when_scontrol_forgot(slurm: SlurmCluster, tmp_path: Path) -> None:
    # scontrol stands in for one that no longer knows the job (MinJobAge passed); sacct answers
    # "accounting storage is disabled" (no slurmdbd here); the jobcomp/filetxt record still has it.
    ex = make_executor(slurm, tmp_path, scontrol="/bin/false")
    rec = Recorder("sj-comp")
    handle = await ex.start(start_cmd("sj-comp", [PY, "-c", FAIL]), rec.sink, rec.on_exit)
    exited = await until_exited(handle)
    assert exited.reason == "user_error" and exited.exit_code == 3
    assert ex.sacct_works is False


async def test_argv_reaches_the_program_verbatim_no_shell(slurm: SlurmCluster, tmp_path: Path) -> None:
    ex = make_executor(slurm, tmp_path)
    out = tmp_path / "argv.json"
    marker = tmp_path / "injected"
    nasty = [f"; touch {marker}", f"$(touch {marker})", f"`touch {marker}`", "'\"", "a\nb", "--wrap=id",
             "--output=/etc/x", "*", "", "%j"]
    prog = f"import json, sys; json.dump(sys.argv[1:], open({str(out)!r}, 'w'))"
    rec = Recorder("sj-argv")
    handle = await ex.start(start_cmd("sj-argv", [PY, "-c", prog, *nasty]), rec.sink, rec.on_exit)
    exited = await until_exited(handle)
    assert exited.reason == "completed", exited.detail
    assert json.loads(out.read_text()) == nasty
    assert not marker.exists()


async def test_stop_signals_then_cancels_and_the_job_leaves_squeue(slurm: SlurmCluster, tmp_path: Path) -> None:
    ex = make_executor(slurm, tmp_path, grace_s=0.5)
    polite, stubborn = Recorder("sj-term"), Recorder("sj-kill")
    h1 = await ex.start(start_cmd("sj-term", [PY, "-u", "-c", HANG]), polite.sink, polite.on_exit)
    h2 = await ex.start(start_cmd("sj-kill", [PY, "-u", "-c", STUBBORN]), stubborn.sink, stubborn.on_exit)
    await wait_for(lambda: h1.progress == 0.1 and h2.progress == 0.2, 20, "both jobs to run and report progress")
    await asyncio.gather(h1.stop(detail="by test"), h2.stop(detail="by test"))
    assert polite.kinds == ["AttemptStarted", "Checkpointed", "AttemptExited"]  # it checkpointed on SIGTERM
    assert polite.events[1].progress == 0.4 and polite.events[-1].reason == "stopped"
    assert stubborn.kinds == ["AttemptStarted", "AttemptExited"] and stubborn.events[-1].reason == "stopped"
    assert stubborn.events[-1].detail == "by test"
    names = squeue_names(slurm)
    assert "cpn-sj-term-1" not in names and "cpn-sj-kill-1" not in names
    assert "JobState=CANCELLED" in slurm.run("scontrol", "show", "job", "-o", h2.slurm_id).stdout  # type: ignore[attr-defined]


async def test_job_cancelled_by_the_site_is_an_infra_failure(slurm: SlurmCluster, tmp_path: Path) -> None:
    ex = make_executor(slurm, tmp_path)
    rec = Recorder("sj-admin")
    handle = await ex.start(start_cmd("sj-admin", [PY, "-u", "-c", HANG]), rec.sink, rec.on_exit)
    await wait_for(lambda: handle.progress == 0.1, 20, "the job to run")
    slurm.run("scancel", handle.slurm_id)  # type: ignore[attr-defined]
    exited = await until_exited(handle)
    assert exited.reason == "infra_failure" and "CANCELLED" in exited.detail


async def test_command_not_on_the_allow_list_is_refused_and_not_submitted(slurm: SlurmCluster,
                                                                           tmp_path: Path) -> None:
    ex = make_executor(slurm, tmp_path)
    before = slurm.run("scontrol", "show", "jobs", "-o").stdout.count("JobId=")
    details = []
    for job, argv in (("sj-deny", ["/bin/sh", "-c", "id"]), ("sj-none", [])):
        rec = Recorder(job)
        handle = await ex.start(start_cmd(job, argv), rec.sink, rec.on_exit)
        assert handle.done and rec.kinds == ["AttemptExited"] and rec.exits == [handle]
        assert rec.events[0].reason == "user_error" and rec.events[0].detail.startswith("refused: ")
        details.append(rec.events[0].detail)
    assert "'/bin/sh' is not on this site's allow-list" in details[0] and "no command" in details[1]
    assert slurm.run("scontrol", "show", "jobs", "-o").stdout.count("JobId=") == before


async def test_agent_runs_command_jobs_through_slurm_end_to_end(slurm: SlurmCluster, nats_server: NatsServer,
                                                                  tmp_path: Path) -> None:
    data = tmp_path / "agent"
    executors = {"enabled": ["slurm"], "slurm": {"commands": [PY], "gres": {"H20": ""}, "poll_s": 0.1,
                                                 "slurm_conf": str(slurm.conf), "grace_s": 1.0}}
    async with FakeHub(nats_server.url) as hub:
        await hub.create_stream()
        async with running(agent_config(nats_server.url, data_dir=str(data), executors=executors)) as agent:
            await wait_for(lambda: hub.registrations_of("edge-a"), 5, "the registration")
            assert set(hub.registrations_of("edge-a")[-1].executors) == {"slurm", "process"}
            ok = wire.StartAttempt(job="se-ok", attempt=1, cards=1, accelerator="H20", executor="process",
                                   command=[PY, "-c", TRAIN])
            assert isinstance(await hub.command("edge-a", ok), wire.Ack)
            deny = wire.StartAttempt(job="se-deny", attempt=1, cards=1, accelerator="H20", executor="process",
                                     command=["/bin/sh", "-c", "id"])
            reply = await hub.command("edge-a", deny)
            assert isinstance(reply, wire.ErrorReply) and reply.code == "not_allowed" and "allow-list" in reply.message
            hang = wire.StartAttempt(job="se-stop", attempt=1, cards=1, accelerator="H20", executor="process",
                                     command=[PY, "-u", "-c", HANG])
            assert isinstance(await hub.command("edge-a", hang), wire.Ack)
            await hub.wait_heartbeat("edge-a", lambda hb: any(a.job == "se-stop" and a.progress == 0.1
                                                              for a in hb.attempts), 20, "se-stop running")
            stop = await hub.command("edge-a", wire.StopAttempt(job="se-stop", attempt=1))
            assert isinstance(stop, wire.Ack)

            def exits(ev: list[Any]) -> dict[str, wire.AttemptExited]:
                return {e.event.job: e.event for e in ev if isinstance(e.event, wire.AttemptExited)}

            events = await hub.wait_events(lambda ev: len(exits(ev)) == 2, 30, "two exits")
            ok_kinds = [type(e.event).__name__ for e in events if e.event.job == "se-ok"]
            assert ok_kinds == ["AttemptStarted", "Checkpointed", "Checkpointed", "AttemptExited"]
            final = exits(events)
            assert final["se-ok"].reason == "completed"
            assert "se-deny" not in final  # refused before any card was reserved: no attempt ran
            assert final["se-stop"].reason == "stopped"
            assert agent.training.attempts == {}
            assert not [n for n in squeue_names(slurm) if n.startswith("cpn-se-")]
