"""The shipped Prometheus rules and Grafana dashboard: valid for Prometheus' own tool, and the
alerts fire (and stay quiet) as their unit tests in deploy/prometheus/alerts_test.yml say."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.support.engines import needs

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60, cwd=DEPLOY / "prometheus")


@needs("promtool", package="prometheus")
def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    check = promtool("check", "rules", "alerts.yml")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS" in check.stdout
    tested = promtool("test", "rules", "alerts_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


@needs("promtool", package="prometheus")
def test_example_prometheus_config_is_valid() -> None:
    check = promtool("check", "config", "prometheus.yml")
    assert check.returncode == 0, check.stdout + check.stderr


def test_dashboard_is_the_generators_output_and_every_panel_has_a_query() -> None:
    import runpy

    board = json.loads((DEPLOY / "grafana" / "cpn.json").read_text())
    generated = runpy.run_path(str(DEPLOY / "grafana" / "make_dashboard.py"))["dashboard"]()
    assert board == json.loads(json.dumps(generated)), "cpn.json is stale: run python deploy/grafana/make_dashboard.py"
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len(panels) >= 20 and all(p["targets"] and all(t["expr"] for t in p["targets"]) for p in panels)
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
