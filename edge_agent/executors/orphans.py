"""Finding and ending an attempt's processes left behind by an agent that died (SIGKILL, OOM).

An attempt that runs in its own process group outlives a killed agent, which can no longer read
its output: it must not go on writing to its checkpoint dir while the hub restarts the job. On its
next start the agent asks :func:`kill_orphan_group` to end the group it journalled, but only if a
process in it still carries the attempt's ``CPN_JOB_ID`` / ``CPN_ATTEMPT`` environment (a reused
process id belongs to someone else and is left alone). Linux ``/proc`` only; elsewhere nothing is
found.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

PROC = Path("/proc")


def _group_of(pid_dir: Path) -> int | None:
    try:
        stat = (pid_dir / "stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after the last ")".
    fields = stat.rpartition(")")[2].split()
    return int(fields[2]) if len(fields) > 2 else None


def _is_attempt(pid_dir: Path, job: str, attempt: int) -> bool:
    try:
        env = set((pid_dir / "environ").read_bytes().split(b"\0"))
    except OSError:
        return False
    return f"CPN_JOB_ID={job}".encode() in env and f"CPN_ATTEMPT={attempt}".encode() in env


def group_members(pgid: int, job: str, attempt: int) -> list[int]:
    """Live processes of group ``pgid`` that belong to the attempt (empty if none or no /proc)."""
    if pgid <= 1 or not PROC.is_dir():
        return []
    found = []
    for pid_dir in PROC.iterdir():
        if pid_dir.name.isdigit() and _group_of(pid_dir) == pgid and _is_attempt(pid_dir, job, attempt):
            found.append(int(pid_dir.name))
    return found


def kill_orphan_group(pgid: int, job: str, attempt: int) -> bool:
    """SIGKILL process group ``pgid`` if it still runs the attempt; True if it was signalled."""
    if not group_members(pgid, job, attempt):
        return False
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True
