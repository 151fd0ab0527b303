"""Running a simulation: seeded streams, scenario and layout files, the run time.

This is the thin shell around the pure engine (``core_engine.run``): it owns the only
``random.Random`` constructions (one independent stream per purpose, seeded from the run's seed
and the stream's name) and the only clock read (``time.perf_counter``, for the run time, which
goes into ``timing``, never into the compared report).

Public API::

    scenario = load_scenario("national-day")        # a shipped name or a TOML file path
    result = simulate(scenario, layout=None, seed=0, hours=None, progress=None)
    result.report    # the deterministic report (dict)
    result.timing    # {"wall_s": ..., "requests_per_s": ..., ...}
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from controlplane.tools.sim import core_engine
from controlplane.tools.sim.core_scenario import Scenario, ScenarioError, decode, with_hours
from topology import latency
from topology import layout as tlayout
from topology import loader

DEFAULT_SCENARIO = "national-day"


def shipped_scenarios() -> list[str]:
    """Names of the scenarios shipped in ``controlplane/scenarios/``."""
    root = resources.files("controlplane") / "scenarios"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def load_scenario(name_or_path: str) -> Scenario:
    """A shipped scenario by name, or a TOML file by path.

    Raises:
        ScenarioError: unknown name, unreadable file, or an invalid scenario (naming the field).
    """
    path = Path(name_or_path)
    if name_or_path.endswith(".toml") or path.is_file():
        try:
            text = path.read_text()
        except OSError as exc:
            raise ScenarioError(f"{name_or_path}: cannot read: {exc.strerror or exc}") from None
        return decode(text, str(path))
    res = resources.files("controlplane") / "scenarios" / f"{name_or_path}.toml"
    if not res.is_file():
        raise ScenarioError(f"unknown scenario {name_or_path!r}; shipped: {', '.join(shipped_scenarios())}")
    return decode(res.read_text(), f"{name_or_path}.toml")


@dataclass
class Streams:
    """Independent random streams; each is ``random.Random("<seed>:<name>")``."""

    seed: int
    workload: random.Random = field(init=False)
    jobs: random.Random = field(init=False)
    faults: random.Random = field(init=False)
    router: random.Random = field(init=False)
    baseline: random.Random = field(init=False)
    fixed: random.Random = field(init=False)
    """The ``cpn-fixed`` policy's router (its own stream, so adding it changes no other figure)."""
    ingress: random.Random = field(init=False)
    """The gateway-set policies' routers (``Inference.ingress``), likewise their own."""
    slo: random.Random = field(init=False)
    """Which requests carry a TTFT SLO and their prompt lengths (``Inference.slo_share``)."""

    def __post_init__(self) -> None:
        for name in ("workload", "jobs", "faults", "router", "baseline", "fixed", "ingress", "slo"):
            setattr(self, name, random.Random(f"{self.seed}:{name}"))


@dataclass
class Result:
    report: dict[str, Any]
    timing: dict[str, Any]


def simulate(scenario: Scenario, *, layout: tlayout.Layout | None = None, seed: int = 0, hours: float | None = None,
             progress: Callable[[float], None] | None = None, rtt: latency.RttIndex | None = None) -> Result:
    """Run ``scenario`` on ``layout`` (default: the shipped national layout)."""
    t0 = time.perf_counter()
    lay = layout if layout is not None else loader.load_default()
    if hours is not None:
        scenario = with_hours(scenario, hours)
    index = rtt if rtt is not None else latency.RttIndex.build(lay)
    t1 = time.perf_counter()
    report = core_engine.run(lay, index, scenario, Streams(seed), progress)
    report["seed"] = seed
    t2 = time.perf_counter()
    n = report["inference"]["requests"]
    timing = {
        "wall_s": round(t2 - t0, 2),
        "setup_s": round(t1 - t0, 2),
        "simulate_s": round(t2 - t1, 2),
        "requests_per_s": round(n / (t2 - t1)) if t2 > t1 else 0,
    }
    return Result(report=report, timing=timing)
