"""One structured log for every cpn process (agent, hub, ``cpn up``): formatters, a rate limit, set-up.

A line is an event name and ``key=value`` fields. On a terminal::

    2026-12-07T00:21:38.199Z INFO cpn.hub event=site_lost site=sh-edge silent_for_s=3.00

and with ``--log-json`` (one object a line, for Loki, Elasticsearch, ``jq``)::

    {"ts": "2026-12-07T00:21:38.199Z", "level": "INFO", "logger": "cpn.hub", "event": "site_lost", "site": "sh-edge", ...}

Code logs either through :func:`log` (fields kept as they are) or with a ``%``-format message
whose text is ``event=name key=value ...`` (the hub's style) or ``name key=value ...`` (older agent
lines): both are parsed into the same fields, so the two formats cannot drift apart again. A line
from a library that is free text becomes ``event=message msg="..."``.

Repeated warnings are rate-limited (:class:`RepeatFilter`): the same warning (same logger, same
text once digits are masked) is written once per ``window_s`` and the next line carries
``repeated=N``, so a NATS outage says so once a minute, not twice a second. Warnings about
different things (another site, another path) are different texts and all pass; lines that name
a request or a job are never held back.

This module lives in ``edge_agent`` because a site installs only that package; the hub uses it too
(``controlplane`` may import ``edge_agent``, never the reverse).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Any, TextIO

from edge_agent.clock import WALL

LOGGER = logging.getLogger("cpn.agent")

_ID_FIELDS = ("request_id", "job", "job_id")
_KEY = re.compile(r"([A-Za-z_][A-Za-z0-9_.]*)=")
_DIGITS = re.compile(r"\d+")


def _value(value: object) -> str:
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def kv(event: str, **fields: object) -> str:
    """Format one structured message: ``event=<name>``, then ``key=value`` pairs in the given order."""
    parts = [f"event={event}"]
    parts.extend(f"{key}={_value(value)}" for key, value in fields.items() if value is not None)
    return " ".join(parts)


def log(level: int, event: str, **fields: object) -> None:
    """Log one structured line on ``cpn.agent`` (cheap when the level is disabled)."""
    if LOGGER.isEnabledFor(level):
        LOGGER.log(level, kv(event, **fields), extra={"cpn_fields": {"event": event, **{
            k: v for k, v in fields.items() if v is not None}}})


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        return text[1:-1].replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
    return text


def parse(message: str) -> dict[str, Any]:
    """The fields of a message: ``event`` first, then each ``key=value``.

    Tolerant by design (hub lines are ``%``-formatted, so a value may hold spaces): text between
    one ``key=`` and the next belongs to the first key's value; a leading bare word is the event;
    a message with no ``key=`` at all is ``{"event": "message", "msg": text}``.
    """
    text = message.strip()
    matches = [m for m in _KEY.finditer(text) if m.start() == 0 or text[m.start() - 1] == " "]
    # Inside a quoted value a "key=" is part of the value, not a new field.
    fields: dict[str, Any] = {}
    head = text[: matches[0].start()].strip() if matches else text
    if not matches:
        return {"event": "message", "msg": text} if text else {"event": "message"}
    if head:
        if " " in head:
            fields["event"] = "message"
            fields["msg"] = head
        else:
            fields["event"] = head
    i = 0
    while i < len(matches):
        m = matches[i]
        start = m.end()
        if start < len(text) and text[start] == '"':
            # A quoted value runs to its closing quote, whatever it contains.
            j = start + 1
            while j < len(text) and not (text[j] == '"' and text[j - 1] != "\\"):
                j += 1
            raw = text[start:j + 1]
            while i + 1 < len(matches) and matches[i + 1].start() <= j:
                i += 1
        else:
            end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
            raw = text[start:end].strip()
        fields.setdefault(m.group(1), _unquote(raw))
        i += 1
    fields.setdefault("event", "message")
    return fields


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """A record's structured fields (from :func:`log`'s ``extra``, else parsed from its message)."""
    given = getattr(record, "cpn_fields", None)
    if given is not None:
        return dict(given)
    try:
        message = record.getMessage()
    except Exception:  # a bad %-format call must not lose the line
        message = str(record.msg)
    return parse(message)


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class KeyValueFormatter(logging.Formatter):
    """``<UTC time> <LEVEL> <logger> event=<name> key=value ...`` (for people and grep)."""

    def format(self, record: logging.LogRecord) -> str:
        fields = fields_of(record)
        repeated = getattr(record, "cpn_repeated", 0)
        if repeated:
            fields["repeated"] = repeated
        event = fields.pop("event", "message")
        body = " ".join([f"event={event}", *(f"{k}={_value(v)}" for k, v in fields.items())])
        line = f"{_timestamp(record)} {record.levelname} {record.name} {body}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``ts``, ``level``, ``logger``, ``event``, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": _timestamp(record), "level": record.levelname, "logger": record.name}
        fields = fields_of(record)
        out["event"] = fields.pop("event", "message")
        for key, value in fields.items():
            out.setdefault(key, value if isinstance(value, (int, float, bool)) or value is None else str(value))
        repeated = getattr(record, "cpn_repeated", 0)
        if repeated:
            out["repeated"] = repeated
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class RepeatFilter(logging.Filter):
    """Lets the same warning through once per ``window_s``: same logger, same text with digits masked.

    The line after a quiet window carries ``repeated=N`` (how many were held back). Records below
    WARNING, and records naming a request or a job, always pass.
    """

    def __init__(self, window_s: float = 60.0, clock: Any = WALL.monotonic) -> None:
        super().__init__()
        self.window_s = window_s
        self.clock = clock
        self._seen: dict[tuple[str, str, str], list[float]] = {}
        """key -> [when last written, held back since]"""

    def __repr__(self) -> str:
        return f"<RepeatFilter keys={len(self._seen)} window_s={self.window_s}>"

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        fields = fields_of(record)
        if any(f in fields for f in _ID_FIELDS):
            return True
        try:
            text = record.getMessage()
        except Exception:
            text = str(record.msg)
        key = (record.name, str(record.levelno), _DIGITS.sub("0", text))
        now = self.clock()
        slot = self._seen.get(key)
        if slot is None or now - slot[0] >= self.window_s:
            if slot is not None and slot[1]:
                record.cpn_repeated = int(slot[1])
            self._seen[key] = [now, 0]
            if len(self._seen) > 10_000:  # bounded memory whatever the keys
                self._seen.clear()
            return True
        slot[1] += 1
        return False


def setup(level: str | None = None, *, json_lines: bool | None = None, stream: TextIO | None = None,
          repeat_window_s: float = 60.0) -> logging.Handler:
    """Configure the root logger once for a cpn process; later calls only change the level.

    Args:
        level: a level name; default ``CPN_LOG`` from the environment, else INFO.
        json_lines: JSON lines instead of key=value; default ``CPN_LOG_JSON=1`` in the environment.
        stream: where lines go (default stderr).
        repeat_window_s: how often the same warning may repeat (see :class:`RepeatFilter`).
    Returns:
        The handler (tests read its stream).
    """
    name = (level or os.environ.get("CPN_LOG") or "INFO").upper()
    if json_lines is None:
        json_lines = os.environ.get("CPN_LOG_JSON", "") not in ("", "0", "false", "no")
    root = logging.getLogger()
    for h in root.handlers:
        if getattr(h, "_cpn", False):
            root.setLevel(name)
            h.setFormatter(JsonFormatter() if json_lines else KeyValueFormatter())
            return h
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else KeyValueFormatter())
    handler.addFilter(RepeatFilter(repeat_window_s))
    handler._cpn = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(name)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return handler
