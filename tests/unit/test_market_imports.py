"""DESIGN §2 for the market package: its modules outside ``store/`` are pure core.

(Kept apart from test_import_rules.py while controlplane/ is being restructured; fold the list in
there afterwards.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import pyast

ROOT = Path(__file__).resolve().parents[2]
MARKET = ROOT / "controlplane" / "market"
FORBIDDEN = {"asyncio", "aiohttp", "nats", "sqlite_utils", "sqlite3", "time", "random", "uuid", "os", "pathlib"}
ALLOWED_CONTROLPLANE = {"controlplane.market", "controlplane.core.placement", "controlplane.core.checkpointing"}


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(pyast.parse(path)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


PURE = sorted(p for p in MARKET.glob("*.py"))


def test_the_market_has_its_modules() -> None:
    assert {p.stem for p in PURE} >= {"money", "catalogue", "offers", "quotes", "budgets", "ledger", "postings",
                                      "reconcile"}


@pytest.mark.parametrize("path", PURE, ids=lambda p: p.name)
def test_market_core_is_pure(path: Path) -> None:
    names = imports(path)
    assert not {n.split(".")[0] for n in names} & FORBIDDEN
    reaching = {n for n in names if n.startswith("controlplane")}
    assert all(any(n == a or n.startswith(a + ".") for a in ALLOWED_CONTROLPLANE) for n in reaching), reaching
    assert not any(n.startswith("controlplane.store.market") for n in names)
