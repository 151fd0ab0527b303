"""Logging set-up for cpn commands: the one structured format of :mod:`edge_agent.logs`.

Lines look like ``2026-11-21T12:00:00.123Z INFO cpn.hub event=site_lost site=sh-edge ...``, or one
JSON object a line with ``--log-json`` (or ``CPN_LOG_JSON=1``); repeated warnings are
rate-limited. Hub code writes messages as ``event=name key=value`` (with ``event=`` first) so they
can be grepped by request id or job id, and the JSON formatter turns them into fields. While the
gateway handles a request, every line (whichever module writes it) carries ``request_id``.
"""

from __future__ import annotations

import argparse
import contextvars
from collections.abc import Mapping

from edge_agent import logs as _logs

bound = _logs.bound
"""``with logs.bound(job="job-1"): ...``: every line logged inside carries ``job=job-1``."""


def bind_request(request_id: str, client_request_id: str = "") -> contextvars.Token[Mapping[str, str] | None]:
    """Bind the hub's ``request_id`` (and the client's own ``X-Request-Id`` when it sent one) to every
    line logged until :func:`unbind` (the gateway's request guard brackets each request with them)."""
    fields = {"request_id": request_id}
    if client_request_id and client_request_id != request_id:
        fields["client_request_id"] = client_request_id
    return _logs.CONTEXT.set(fields)


def unbind(token: contextvars.Token[Mapping[str, str] | None]) -> None:
    """Undo :func:`bind_request`."""
    _logs.CONTEXT.reset(token)


def setup(level: str | None = None, *, json_lines: bool | None = None) -> None:
    """Configure the root logger once (level from the argument, else CPN_LOG, else INFO)."""
    _logs.setup(level, json_lines=json_lines)


def add_arguments(parser: argparse.ArgumentParser, *, default_level: str | None = None) -> None:
    """``--log-level`` and ``--log-json`` for a command that runs a long-lived process."""
    if not any("--log-level" in a.option_strings for a in parser._actions):
        parser.add_argument("--log-level", default=default_level,
                            help="DEBUG, INFO, WARNING or ERROR (default: CPN_LOG, else INFO)")
    parser.add_argument("--log-json", action="store_true", default=None,
                        help="one JSON object per log line (default: key=value; or set CPN_LOG_JSON=1)")
