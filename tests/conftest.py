"""Shared fixtures: a real nats-server from the wheel on port 0, and a real 3-node cluster of them,
stopped after the test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controlplane.nats.natsserver import NatsServer
from tests.support.natscluster import NatsCluster


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    async with NatsServer(tmp_path / "jetstream") as server:
        yield server


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    """Three nats-server nodes joined by routes, JetStream with ``sync_interval: always``."""
    async with NatsCluster(tmp_path / "nats") as c:
        yield c
