"""The event outbox: attempt events waiting for JetStream's acknowledgement, in order.

Promises:

- Rule 1: an event is in the outbox from the moment it is added until :meth:`Outbox.ack` is
  called with its message id; :meth:`Outbox.peek` always returns the oldest one (events are
  delivered in the order they happened).
- Rule 2: with a file, every added event is written and fsynced before :meth:`Outbox.add` returns,
  so an agent killed at any point finds its unacknowledged events again on start. Acks are
  appended without fsync: losing one only means a redelivery, which JetStream (duplicate window)
  and the hub (idempotent by ``job:attempt:seq``) both absorb.
- Rule 3: the file is a JSON-lines journal (``{"op": "add", ...}`` / ``{"op": "ack", "id": ...}``)
  and is compacted when it empties or grows large; a torn last line (crash mid-write) is skipped
  and counted in ``corrupt_lines``.

No asyncio here: the publishing loop lives in :mod:`edge_agent.events`.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from edge_agent import private_files, wire

COMPACT_AFTER_LINES = 10_000


@dataclass(frozen=True, slots=True)
class Entry:
    msg_id: str
    subject: str
    body: bytes


class Outbox:
    """Unacknowledged events, oldest first; optionally journalled to ``path``."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._lines = 0
        self.corrupt_lines = 0
        self.added = 0
        self.acked = 0
        if path is not None:
            private_files.private_dir(path.parent, tighten_existing=False)
            private_files.tighten(path)
            self._load()

    def __repr__(self) -> str:
        return f"<Outbox pending={len(self)} added={self.added} acked={self.acked} path={self.path}>"

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._entries.values()))

    def _load(self) -> None:
        assert self.path is not None
        if not self.path.exists():
            return
        with self.path.open("r", encoding="utf-8") as f:
            for line in f:
                self._lines += 1
                try:
                    record = json.loads(line)
                    if record["op"] == "add":
                        entry = Entry(record["id"], record["subject"], record["body"].encode())
                        self._entries.setdefault(entry.msg_id, entry)
                    elif record["op"] == "ack":
                        self._entries.pop(record["id"], None)
                except (ValueError, KeyError, TypeError, AttributeError):
                    self.corrupt_lines += 1
        self._rewrite()  # start from a compact journal holding just what is pending

    def _append(self, record: dict[str, str], *, sync: bool) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8", opener=private_files.opener) as f:
            f.write(json.dumps(record, separators=(",", ":")) + "\n")
            if sync:
                f.flush()
                os.fsync(f.fileno())
        self._lines += 1

    def _rewrite(self) -> None:
        assert self.path is not None
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with open(tmp, "w", encoding="utf-8", opener=private_files.opener) as f:
            for e in self._entries.values():
                f.write(json.dumps({"op": "add", "id": e.msg_id, "subject": e.subject, "body": e.body.decode()},
                                   separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._lines = len(self._entries)

    def add(self, event: wire.AttemptStarted | wire.Checkpointed | wire.AttemptExited, msg_id: str = "") -> Entry:
        """Queue one event (durably, when journalled) under ``msg_id`` (default: the unkeyed
        :func:`wire.event_msg_id`); returns its entry."""
        entry = Entry(
            msg_id=msg_id or wire.event_msg_id(event.job, event.attempt, event.seq),
            subject=wire.event_subject(event.site),
            body=wire.encode(event),
        )
        if entry.msg_id in self._entries:
            return self._entries[entry.msg_id]
        self._append({"op": "add", "id": entry.msg_id, "subject": entry.subject, "body": entry.body.decode()},
                     sync=True)
        self._entries[entry.msg_id] = entry
        self.added += 1
        return entry

    def peek(self) -> Entry | None:
        """The oldest unacknowledged event, or None."""
        return next(iter(self._entries.values()), None)

    def ack(self, msg_id: str) -> None:
        """JetStream stored ``msg_id``: drop it (journal compacted when empty or large)."""
        if self._entries.pop(msg_id, None) is None:
            return
        self.acked += 1
        if self.path is None:
            return
        if not self._entries or self._lines >= COMPACT_AFTER_LINES:
            self._rewrite()
        else:
            self._append({"op": "ack", "id": msg_id}, sync=False)
