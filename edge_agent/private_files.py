"""Data at rest: data directories 0700, files 0600, whatever the process umask.

The hub's database (and its -wal/-shm), the JetStream store, credentials and an agent's journals
are readable by their owner only. Modes are given explicitly when a file or directory is created
(``os.open``/``os.mkdir`` with a mode, then ``chmod``, since the umask filters the mode given at
creation), and anything found with group or other bits set is tightened at start and logged
(``event=tightened_mode``). Shared by the hub and the agent (the agent imports no hub code).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("cpn.files")

DIR_MODE = 0o700
FILE_MODE = 0o600
_LOOSE = stat.S_IRWXG | stat.S_IRWXO


def tighten(path: Path) -> bool:
    """Drop group and other permission bits of ``path`` (a file or directory; symlinks are left
    alone); True if it had any (and a warning was logged)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode) or not st.st_mode & _LOOSE:
        return False
    mode = stat.S_IMODE(st.st_mode)
    os.chmod(path, mode & ~_LOOSE)
    log.warning("event=tightened_mode path=%s from=%o to=%o", path, mode, mode & ~_LOOSE)
    return True


def tighten_tree(root: Path) -> int:
    """:func:`tighten` ``root`` and everything under it; returns how many were tightened."""
    count = int(tighten(root))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            count += tighten(Path(dirpath) / name)
    return count


def private_dir(path: Path | str, *, tighten_existing: bool = True) -> Path:
    """Make ``path`` (and any missing parents) a directory with mode 0700; an existing ``path``
    with looser modes is tightened unless ``tighten_existing`` is False (e.g. a directory the
    user named that may not be ours alone). Parents that already exist are never changed."""
    path = Path(path)
    missing: list[Path] = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(directory, DIR_MODE)  # the umask filtered the mode given to mkdir
    if not missing and tighten_existing:
        tighten(path)
    return path


def private_file(path: Path | str) -> Path:
    """Create ``path`` empty with mode 0600 if it does not exist, else tighten it; the file's
    directory must exist."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        tighten(path)
        return path
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    return path


def write_private(path: Path | str, data: bytes | str) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename), mode 0600."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # an old temp file keeps its own mode
        os.write(fd, raw)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)



def opener(path: str, flags: int) -> int:
    """``open(..., opener=opener)``: a file created by it starts 0600 (whatever the umask)."""
    return os.open(path, flags, FILE_MODE)
