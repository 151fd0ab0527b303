"""Structured log lines for the agent: ``event key=value key="two words"`` on logger ``cpn.agent``.

Every line starts with a short event name and carries the site, plus the request or job id where
there is one, so a site admin can grep one request or one job through the log.
"""

from __future__ import annotations

import logging

LOGGER = logging.getLogger("cpn.agent")


def _value(value: object) -> str:
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def kv(event: str, **fields: object) -> str:
    """Format one structured line: the event name, then ``key=value`` pairs in the given order."""
    parts = [event]
    parts.extend(f"{key}={_value(value)}" for key, value in fields.items() if value is not None)
    return " ".join(parts)


def log(level: int, event: str, **fields: object) -> None:
    """Log one structured line on ``cpn.agent`` (cheap when the level is disabled)."""
    if LOGGER.isEnabledFor(level):
        LOGGER.log(level, kv(event, **fields))
