"""README's benchmark table: a run rewrites only the rows it measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import common, table

EXISTING = """| what | measured | target | machine, date |
|---|---|---|---|
| routing decision, 3000 sites / 300 origins | p50 5 µs | p99 ≤ 50 µs | old box, 2026-11-21 |
| heartbeats, 5000 sites at 1 Hz | 5.5% of one core | ≤ 25% of one core | old box, 2026-11-21 |
"""


def test_a_run_replaces_its_own_row_and_keeps_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(table, "RESULTS", tmp_path)
    (tmp_path / "heartbeat.json").write_text(json.dumps(
        {"sites": 4000, "hub_cpu_pct": 14.8, "received_per_s": 4000, "machine": "new box", "date": "2026-12-07"}))
    out = table.render(EXISTING).splitlines()
    assert out[2].startswith("| routing decision, 3000 sites") and "old box, 2026-11-21" in out[2]
    assert out[3].startswith("| heartbeats, 4000 sites at 1 Hz") and "14.8% of one core" in out[3]
    assert len(out) == 4  # the old heartbeat row is replaced, not kept beside the new one


def test_kind_ignores_figures() -> None:
    assert table._kind("heartbeats, 5000 sites at 1 Hz") == table._kind("heartbeats, 4,000 sites at 2 Hz")
    assert table._kind("regions (`cpn bench regions`)") == table._kind("regions (`cpn bench regions`, load 1.2–1.7)")
    assert table._kind("gateway path vs its floor (wrk), 1 connection") != table._kind(
        "gateway path vs its floor (wrk), 32 connections")


def test_the_regions_row_puts_each_regions_own_gateway_next_to_the_central_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(table, "RESULTS", tmp_path)
    row = {"n": 20, "errors": 0, "promised_rtt_p50_ms": 1.0}
    (tmp_path / "regions.json").write_text(json.dumps({
        "regions": 2, "budget_ms": 10.0, "machine": "box", "date": "2026-12-07", "rows": [
            {**row, "region": "east", "mode": "central", "p50_ms": 26.5, "p99_ms": 68.6, "beyond_promise_p50_ms": 8.3},
            {**row, "region": "east", "mode": "regional", "p50_ms": 9.5, "p99_ms": 23.5, "beyond_promise_p50_ms": 7.2,
             "errors": 2},
            {**row, "region": "north", "mode": "regional", "p50_ms": 7.0, "p99_ms": 9.9, "beyond_promise_p50_ms": 6.9},
        ]}))
    (line,) = [r for r in table.render("").splitlines() if r.startswith("| regions")]
    assert "east: own gateway p50 9.5 / p99 23.5 ms, central 26.5 / 68.6 (2 errors)" in line
    assert "north: own gateway p50 7.0 / p99 9.9 ms, central -" in line
    assert "p50 6.9–8.3 ms" in line and "in-region p99 ≤ 10 ms" in line


def test_the_regions_row_keeps_origins_without_an_in_region_site_apart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(table, "RESULTS", tmp_path)
    row = {"n": 20, "errors": 0, "promised_rtt_p50_ms": 1.0, "beyond_promise_p50_ms": 1.4}
    (tmp_path / "regions.json").write_text(json.dumps({
        "regions": 1, "budget_ms": 10.0, "machine": "box", "date": "2026-12-07",
        "subtracted": {"proxy_ms_per_crossing": 0.31}, "outside_origins": {"central": {"zhengzhou": 31.28}},
        "rows": [
            {**row, "origins": "in_budget", "region": "central", "mode": "regional", "p50_ms": 3.1, "p99_ms": 6.5},
            {**row, "origins": "outside", "region": "central", "mode": "regional", "p50_ms": 34.0, "p99_ms": 42.0},
        ]}))
    (line,) = [r for r in table.render("").splitlines() if r.startswith("| regions")]
    assert "central: own gateway p50 3.1 / p99 6.5 ms, central -" in line  # the far origin is not mixed in
    assert "no in-region site within budget (zhengzhou), own gateway p99 42.0–42.0 ms" in line
    assert "the proxies' own 0.31 ms per crossing" in line


def test_another_benchs_readme_run_keeps_the_peers_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(table, "RESULTS", tmp_path / "results")
    readme = tmp_path / "README.md"
    peers = "<!-- bench-peers -->\n| system | c=32 req/s |\n| cpn | 6,929 |\n<!-- /bench-peers -->\n"
    readme.write_text("<!-- bench-table -->\n" + EXISTING + "<!-- /bench-table -->\n\n" + peers)
    monkeypatch.setattr(table, "README", readme)
    table.update_readme()  # e.g. `cpn bench regions --readme` in a tree without the peers' results
    assert peers in readme.read_text()  # before: "Not measured yet" in its place


def test_a_submissions_run_without_the_one_at_a_time_setup_still_makes_its_rows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(table, "RESULTS", tmp_path)
    setup = {"per_s": 100.0, "p50_ms": 5.0, "p99_ms": 9.0, "hub_cpu_ms_per_submission": 1.5,
             "nats_cpu_ms_per_submission": 1.0}
    (tmp_path / "submissions.json").write_text(json.dumps({  # `cpn bench submissions --setups nats`
        "concurrency": [1], "hubs": 3, "load_before": 0.5, "load_after": 0.7, "machine": "box", "date": "2026-12-07",
        "c1": {"sqlite": setup, "nats": {**setup, "hub_cpu_ms_per_submission": 2.5}, "ratio_nats_to_sqlite": 1.0}}))
    rows = [r for r in table.render(EXISTING).splitlines() if "durable submissions, 1 client" in r]
    assert len(rows) == 1 and "hub CPU per submission 1.5 / 2.5 ms (+ nats-servers 1.0 / 1.0 ms)" in rows[0]
    assert "one at a time" not in rows[0]


def test_the_regions_row_with_no_origin_in_budget_starts_with_what_it_has(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(table, "RESULTS", tmp_path)
    (tmp_path / "regions.json").write_text(json.dumps({
        "regions": 1, "budget_ms": 10.0, "machine": "box", "date": "2026-12-07", "not_served": ["west"],
        "rows": [{"n": 20, "errors": 0, "region": "west", "mode": "regional", "origins": "outside",
                  "p50_ms": 30.1, "p99_ms": 33.0}],
        "outside_origins": {"west": {"kashgar": 29.0}}}))
    (line,) = [r for r in table.render("").splitlines() if r.startswith("| regions")]
    cell = line.split(" | ")[1]
    assert cell.startswith("origins with no in-region site within budget (kashgar), own gateway p99 33.0–33.0 ms; "
                           "regions with no in-region site within budget: west"), cell


def test_the_regions_row_names_the_benchs_own_tenant_it_subtracted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(table, "RESULTS", tmp_path)
    (tmp_path / "regions.json").write_text(json.dumps({
        "regions": 1, "budget_ms": 10.0, "machine": "box", "date": "2026-12-07",
        "subtracted": {"proxy_ms_per_crossing": 0.31, "tenant_floor_ms": {"delayed": 1.2, "undelayed": 0.9}},
        "rows": [{"n": 20, "errors": 0, "promised_rtt_p50_ms": 1.0, "beyond_promise_p50_ms": -0.4,
                  "origins": "in_budget", "region": "central", "mode": "regional", "p50_ms": 3.1, "p99_ms": 6.5}]}))
    (line,) = [r for r in table.render("").splitlines() if r.startswith("| regions")]
    assert "the bench's own tenant (client + proxy + loopback, measured against a server answering at once) 1.2 ms" in line
    assert "the proxies' own 0.31 ms per crossing on the relay" in line
