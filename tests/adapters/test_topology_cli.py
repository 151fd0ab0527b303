"""``cpn topology ...`` in-process through controlplane.cli.main, and once as a real subprocess."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from controlplane import cli
from topology import loader

REPO = Path(__file__).resolve().parents[2]
CPN = REPO / ".venv" / "bin" / "cpn"

BAD_LINK = """
[[links]]
a = "sh-hub"
b = "nj-edge"
one_way_ms = 0.5
"""


def demo_text() -> str:
    return loader.data_path("demo-3").read_text(encoding="utf-8")


def test_validate_ok_for_shipped_layouts(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["topology", "validate", str(loader.default_path())]) == 0
    assert cli.main(["topology", "validate", str(loader.data_path("demo-3"))]) == 0
    out = capsys.readouterr().out
    assert "ok: layout 'national', 60 sites, 75 origins" in out
    assert "ok: layout 'demo-3'" in out


def test_validate_invalid_exits_1_naming_file_line_and_entry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    text = demo_text().replace('id = "hz-edge"', 'id = "HZ edge"') + BAD_LINK
    bad.write_text(text, encoding="utf-8")
    assert cli.main(["topology", "validate", str(bad)]) == 1
    err = capsys.readouterr().err
    link_line = text.splitlines().index("[[links]]") + 1
    assert f"{bad}:{link_line}: links[0] sh-hub--nj-edge: one_way_ms = 0.5 is below the speed-of-light floor" in err
    assert "sites[2] 'HZ edge': id 'HZ edge' is not one NATS token" in err


def test_validate_missing_file_is_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["topology", "validate", str(tmp_path / "nope.toml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_validate_as_a_subprocess(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(demo_text() + BAD_LINK, encoding="utf-8")
    res = subprocess.run([str(CPN), "topology", "validate", str(bad)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stderr
    assert "links[0] sh-hub--nj-edge" in res.stderr and "speed-of-light floor" in res.stderr
    ok = subprocess.run([str(CPN), "topology", "validate", str(loader.default_path())], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "ok: layout 'national'" in ok.stdout


def test_coverage_json_is_stable_and_consistent(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["topology", "coverage", "--budget", "5", "--json"]) == 0
    first = capsys.readouterr().out
    assert cli.main(["topology", "coverage", "--budget", "5", "--json"]) == 0
    assert capsys.readouterr().out == first  # byte-for-byte stable
    data = json.loads(first)
    assert data["schema"] == "cpn.topology.coverage/1"
    assert list(data) == ["schema", "layout", "budget_ms", "tiers", "origins_total", "weight_total", "totals", "uncovered",
                          "origins", "ingress"]  # "ingress" added (a new key, same schema id): the full path
    assert [t["budget_ms"] for t in data["totals"]] == [5.0, 10.0]
    five = data["totals"][0]
    by_id = {o["id"]: o for o in data["origins"]}
    assert five["origins_uncovered"] == len(data["uncovered"]) == sum(1 for o in data["origins"] if o["n_sites"] == 0)
    served2 = sum(o["weight"] for o in data["origins"] if o["n_cities"] >= 2) / data["weight_total"]
    assert five["share_2_cities"] == pytest.approx(served2, abs=1e-4)
    # the holes an operator must see: far-west and far-north origins
    assert {"kashgar", "lhasa", "hulunbuir"} <= {u["id"] for u in data["uncovered"]}
    assert by_id["shanghai"]["n_cities"] >= 3
    assert all(s["rtt_ms"] <= 5.0 for o in data["origins"] for s in o["sites"])


def test_coverage_text_names_shares_and_holes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["topology", "coverage", "--budget", "5"]) == 0
    out = capsys.readouterr().out
    assert "within     5 ms" in out and ">=2 cities" in out
    assert "uncovered at 5 ms" in out and "kashgar" in out and "nearest: urc-edge" in out


def test_coverage_bad_budget_and_tiers_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["topology", "coverage", "--budget", "0"]) == 2
    assert cli.main(["topology", "coverage", "--tiers", "edge,moon"]) == 2
    err = capsys.readouterr().err
    assert "--budget must be > 0" in err and "--tiers" in err


def test_show_text_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["topology", "show", "--layout", str(loader.data_path("demo-3"))]) == 0
    out = capsys.readouterr().out
    assert "layout 'demo-3': 4 sites, 3 origins" in out and "910B" in out
    assert cli.main(["topology", "show", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schema"] == "cpn.topology.show/1"
    assert data["tiers"]["hub"]["sites"] == 9 and data["tiers"]["hub"]["cards"] >= 90_000
    assert data["tiers"]["edge"]["cities"] >= 30
    assert {"910B", "A800", "H20"} <= set(data["accelerators"])
    assert [r["id"] for r in data["regions"]] == ["north", "east", "central", "south", "southwest", "northwest"]
    assert sum(r["sites"] for r in data["regions"]) == data["sites"]  # every site in exactly one region


def test_show_on_invalid_layout_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(demo_text() + BAD_LINK, encoding="utf-8")
    assert cli.main(["topology", "show", "--layout", str(bad)]) == 1
    assert "speed-of-light floor" in capsys.readouterr().err


def test_map_writes_a_real_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "map.png"
    assert cli.main(["topology", "map", "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert width >= 1200 and height >= 800
    assert len(data) > 100_000  # a drawn map, not an empty canvas
    assert "wrote" in capsys.readouterr().out


def test_map_rejects_non_png(tmp_path: Path) -> None:
    assert cli.main(["topology", "map", "--out", str(tmp_path / "map.jpg")]) == 2


def test_map_without_matplotlib_says_how_to_install(tmp_path: Path) -> None:
    # A real interpreter where importing matplotlib fails.
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from controlplane import cli\n"
        f"sys.exit(cli.main(['topology', 'map', '--out', {str(tmp_path / 'm.png')!r}]))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == 2
    assert "pip install 'cpn[map]'" in res.stderr
    assert not (tmp_path / "m.png").exists()


def test_coverage_full_path_through_given_gateways(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["topology", "coverage", "--budget", "10", "--json"]) == 0
    regional = json.loads(capsys.readouterr().out)["ingress"]
    assert regional["schema"] == "cpn.topology.ingress/1"
    assert regional["gateways"] == ["beijing", "shanghai", "wuhan", "guangzhou", "chengdu", "xian"]  # the layout's
    assert cli.main(["topology", "coverage", "--budget", "10", "--json", "--gateways", "beijing"]) == 0
    central = json.loads(capsys.readouterr().out)["ingress"]
    assert central["gateways"] == ["beijing"]
    guangzhou = {o["id"]: o for o in central["origins"]}["guangzhou"]
    assert guangzhou["gateway"] == "beijing" and guangzhou["full_rtt_ms"] > 25 > 1 > guangzhou["direct_rtt_ms"]
    assert central["totals"][0]["full_1_city"] < regional["totals"][0]["full_1_city"] < regional["totals"][0]["direct_1_city"]
    assert cli.main(["topology", "coverage", "--gateways", "beijing,lhasa"]) == 0
    out = capsys.readouterr().out
    assert "full path origin -> nearest gateway -> site, gateways: beijing, lhasa" in out
    assert "direct >=1 / >=2 cities    full path >=1 / >=2 cities" in out
    assert cli.main(["topology", "coverage", "--gateways", "beijing,atlantis"]) == 2
    assert "'atlantis'" in capsys.readouterr().err
    assert cli.main(["topology", "coverage", "--gateways", "none", "--json"]) == 0
    assert "ingress" not in json.loads(capsys.readouterr().out)
