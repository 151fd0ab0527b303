"""CLI conventions an operator relies on: --version, --layout everywhere, help without reST markup,
commands that need a database say which and never create one, ids and origins checked at creation,
progress that shows in a log file, chaos output without Python reprs."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from controlplane.tools import chaos
from controlplane import cli
from controlplane.progress import Progress
from topology import loader


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and re.fullmatch(r"cpn \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)


def test_bench_alone_prints_its_help_not_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench"]) == 2
    out, err = capsys.readouterr()
    assert "usage: cpn bench" in out and "route" in out and "error" not in err


def test_no_help_text_shows_rest_markup(capsys: pytest.CaptureFixture[str]) -> None:
    parsers = cli._every_parser(cli.build_parser())
    assert len(parsers) > 15
    for p in parsers:
        text = p.format_help()
        assert "``" not in text and not re.search(r"\S::$", text, re.M), (p.prog, text)


def test_every_topology_command_takes_layout_and_the_old_positional_still_works(capsys: pytest.CaptureFixture[str]) -> None:
    demo = str(loader.data_path("demo-3"))
    for action in ("validate", "show", "coverage"):
        assert cli.main(["topology", action, "--layout", demo]) == 0, action
    assert "demo-3" in capsys.readouterr().out
    assert cli.main(["topology", "validate", demo]) == 0
    assert "deprecated; use --layout FILE" in capsys.readouterr().err
    assert cli.main(["topology", "validate", "--layout", demo, "--json"]) == 0
    assert '"schema": "cpn.topology.validate/1"' in capsys.readouterr().out


def test_tenant_list_without_a_database_names_it_and_creates_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["tenant", "list"]) == 2
    assert "no hub database at .cpn/hub.db" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_tenant_with_an_unknown_origin_is_refused_at_creation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "hub.db"
    assert cli.main(["tenant", "create", "acme", "--default-origin", "atlantis", "--db", str(db)]) == 2
    assert "'atlantis' is not an origin of layout 'national'" in capsys.readouterr().err and not db.exists()
    assert cli.main(["tenant", "create", "Bad Id", "--db", str(db)]) == 2 and not db.exists()
    assert cli.main(["tenant", "create", "acme", "--default-origin", "shanghai", "--db", str(db)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("cpn_acme") and f"creating a new hub database at {db}" in err
    assert cli.main(["tenant", "list", "--db", str(db)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["ID", "NAME", "DEFAULT_ORIGIN"] and table[1].split()[:3] == ["acme", "acme", "shanghai"]
    assert cli.main(["tenant", "list", "--db", str(db), "--json"]) == 0
    assert '"default_origin": "shanghai"' in capsys.readouterr().out


def test_progress_is_plain_lines_off_a_terminal_and_one_bar_on_one() -> None:
    plain = io.StringIO()
    show = Progress("simulating", plain, tty=False)
    for i in range(1001):
        show(i / 1000, "x")
    lines = plain.getvalue().splitlines()
    assert lines[0] == "simulating: 0% (x)" and lines[-1] == "simulating: 100% (x)" and len(lines) == 11
    assert "\r" not in plain.getvalue()
    bar = io.StringIO()
    show = Progress("simulating", bar, tty=True)
    for i in range(101):
        show(i / 100)
    assert bar.getvalue().count("\r") == 101 and bar.getvalue().endswith("100%\033[K\n")


def test_chaos_table_has_no_python_reprs() -> None:
    report = chaos.Report(faults=[{"kind": "nats_kill"}], detection_s=[2.5, 3.1, 2.7], redispatch_s=[])
    text = chaos.render(report, 61.0)
    assert "{" not in text and "None" not in text
    assert "median 2.7, max 3.1 (n=3)" in text and "none measured" in text
