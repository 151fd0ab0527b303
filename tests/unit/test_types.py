"""mypy strict on the configured packages (pyproject ``[tool.mypy]``) reports no error.

The packages, ``strict = true`` and the per-module settings all come from pyproject.toml, so this
test checks exactly what ``.venv/bin/mypy`` checks by hand.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                    reason="mypy is a test extra: pip install -e '.[test]' (make test does)")
def test_mypy_strict_reports_no_errors() -> None:
    proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"mypy exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
