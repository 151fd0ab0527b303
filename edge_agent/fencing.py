"""The hub's leader epoch as the agent sees it: refuse commands from a deposed leader.

Several controller processes may run; one leads at a time, under a lease whose fencing epoch grows
with every takeover and is carried in every command (``epoch`` on ``StartAttempt``, ``StopAttempt``,
``LoadModel``, ``UnloadModel``, ``Drain``).

- Rule 1: the agent remembers the highest epoch it has accepted; a command with a non-zero epoch
  lower than that is refused (``ErrorReply(code="stale_epoch")``, counted and logged by the agent).
  A leader that was frozen and woke up still believing it leads can then change nothing here.
- Rule 2: epoch 0 means "a hub that predates epochs": always accepted (old hubs keep working).
- Rule 3: with a data dir, the highest epoch is written (atomically, fsynced) before the command
  that raised it is acted upon, so an agent restart does not forget it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edge_agent import private_files
from edge_agent.logs import log

FILE_NAME = "hub_epoch"


class EpochFence:
    """The highest hub epoch seen; ``path`` None keeps it in memory only."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.highest = 0
        self.refused = 0
        if path is not None and path.exists():
            try:
                self.highest = int(path.read_text().strip() or 0)
            except (OSError, ValueError) as exc:
                log(logging.ERROR, "hub_epoch_unreadable", path=str(path), error=str(exc))

    def __repr__(self) -> str:
        return f"<EpochFence highest={self.highest} refused={self.refused}>"

    def admit(self, epoch: int) -> bool:
        """True if a command carrying ``epoch`` may be acted upon (and remember it)."""
        if epoch <= 0:
            return True
        if epoch < self.highest:
            self.refused += 1
            return False
        if epoch > self.highest:
            if self.path is not None:
                private_files.write_private(self.path, str(epoch))
            self.highest = epoch
        return True
