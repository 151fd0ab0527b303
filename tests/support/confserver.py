"""A nats-server started from a config text (what ``cpn deploy nats-config`` writes, made runnable
here), and the leafnode port it logs."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from controlplane.nats.natsserver import NatsServer


@asynccontextmanager
async def server_from(tmp_path: Path, name: str, text: str,
                      on_line: Callable[[str], None] | None = None) -> AsyncIterator[NatsServer]:
    """The server of config ``text`` (written to ``tmp_path/<name>.conf``), started, stopped on exit."""
    conf = tmp_path / f"{name}.conf"
    conf.write_text(text)
    # port=-1: nats-server's "random port" (-p 0 means its default, 4222).
    async with NatsServer(tmp_path / f"{name}-js", port=-1, config=conf, on_line=on_line) as server:
        yield server


def leaf_port(server: NatsServer) -> int:
    """The port ``server`` listens on for leaf nodes, from its log."""
    for line in server.tail():
        m = re.search(r"Listening for leafnode connections on [^ ]+:(\d+)", line)
        if m:
            return int(m.group(1))
    raise AssertionError("the server logged no leafnode port")
