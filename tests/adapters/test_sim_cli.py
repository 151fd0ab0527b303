"""``cpn sim`` as an operator runs it: a real subprocess writing JSON, text and PNG plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from controlplane import cli

ROOT = Path(__file__).resolve().parents[2]

SCENARIO = """
name = "cli-small"
hours = 2
sample_s = 300
[inference]
requests = 4000
[[inference.models]]
name = "m"
[training]
jobs = 30
"""


def cpn(*args: str, hash_seed: str = "0") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    return subprocess.run([sys.executable, "-m", "controlplane.cli", "sim", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=100, env=env)


def test_same_seed_same_json_across_processes(tmp_path: Path) -> None:
    # Two processes with different string-hash seeds: set and dict orders must not leak into the report.
    scen = tmp_path / "small.toml"
    scen.write_text(SCENARIO + '[lending]\nenabled = true\n[[faults.outages]]\ncity = "beijing"\nat_hour = 0.5\n')
    runs = []
    for hash_seed in ("1", "2"):
        proc = cpn("--scenario", str(scen), "--seed", "9", "--json", hash_seed=hash_seed)
        assert proc.returncode == 0, proc.stderr
        rep = json.loads(proc.stdout)
        del rep["timing"]
        runs.append(json.dumps(rep, sort_keys=True))
    assert runs[0] == runs[1]


def test_short_run_writes_json_and_plots(tmp_path: Path) -> None:
    scen = tmp_path / "small.toml"
    scen.write_text(SCENARIO)
    out = tmp_path / "report"
    proc = cpn("--scenario", str(scen), "--hours", "1", "--seed", "4", "--json", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["schema"] == "cpn.sim.report/1" and rep["scenario"] == "cli-small" and rep["seed"] == 4
    assert rep["hours"] == 1.0 and rep["timing"]["wall_s"] > 0
    assert 1000 < rep["inference"]["requests"] < 3000  # --hours 1 halves the scenario's 2-hour load
    assert json.loads((out / "report.json").read_text())["inference"] == rep["inference"]
    assert "cpn" in (out / "report.txt").read_text()
    for name in ("report.png", "utilisation.png", "inference.png", "training.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    # Not a terminal: plain progress lines, no bar redrawn with carriage returns.
    assert "simulating: 100%" in proc.stderr and "\r" not in proc.stderr


def test_bad_scenario_is_exit_2_naming_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scen = tmp_path / "bad.toml"
    scen.write_text('name = "x"\n[inference]\nrequets = 5\n')
    proc = cpn("--scenario", str(scen))  # the real process once; then cli.main, what it runs, in this one
    assert proc.returncode == 2
    assert "requets" in proc.stderr and "bad.toml" in proc.stderr
    assert cli.main(["sim", "--scenario", "nope"]) == 2 and "national-day" in capsys.readouterr().err
    assert cli.main(["sim", "--hours", "0"]) == 2 and "--hours" in capsys.readouterr().err
