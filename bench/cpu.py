"""CPU accounting for the benchmarks: user+system CPU of a set of processes, from ``/proc/<pid>/stat``.

A system under test is a set of processes (cpn: hub + agent + nats-server; a router: its one
process and any children). Before and after a load cell the bench reads ``utime + stime`` (fields
14 and 15, all threads included) of every process in the set and of their descendants; the
difference over the answered requests is "CPU-seconds per 1,000 requests". A process that appears
during a cell counts from zero; one that exits during it is missing from ``after`` and its last
reading is kept (so its CPU is not lost, only the part after the last reading).

:func:`parse_stat` and :func:`per_1000` are pure and have unit tests.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def parse_stat(text: str) -> tuple[int, int]:
    """``(ppid, utime + stime in clock ticks)`` from the text of ``/proc/<pid>/stat``.

    The command name (field 2) may hold spaces and parentheses, so fields are counted after the
    last ``)``."""
    rest = text[text.rindex(")") + 2:].split()
    # rest[0] is field 3 (state); ppid is field 4, utime 14, stime 15.
    return int(rest[1]), int(rest[11]) + int(rest[12])


def _all_stats() -> dict[int, tuple[int, int]]:
    out: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = parse_stat((entry / "stat").read_text())
            except (OSError, ValueError, IndexError):
                continue  # exited while we looked
    return out


def descendants(roots: Iterable[int], stats: Mapping[int, tuple[int, int]]) -> set[int]:
    """``roots`` and every process whose parent chain leads to one of them (pure)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    seen: set[int] = set()
    todo = [r for r in roots if r in stats]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, []))
    return seen


def sample(roots: Mapping[str, int]) -> dict[str, dict[int, int]]:
    """Per named root process: ``{pid: ticks}`` of it and its descendants, now."""
    stats = _all_stats()
    return {name: {pid: stats[pid][1] for pid in descendants([root], stats)} for name, root in roots.items()}


def seconds_used(before: Mapping[int, int], after: Mapping[int, int], ticks_per_s: int = TICKS_PER_S) -> float:
    """CPU seconds a process group used between two samples (pure). Processes new in ``after``
    count from zero; processes gone from ``after`` keep their ``before`` reading (count zero)."""
    ticks = sum(t - before.get(pid, 0) for pid, t in after.items())
    return ticks / ticks_per_s


def per_1000(cpu_s: float, requests: float) -> float:
    """CPU-seconds per 1,000 answered requests (pure); ``nan`` when nothing was answered."""
    return cpu_s * 1000 / requests if requests > 0 else float("nan")
