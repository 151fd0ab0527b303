"""Process-wide logging set-up for cpn commands: one structured line per event.

Lines look like ``2026-11-21T12:00:00.123Z INFO cpn.hub event=site_lost site=sh-edge ...``; the
messages themselves are ``key=value`` (with ``event=`` first) so they can be grepped by request id
or job id.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable


class _Formatter(logging.Formatter):
    converter: Callable[[float | None], time.struct_time] = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        line = f"{ts} {record.levelname} {record.name} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(level: str | None = None) -> None:
    """Configure the root logger once (level from the argument, else CPN_LOG, else INFO)."""
    name = (level or os.environ.get("CPN_LOG") or "INFO").upper()
    root = logging.getLogger()
    if any(getattr(h, "_cpn", False) for h in root.handlers):
        root.setLevel(name)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    handler._cpn = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(name)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
