"""The slurm executor's pure parts: final state -> exit reason, record parsing, the sbatch resource options."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from edge_agent import wire
from edge_agent.config import SlurmExecutorConfig
from edge_agent.executors.slurm import SlurmExecutor, outcome, parse_record, parse_sacct


@pytest.mark.parametrize(("state", "code", "reason", "words"), [
    ("COMPLETED", 0, "completed", ""),
    ("FAILED", 3, "user_error", "exit code 3"),
    ("FAILED", -9, "user_error", "killed by signal 9"),
    ("OUT_OF_MEMORY", 0, "user_error", "memory limit"),
    ("TIMEOUT", 0, "user_error", "time limit of 18 min"),
    ("NODE_FAIL", 0, "infra_failure", "NODE_FAIL"),
    ("BOOT_FAIL", 0, "infra_failure", "BOOT_FAIL"),
    ("PREEMPTED", 0, "infra_failure", "preempted"),
    ("DEADLINE", 0, "infra_failure", "DEADLINE"),
    ("CANCELLED", 0, "infra_failure", "not by cpn"),
    ("", None, "infra_failure", "unknown"),
    ("SOMETHING_NEW", 0, "infra_failure", "SOMETHING_NEW"),
])
def test_final_state_table(state: str, code: int | None, reason: str, words: str) -> None:
    got, detail = outcome(state, code, time_limit_min=18)
    assert got == reason and words in detail


def test_scontrol_record_cannot_be_spoofed_by_the_command() -> None:
    line = ("JobId=7 JobName=cpn-j-1 UserId=root(0) JobState=FAILED Reason=NonZeroExitCode ExitCode=3:0 "
            "RunTime=00:00:01 Command=/a/job.sh sh -c echo JobState=COMPLETED ExitCode=0:0 WorkDir=/w")
    assert parse_record(line) == ("FAILED", 3)
    assert parse_record("JobId=8 JobState=FAILED ExitCode=0:9") == ("FAILED", -9)
    assert parse_record("slurm_load_jobs error: Invalid job id specified") is None


def test_sacct_lines() -> None:
    assert parse_sacct("CANCELLED by 0|0:15\n") == ("CANCELLED", -15)
    assert parse_sacct("COMPLETED|0:0\n") == ("COMPLETED", 0)
    assert parse_sacct("") is None


def executor(tmp_path: Path, **raw: object) -> SlurmExecutor:
    return SlurmExecutor(msgspec.convert(raw, SlurmExecutorConfig), tmp_path)


def start(cards: int, accelerator: str = "H20", **kw: object) -> wire.StartAttempt:
    return wire.StartAttempt(job="j", attempt=1, cards=cards, accelerator=accelerator, executor="process",
                             command=["/opt/train"], **kw)  # type: ignore[arg-type]


def test_gang_is_one_job_of_whole_nodes(tmp_path: Path) -> None:
    ex = executor(tmp_path, gres={"910B": "npu", "T4": ""}, cards_per_node=8, partition="ai", account="cpn",
                  qos="low", cpus_per_task=16, time_limit_factor=1.5)
    args, minutes = ex.resources(start(16, work_s=3600.0, progress=0.5))  # type: ignore[misc]
    assert args == ["--nodes=2", "--ntasks-per-node=1", "--gres=gpu:8", "--cpus-per-task=16", "--partition=ai",
                    "--account=cpn", "--qos=low", "--time=45"] and minutes == 45
    args, _ = ex.resources(start(4, "910B"))  # type: ignore[misc]
    assert "--nodes=1" in args and "--gres=npu:4" in args
    args, _ = ex.resources(start(1, "T4"))  # type: ignore[misc]
    assert not [a for a in args if a.startswith("--gres")]
    assert "whole nodes" in str(ex.resources(start(12)))
    assert not [a for a in executor(tmp_path, time_limit_factor=0).resources(start(1))[0] if a.startswith("--time")]


def test_allow_list_is_exact_and_empty_means_none(tmp_path: Path) -> None:
    assert "allow-list" in executor(tmp_path).refusal(start(1))
    ex = executor(tmp_path, commands=["/opt/train"])
    assert ex.refusal(start(1)) == ""
    other = wire.StartAttempt(job="j", attempt=1, cards=1, accelerator="H20", command=["/opt/train2"])
    assert "allow-list" in ex.refusal(other)
    nul = wire.StartAttempt(job="j", attempt=1, cards=1, accelerator="H20", command=["/opt/train", "a\0b"])
    assert "NUL" in ex.refusal(nul)


def test_example_config_documents_every_slurm_key() -> None:
    from edge_agent import config

    example_path = Path(__file__).resolve().parents[2] / "deploy" / "site.example.toml"
    example = config.load(example_path)
    assert example.executors.slurm.gres == {"H20": "gpu:h20"}
    section = example_path.read_text().split("[executors.slurm]", 1)[1]
    for name in SlurmExecutorConfig.__struct_fields__:
        assert f"\n{name} = " in section or f"[executors.slurm.{name}]" in section, f"{name} is not documented"
