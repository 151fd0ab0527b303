"""Starting a real hub (SQLite file, gateway on port 0, real NATS) for adapter and e2e tests, or the
whole demo-3 network as ``cpn up`` runs it in process."""

from __future__ import annotations

import io
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from controlplane.config import HubConfig
from controlplane.core.clock import Clock
from controlplane.hub import Hub
from controlplane.compose import build
from controlplane.services.record import Services
from controlplane.tools import up
from topology import loader

DEMO3 = Path(loader.default_path()).parent / "demo-3.toml"


def hub_config(tmp: Path, nats_url: str, **kw: Any) -> HubConfig:
    base: dict[str, Any] = dict(
        nats_url=nats_url, db_path=str(tmp / "hub.db"), listen_port=0, layout=str(DEMO3), seed=1,
        heartbeat_s=1.0, miss_limit=3, site_timeout_s=3.0,
        # The tests' sites offer their own models to the tests' tenants (what they test is routing,
        # failover, the API); the trust tests pass local_model_tenants=[] to get the default.
        local_model_tenants=["*"],
    )
    base.update(kw)
    return HubConfig(**base)


_SERVICES: weakref.WeakKeyDictionary[Hub, Services] = weakref.WeakKeyDictionary()


def services_of(hub: Hub) -> Services:
    """The typed record of the services of a hub started by :func:`running_hub`."""
    return _SERVICES[hub]


@asynccontextmanager
async def running_hub(config: HubConfig, *, clock: Clock | None = None) -> AsyncIterator[Hub]:
    """A started hub (stopped on exit); ``clock``: a ``tests.support.manualclock.ManualClock`` to move the
    hub's time by hand, the wall clock if not given."""
    proc = build(config, clock=clock)
    hub = proc.hub
    _SERVICES[hub] = proc.services
    await hub.start()
    try:
        yield hub
    finally:
        await hub.stop()


class Client:
    """A tenant's or operator's HTTP view of a hub."""

    def __init__(self, session: aiohttp.ClientSession, base: str, key: str | None) -> None:
        self.session = session
        self.base = base
        self.key = key

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        h = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        h.update(extra or {})
        return h

    async def call(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
        data: Any = raw if raw is not None else (msgspec.json.encode(body) if body is not None else None)
        if isinstance(data, bytes) and len(data) > 1 << 20:
            data = io.BytesIO(data)  # aiohttp warns about large raw bodies
        async with self.session.request(method, self.base + path, data=data, headers=self.headers(headers)) as resp:
            text = await resp.read()
            try:
                payload = msgspec.json.decode(text) if text else None
            except msgspec.DecodeError:
                payload = text.decode(errors="replace")
            return resp.status, payload, dict(resp.headers)


@asynccontextmanager
async def running_network(tmp_path: Path, **kw: Any) -> AsyncIterator[up.Network]:
    """``cpn up``'s network of the demo-3 layout in this process (ports 0), started, stopped on exit;
    ``kw``: more :class:`up.UpOptions` (``agents=False``: no agents)."""
    net = up.Network(up.UpOptions(data_dir=tmp_path / "cpn", port=0, nats_port=0, layout=str(DEMO3), **kw))
    await net.start()
    try:
        yield net
    finally:
        await net.stop()
