"""The layers of docs/architecture.md, checked on the source: every import, in every layer.

Every import counts: top-level, inside functions, under ``TYPE_CHECKING`` (``ast.walk`` sees them
all), relative ones resolved to their absolute name. The arrows:

- ``controlplane/core/`` is pure: it imports only the core, ``edge_agent.wire`` and ``topology``,
  and no I/O, event loop, clock or global randomness.
- services never import the gateway, the tools or the composition root.
- the gateway never imports the store (it reaches the record through the services and the hub the
  composition root hands it), the tools or the composition root.
- the adapters (``nats/``, ``store/``) import neither the services, the gateway nor the tools.
- only ``controlplane/nats/`` (and the agent's ``edge_agent/bus.py``) import ``nats``; only
  ``controlplane/store/`` imports SQLite; only ``controlplane/gateway/`` runs an aiohttp server.
- ``edge_agent`` never imports ``controlplane``; ``topology`` imports neither.
- ``controlplane`` has no import cycles.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import pyast

ROOT = Path(__file__).resolve().parents[2]
CP = ROOT / "controlplane"
FORBIDDEN_IN_CORE = {"asyncio", "aiohttp", "nats", "sqlite_utils", "sqlite3", "time", "random"}
# Pure modules that live beside their adapter (configs as text; the OpenAI dialect's shapes).
PURE_ELSEWHERE = [CP / "nats" / "natsconf.py", CP / "gateway" / "openai_shapes.py"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute, with ``from m import n`` also giving ``m.n``."""
    tree = pyast.parse(path)
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def top(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


def files(*parts: str) -> list[Path]:
    return sorted((ROOT.joinpath(*parts)).rglob("*.py"))


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def within(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def pure_files() -> list[Path]:
    out = files("controlplane", "core") + PURE_ELSEWHERE
    out += [p for p in files("topology") if p.name not in {"loader.py", "mapplot.py", "render.py"}]
    out += list((CP / "tools" / "sim").rglob("core*.py"))
    return out


@pytest.mark.parametrize("path", pure_files(), ids=rel)
def test_pure_modules_do_no_io(path: Path) -> None:
    bad = top(imports(path)) & FORBIDDEN_IN_CORE
    assert not bad, f"{rel(path)} is pure but imports {sorted(bad)}"


@pytest.mark.parametrize("path", files("controlplane", "core"), ids=rel)
def test_core_imports_only_core_wire_and_topology(path: Path) -> None:
    bad = sorted(
        n for n in imports(path)
        if (within(n, "controlplane") and not within(n, "controlplane.core"))
        or (within(n, "edge_agent") and not within(n, "edge_agent.wire") and n != "edge_agent")
    )
    assert not bad, f"{rel(path)} is core but imports {bad}"


def test_the_layers_are_populated() -> None:
    # The rules must not pass vacuously: each layer holds the modules it is known by.
    names = {p.stem for p in files("controlplane", "core")}
    assert {"registry", "router", "replicas", "lifecycle", "placement", "scheduler", "errors"} <= names
    assert {p.stem for p in files("controlplane", "services")} >= {"inference", "training", "deployments", "outbox"}
    assert (CP / "nats" / "bus.py").exists() and (CP / "store" / "db.py").exists()
    assert (CP / "gateway" / "server.py").exists() and (CP / "compose.py").exists()
    assert "controlplane.core.router" in imports(CP / "services" / "inference.py")


def offenders(package: str, forbidden: tuple[str, ...]) -> Iterator[str]:
    for p in files("controlplane", package):
        for n in sorted(imports(p)):
            if within(n, *forbidden):
                yield f"{rel(p)} imports {n}"


OUTER = ("controlplane.tools", "controlplane.compose", "controlplane.cli")


def test_services_never_import_the_gateway() -> None:
    assert not list(offenders("services", ("controlplane.gateway", *OUTER)))


def test_gateway_never_imports_the_store_nor_the_hub() -> None:
    # It reaches the record and every other part through the services record the composition root
    # hands it (services/record.py), never the store nor the hub process.
    assert not list(offenders("gateway", ("controlplane.store", "controlplane.hub", "sqlite3", "sqlite_utils", *OUTER)))


NOT_YET_TYPED: set[str] = set()
"""Services still built on the hub (being converted this round; delete each name once it lands)."""


def test_services_never_import_the_hub() -> None:
    # A service is built with its parts, typed; it never reaches through the hub process.
    bad = [f"{rel(p)} imports {n}" for p in files("controlplane", "services") if p.name not in NOT_YET_TYPED
           for n in sorted(imports(p)) if within(n, "controlplane.hub")]
    assert not bad


GATEWAY_APP_KEYS = {"SERVICES", "TRUSTED", "MODULES", "_DOC"}


def test_gateway_reaches_parts_only_through_the_services_record() -> None:
    # One AppKey holds the services (plus the trusted proxies, the OpenAPI modules and the cached
    # OpenAPI document, all made by the gateway itself); no handler names a hub, reads
    # app[<anything else>] or asks getattr.
    bad: list[str] = []
    for p in files("controlplane", "gateway"):
        tree = pyast.parse(p)
        for node in ast.walk(tree):
            where = f"{rel(p)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Assign | ast.AnnAssign):
                value = node.value
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if isinstance(value, ast.Call) and ast.unparse(value.func).endswith("AppKey"):
                    names = {ast.unparse(t) for t in targets}
                    if not names <= GATEWAY_APP_KEYS:
                        bad.append(f"{where} defines app key {names}")
            elif isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith(".app"):
                if ast.unparse(node.slice) not in GATEWAY_APP_KEYS:
                    bad.append(f"{where} reads {ast.unparse(node)}")
            elif isinstance(node, ast.Name | ast.arg):
                name = node.id if isinstance(node, ast.Name) else node.arg
                if name in {"hub", "HUB", "Hub"}:
                    bad.append(f"{where} names {name}")
            elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith(".app.get") and node.args:
                if ast.unparse(node.args[0]) not in GATEWAY_APP_KEYS:
                    bad.append(f"{where} reads {ast.unparse(node)}")
            elif isinstance(node, ast.Call) and ast.unparse(node.func) == "getattr" and node.args:
                if ast.unparse(node.args[0]) in {"hub", "self.hub", "services", "request.app"}:
                    bad.append(f"{where} asks {ast.unparse(node)}")
    assert not bad, bad


@pytest.mark.parametrize("path", [*files("controlplane", "gateway"), *files("controlplane", "services"),
                                  CP / "hub.py", CP / "compose.py"], ids=rel)
def test_no_attributes_attached_from_outside(path: Path) -> None:
    # An attribute attached to another object (hub.x = service  # type: ignore[attr-defined]) is how
    # the locator grew; typed parts need none.
    assert "ignore[attr-defined]" not in path.read_text()


def test_the_checker_sees_every_import(tmp_path: Path) -> None:
    # The rules above are only as good as imports(): nested, conditional and relative imports count.
    pkg = tmp_path / "controlplane" / "gateway"
    pkg.mkdir(parents=True)
    source = pkg / "probe.py"
    source.write_text(
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from controlplane.hub import Hub\n"
        "def f():\n    import controlplane.store.db\n    from ..services import training\n"
        "class C:\n    def g(self):\n        from controlplane.store.handle import Store\n"
    )
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = imports(source)
    finally:
        ROOT = saved
    assert {"controlplane.hub.Hub", "controlplane.store.db", "controlplane.services.training",
            "controlplane.store.handle.Store"} <= found


@pytest.mark.parametrize("package", ["nats", "store"])
def test_adapters_import_no_layer_above_them(package: str) -> None:
    above = ("controlplane.services", "controlplane.gateway", "controlplane.hub", *OUTER)
    assert not list(offenders(package, above))


def test_the_hub_does_not_import_the_gateway() -> None:
    # The composition root hands the hub the function that starts the gateway.
    bad = [n for n in imports(CP / "hub.py") if within(n, "controlplane.gateway", *OUTER)]
    assert not bad


def test_edge_agent_never_imports_controlplane() -> None:
    assert not [rel(p) for p in files("edge_agent") if "controlplane" in top(imports(p))]


def test_topology_imports_neither_side() -> None:
    assert not [rel(p) for p in files("topology") if top(imports(p)) & {"controlplane", "edge_agent"}]


def test_only_the_nats_adapters_import_nats() -> None:
    bad = [
        rel(p) for pkg in ("controlplane", "edge_agent", "topology") for p in files(pkg)
        if "nats" in top(imports(p)) and not (p.is_relative_to(CP / "nats") or p == ROOT / "edge_agent" / "bus.py"
                                              or p == CP / "replicated" / "kv.py")
    ]
    assert not bad


def test_only_the_store_touches_sqlite() -> None:
    bad = [
        rel(p) for pkg in ("controlplane", "edge_agent", "topology") for p in files(pkg)
        if top(imports(p)) & {"sqlite3", "sqlite_utils"} and not p.is_relative_to(CP / "store")
    ]
    assert not bad


def test_only_the_gateway_runs_an_http_server() -> None:
    bad = [
        rel(p) for pkg in ("controlplane", "edge_agent", "topology") for p in files(pkg)
        if ("aiohttp.web" in imports(p) or "aiohttp.web_protocol" in imports(p))
        and not p.is_relative_to(CP / "gateway")
    ]
    assert not bad


def test_controlplane_has_no_import_cycles() -> None:
    modules = {module_name(p): p for p in files("controlplane")}
    graph = {m: {n for n in imports(p) if n in modules and n != m} for m, p in modules.items()}
    # A module reaches itself again only through a cycle; depth-first with colours finds one.
    state: dict[str, int] = {}
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


CLOCK_READS = {"time.time", "time.monotonic", "time.perf_counter", "time.time_ns", "time.monotonic_ns"}


def clock_reads(path: Path) -> list[str]:
    """Where ``path`` reads the system's clock itself (``time.time()`` and kin, ``loop.time()``)."""
    tree = pyast.parse(path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and ast.unparse(node) in CLOCK_READS:
            out.append(f"{rel(path)}:{node.lineno} {ast.unparse(node)}")
        elif isinstance(node, ast.Attribute) and node.attr == "time" and ast.unparse(node.value).endswith("loop"):
            out.append(f"{rel(path)}:{node.lineno} {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom) and node.module == "time":
            out.append(f"{rel(path)}:{node.lineno} from time import ...")
    return out


def test_services_and_the_agent_read_time_only_from_their_clock() -> None:
    # One clock, injected (core/clock.py, edge_agent/clock.py): the live one is the only reader of
    # the system's clock, so the same services and agent run on a simulated one.
    paths = [p for p in files("controlplane", "services") if p.name not in NOT_YET_TYPED]
    paths += [CP / "hub.py", CP / "compose.py", CP / "scrape.py", CP / "readiness.py"]
    # http1.py: socket deadlines of the agent's site-local HTTP client, timers of one connection
    # (like the bus's request timeouts), not time a decision reads.
    paths += [p for p in files("edge_agent") if p.name not in ("clock.py", "http1.py")]
    bad = [line for p in paths for line in clock_reads(p)]
    assert not bad, bad
    assert clock_reads(ROOT / "edge_agent" / "clock.py")  # the checker does see a reader
