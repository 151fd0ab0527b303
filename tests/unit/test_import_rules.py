"""DESIGN §2 layering, checked on the source: the pure core imports no I/O, edge_agent no controlplane."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN_IN_CORE = {"asyncio", "aiohttp", "nats", "sqlite_utils", "sqlite3", "time", "random"}
PURE_CONTROLPLANE = ["bodies", "declarations", "registry", "router", "replicas", "lifecycle", "placement", "scheduler", "checkpointing", "usage", "ratelimit", "natsconf", "openai_shapes", "sitegate"]


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def top(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


def pure_files() -> list[Path]:
    homes = {"natsconf": "nats", "openai_shapes": "gateway"}
    files = [ROOT / "controlplane" / homes.get(name, "core") / f"{name}.py" for name in PURE_CONTROLPLANE]
    files += [p for p in (ROOT / "topology").rglob("*.py") if p.name not in {"loader.py", "mapplot.py", "render.py"}]
    files += list((ROOT / "controlplane" / "tools" / "sim").rglob("core*.py"))
    return [p for p in files if p.exists()]


@pytest.mark.parametrize("path", pure_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_core_does_no_io(path: Path) -> None:
    bad = top(imports(path)) & FORBIDDEN_IN_CORE
    assert not bad, f"{path.relative_to(ROOT)} is pure core but imports {sorted(bad)}"


def test_core_modules_exist() -> None:
    # The rule must not pass vacuously: the main pure modules are there and were checked.
    names = {p.stem for p in pure_files()}
    assert {"registry", "router", "layout", "latency"} <= names


def test_edge_agent_never_imports_controlplane() -> None:
    offenders = [
        str(p.relative_to(ROOT)) for p in (ROOT / "edge_agent").rglob("*.py") if "controlplane" in top(imports(p))
    ]
    assert not offenders


def test_topology_imports_neither_side() -> None:
    offenders = [
        str(p.relative_to(ROOT)) for p in (ROOT / "topology").rglob("*.py")
        if top(imports(p)) & {"controlplane", "edge_agent"}
    ]
    assert not offenders


def test_only_the_bus_adapters_import_nats() -> None:
    allowed = {ROOT / "controlplane" / "nats" / "bus.py", ROOT / "edge_agent" / "bus.py"}
    offenders = [
        str(p.relative_to(ROOT))
        for pkg in ("controlplane", "edge_agent", "topology")
        for p in (ROOT / pkg).rglob("*.py")
        if "nats" in top(imports(p)) and p not in allowed
    ]
    assert not offenders


def test_only_the_store_touches_sqlite() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for pkg in ("controlplane", "edge_agent", "topology")
        for p in (ROOT / pkg).rglob("*.py")
        if top(imports(p)) & {"sqlite3", "sqlite_utils"} and "store" not in p.relative_to(ROOT).parts
    ]
    assert not offenders


def test_only_the_gateway_runs_an_http_server() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for pkg in ("controlplane", "edge_agent", "topology")
        for p in (ROOT / pkg).rglob("*.py")
        if "aiohttp.web" in imports(p) or any(n == "aiohttp" and "web" in p.read_text() and "from aiohttp import web" in p.read_text() for n in imports(p))
        if "gateway" not in p.relative_to(ROOT).parts
    ]
    assert not offenders
