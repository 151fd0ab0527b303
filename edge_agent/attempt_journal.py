"""The attempt journal: the training attempts this agent runs, on disk, so a restart finds them.

One file per attempt, ``<data_dir>/attempts/<job>.<attempt>.json``, holding an
:class:`AttemptRecord`: the ``StartAttempt`` command as the hub sent it (with its ``event_key``), the
highest event ``seq`` the attempt may have used, and whatever an executor needs to find the attempt
again (a container name, a Slurm job id).

Promises:

- Rule 1: a record is written atomically (temp file, fsync, rename, fsync of the directory) with
  mode 0600 in a 0700 directory (it holds the attempt's event key). A reader sees the old record or
  the new one, never a torn one; a stray temp file from a crash is removed on load.
- Rule 2: ``seq`` is a high-water mark reserved *before* any event up to it is handed to the outbox
  (in blocks of :data:`SEQ_BLOCK`, so a running attempt costs one write per block of events, not
  one per event). After a restart the next event gets ``seq + 1``: a number no earlier event of
  the attempt used, so its JetStream id (keyed by the same ``event_key``) is fresh and the hub
  records it. Numbers may skip; the hub keys events by ``job:attempt:seq`` and needs no gap-free run.
- Rule 3: a record is removed once the attempt's exit event is in the outbox. A record that cannot
  be read is counted in ``corrupt``, renamed to ``*.corrupt`` and otherwise left alone.

No asyncio here: :mod:`edge_agent.training` drives it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import msgspec

from edge_agent import wire
from edge_agent.logs import log

SEQ_BLOCK = 16
"""Event numbers reserved per journal write."""

_SUFFIX = ".json"


class AttemptRecord(msgspec.Struct, kw_only=True):
    """What the journal holds about one attempt."""

    command: wire.StartAttempt
    seq: int = 0
    """Highest event seq the attempt may have used (reserved before use, Rule 2)."""
    state: dict[str, str] = {}
    """Executor-specific facts for re-attaching after a restart (``RunningAttempt.recovery``)."""

    @property
    def job(self) -> str:
        return self.command.job

    @property
    def attempt(self) -> int:
        return self.command.attempt


_decoder = msgspec.json.Decoder(AttemptRecord)
_encoder = msgspec.json.Encoder()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AttemptJournal:
    """Attempt records in ``directory`` (created 0700), one file each, cached in memory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.records: dict[tuple[str, int], AttemptRecord] = {}
        self.corrupt = 0
        self.writes = 0
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
        self._load()

    def __repr__(self) -> str:
        return f"<AttemptJournal {self.directory} records={len(self.records)} corrupt={self.corrupt}>"

    def __len__(self) -> int:
        return len(self.records)

    def path(self, job: str, attempt: int) -> Path:
        # Job ids are checked against wire.ID_PATTERN before anything is journalled: a safe file name.
        return self.directory / f"{wire.check_id(job, 'job')}.{int(attempt)}{_SUFFIX}"

    def _load(self) -> None:
        for path in sorted(self.directory.iterdir()):
            if path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # a write that never reached its rename
                continue
            if not path.name.endswith(_SUFFIX):
                continue
            try:
                record = _decoder.decode(path.read_bytes())
                if path != self.path(record.job, record.attempt):
                    raise ValueError(f"{path.name} holds attempt {record.attempt} of {record.job}")
            except (OSError, ValueError, msgspec.DecodeError) as exc:  # ValidationError is a ValueError
                self.corrupt += 1
                with contextlib.suppress(OSError):
                    path.rename(path.with_name(path.name + ".corrupt"))
                log(logging.ERROR, "attempt_record_unreadable", path=str(path), error=str(exc))
                continue
            self.records[(record.job, record.attempt)] = record

    def _write(self, record: AttemptRecord) -> None:
        path = self.path(record.job, record.attempt)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, _encoder.encode(record))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(self.directory)
        self.records[(record.job, record.attempt)] = record
        self.writes += 1

    def begin(self, command: wire.StartAttempt, seq: int = 0) -> AttemptRecord:
        """Record a new attempt (before its first event); raises OSError if the disk refuses."""
        record = AttemptRecord(command=command, seq=seq + SEQ_BLOCK)
        self._write(record)
        return record

    def reserve(self, job: str, attempt: int, seq: int) -> None:
        """Make sure event ``seq`` of the attempt is covered by the recorded high-water mark."""
        record = self.records.get((job, attempt))
        if record is None or seq <= record.seq:
            return
        self._write(msgspec.structs.replace(record, seq=seq + SEQ_BLOCK - 1))

    def set_state(self, job: str, attempt: int, state: dict[str, str]) -> None:
        """Keep executor facts for re-attaching (written at once)."""
        record = self.records.get((job, attempt))
        if record is None or record.state == state:
            return
        self._write(msgspec.structs.replace(record, state=dict(state)))

    def remove(self, job: str, attempt: int) -> None:
        """Forget an attempt (idempotent). Not fsynced: a record that reappears after a power loss
        only makes the next start report an exit the hub already has, which it ignores."""
        if self.records.pop((job, attempt), None) is None:
            return
        self.path(job, attempt).unlink(missing_ok=True)
