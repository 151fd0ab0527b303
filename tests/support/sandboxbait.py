"""What a tenant's job must not reach from inside an executor's sandbox, planted for its tests.

In the agent's data directory: its credentials and another job's checkpoint, world-readable on
purpose (the sandbox must hide them, not merely lack the permission); on the host's loopback: a
listener that counts who reached it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Bait:
    creds: Path
    """the agent's credentials file"""
    other: Path
    """another job's checkpoint directory"""
    port: int
    """the loopback listener's port"""
    connections: int = 0
    """how many connections reached the listener"""


@contextlib.asynccontextmanager
async def planted(data: Path) -> AsyncIterator[Bait]:
    """Plant the bait in the agent data directory ``data``; the listener runs for the block."""
    creds = data / "site.creds"
    other = data / "checkpoints" / "other-job"
    other.mkdir(parents=True)
    creds.write_text("password=hunter2")
    (other / "step-9.ckpt").write_text("someone else's weights")
    for path in (data, data / "checkpoints", other, creds, other / "step-9.ckpt"):
        path.chmod(0o755 if path.is_dir() else 0o644)

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        bait.connections += 1
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    bait = Bait(creds=creds, other=other, port=server.sockets[0].getsockname()[1])
    async with server:
        yield bait
