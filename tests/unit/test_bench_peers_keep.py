"""README's peers section after a partial run (`--cells`, `--systems`): what this run did not measure
keeps its earlier value, marked with the run it came from; nothing unmeasured is shown unmarked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import peers, table

PREVIOUS = """| system | c=32 req/s | c=32 p50 / p99 ms | CPU-s per 1,000 req (c=32) | c=1 p50 / p99 ms | stream c=8 TTFC p50 / p99 ms |
|---|---|---|---|---|---|
| direct | 95,993 | 0.19 / 5.57 | — | 0.063 / 0.492 | 0.13 / 0.25 |
| vllm-router | 12,163 (0.13× direct) | 2.58 / 5.30 | 0.098 | 0.239 / 0.658 | 0.68 / 2.13 |
| sglang-router | 10,162 (0.11× direct) | 2.95 / 6.33 | 0.126 | 0.254 / 0.569 | 0.80 / 2.09 |
| cpn | 5,457 (0.06× direct) | 5.68 / 11.17 | 0.217 (agent 0.065, hub 0.127, nats-server 0.025) | 0.644 / 1.328 | 2.03 / 3.79 |

| cpn vs vllm-router, same run | measured (median of the rounds' own) | each round | target | |
|---|---|---|---|---|
| c=32 req/s | 0.431× | 0.431, 0.418, 0.623 | ≥ 0.5× | **not met** |
| CPU-s per 1,000 requests (c=32) | 2.21× | 2.21, 2.547, 1.68 | ≤ 3.0× | met |
| c=1 p50, extra over vllm-router | 0.405 ms | 0.47, 0.405, 0.367 | ≤ 0.5 ms | met |
| streaming TTFC p50 (c=8) | 2.744× | 2.744, 2.967, 2.428 | ≤ 2.0× | **not met** |

2 cores, AMD EPYC, Python 3.11.7, 2026-12-01; 3 interleaved round(s) of 10 s per cell, medians (the targets: the median of each round's own ratio, cpn and vllm-router measured in the same round); sglang-router 0.3.2, vllm-router 0.1.17, policy `round_robin`.
"""


def _cell(system: str, cell: str, rps: float, **figures: Any) -> dict[str, Any]:
    cpu_s = {"hub": 0.3, "agent": 0.2} if system == "cpn" else {"router": 0.2} if system != "direct" else {}
    return {"system": system, "cell": cell, "round": 0, "rps": rps, "requests": int(rps), "errors": 0, "cpu_s": cpu_s,
            **figures}


def _write_run(results: Path, date: str, cells: list[dict[str, Any]]) -> None:
    agg = peers.aggregate(cells)
    run = {"systems": agg, "verdicts": peers.verdicts(agg, cells=cells), "skipped": {}, "baseline": "vllm-router",
           "router_policy": "round_robin", "versions": {"vllm-router": "0.1.17"}, "machine": "2 cores, AMD EPYC",
           "date": date, "method": {"rounds": 1, "seconds_per_cell": 5, "cells": sorted({c["cell"] for c in cells})}}
    results.mkdir(exist_ok=True)
    (results / "gateway_peers.json").write_text(json.dumps(run))


def _rows(section: str) -> dict[str, list[str]]:
    return {line.split(" | ")[0][2:]: [c.strip() for c in line.strip("| ").split(" | ")]
            for line in section.splitlines() if line.startswith("| ") and not line.startswith("| system")}


@pytest.fixture
def readme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(table, "RESULTS", tmp_path / "results")
    path = tmp_path / "README.md"
    path.write_text("intro\n\n<!-- bench-peers -->\n" + PREVIOUS + "<!-- /bench-peers -->\n\nafter\n")
    monkeypatch.setattr(table, "README", path)
    return path


def test_a_c32_run_keeps_the_other_cells_marked_with_their_run(readme: Path, tmp_path: Path) -> None:
    _write_run(tmp_path / "results", "2026-12-07", [
        _cell("vllm-router", "c32", 12000, p50_ms=2.5, p99_ms=5.0),
        _cell("cpn", "c32", 7000, p50_ms=4.5, p99_ms=9.0)])
    table.update_readme(peers_only=True)
    text = readme.read_text()
    assert text.startswith("intro\n\n<!-- bench-peers -->\n") and text.endswith("<!-- /bench-peers -->\n\nafter\n")
    rows = _rows(table._section(text, "bench-peers"))
    # This run's cells: fresh and unmarked.
    assert rows["cpn"][1] == "7,000" and rows["cpn"][2] == "4.50 / 9.00" and rows["cpn"][3].startswith("0.071")
    assert rows["c=32 req/s"][1] == "0.583×"
    # The cells it did not measure: the previous values, marked.
    assert rows["cpn"][4] == "0.644 / 1.328 ¹" and rows["cpn"][5] == "2.03 / 3.79 ¹"
    assert rows["vllm-router"][4] == "0.239 / 0.658 ¹"
    assert rows["streaming TTFC p50 (c=8)"][1:3] == ["2.744× ¹", "2.744, 2.967, 2.428"]
    assert rows["c=1 p50, extra over vllm-router"][1] == "0.405 ms ¹"
    # Systems not run this time keep their whole row, every figure marked.
    assert rows["direct"][1:] == ["95,993 ¹", "0.19 / 5.57 ¹", "—", "0.063 / 0.492 ¹", "0.13 / 0.25 ¹"]
    assert list(rows)[:4] == ["direct", "vllm-router", "sglang-router", "cpn"]
    # The footnote names the run the marked values came from; the description says what this one measured.
    assert "¹ from an earlier run (2 cores, AMD EPYC, Python 3.11.7, 2026-12-01; 3 interleaved round(s) of 10 s " \
           "per cell), not re-measured since." in text
    assert "This run measured only c32." in text


def test_marks_carry_over_and_a_full_run_clears_them(readme: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    _write_run(results, "2026-12-07", [_cell("vllm-router", "c32", 12000, p50_ms=2.5, p99_ms=5.0),
                                       _cell("cpn", "c32", 7000, p50_ms=4.5, p99_ms=9.0)])
    table.update_readme(peers_only=True)
    _write_run(results, "2026-12-08", [_cell("vllm-router", "ttfc8", 11000, ttfc_p50_ms=0.7, ttfc_p99_ms=2.0),
                                       _cell("cpn", "ttfc8", 6000, ttfc_p50_ms=1.3, ttfc_p99_ms=3.0)])
    table.update_readme(peers_only=True)
    section = table._section(readme.read_text(), "bench-peers")
    rows = _rows(section)
    assert rows["cpn"][5] == "1.30 / 3.00"  # fresh
    assert rows["cpn"][1] == "7,000 ²"  # from the c32 run
    assert rows["cpn"][4] == "0.644 / 1.328 ¹"  # still from the first run, its own mark and note
    assert rows["streaming TTFC p50 (c=8)"][1] == "1.857×" and rows["c=32 req/s"][1] == "0.583× ²"
    assert "¹ from an earlier run (2 cores, AMD EPYC, Python 3.11.7, 2026-12-01;" in section
    assert "² from an earlier run (2 cores, AMD EPYC, 2026-12-07; 1 interleaved round(s) of 5 s per cell)" in section

    _write_run(results, "2026-12-09", [
        _cell(s, c, 1000, p50_ms=1.0, p99_ms=2.0, ttfc_p50_ms=1.0, ttfc_p99_ms=2.0)
        for s in peers.ORDER for c in peers.CELLS])
    table.update_readme(peers_only=True)
    section = table._section(readme.read_text(), "bench-peers")
    assert not any(mark in section for mark in "¹²³") and "measured only" not in section


def test_a_base_checkout_is_not_written_to_the_readme(readme: Path, tmp_path: Path) -> None:
    _write_run(tmp_path / "results", "2026-12-07", [_cell("cpn", "c32", 7000, p50_ms=4.5, p99_ms=9.0),
                                                    _cell("cpn-base", "c32", 6500, p50_ms=4.9, p99_ms=9.5)])
    table.update_readme(peers_only=True)
    rows = _rows(table._section(readme.read_text(), "bench-peers"))
    assert rows["cpn"][1] == "7,000" and "cpn-base" not in rows


def test_a_first_run_has_nothing_to_keep(readme: Path, tmp_path: Path) -> None:
    readme.write_text("<!-- bench-peers -->\nNot measured yet: `cpn bench gateway --peers`.\n<!-- /bench-peers -->\n")
    _write_run(tmp_path / "results", "2026-12-07", [_cell("cpn", "c32", 7000, p50_ms=4.5, p99_ms=9.0)])
    table.update_readme(peers_only=True)
    section = table._section(readme.read_text(), "bench-peers")
    assert "¹" not in section and _rows(section)["cpn"][4:] == ["—", "—"]
