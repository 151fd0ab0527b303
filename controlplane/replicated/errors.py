"""Errors of the replicated record, translated from nats-py at the adapter (:mod:`.kv`).

- :class:`Conflict`: a compare-and-set lost (the key's revision is not the one the writer read, or
  a create found the key there). Nothing was written; read again and decide again.
- :class:`Fenced`: a write fenced by a leader epoch found a newer epoch: the writer is no longer
  the leader. Nothing was written; stop deciding.
- :class:`NoQuorum`: no acknowledgement from a quorum of the bucket's replicas within the deadline
  (too few NATS nodes up, no connection, an election that did not finish in time). The write
  *may or may not* have been applied: treat the outcome as unknown (retry with the same
  compare-and-set, which then either wins or conflicts), never as success.
- :class:`NotFound`: no such key (or it was deleted).
"""

from __future__ import annotations


class RecordError(Exception):
    """Base of every error the replicated record raises on purpose."""


class Conflict(RecordError):
    """A compare-and-set lost; ``key`` names the key whose revision did not match (when known).
    ``in_flight``: the server said only that another write to the key was still being replicated."""

    def __init__(self, message: str, key: str = "", *, in_flight: bool = False) -> None:
        super().__init__(message)
        self.key = key
        self.in_flight = in_flight


class Fenced(Conflict):
    """The writer's leader epoch is older than the record's: it must stop acting as leader."""


class NoQuorum(RecordError):
    """No quorum acknowledged in time; the write's outcome is unknown."""


class NotFound(RecordError):
    """No value under this key."""
