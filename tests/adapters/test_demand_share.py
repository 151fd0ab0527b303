"""Demand counts from a gateway process reach the deciding controller over a real nats-server; a
malformed report is counted and dropped whole."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from controlplane.nats.bus import HubBus
from controlplane.nats.natsserver import NatsServer
from controlplane.runtime import WallClock
from controlplane.services.demand_share import SUBJECT, DemandShare, Key
from edge_agent import wire
from tests.support.waiting import until

KEY: Key = ("acme", "qwen", "hangzhou", 10.0)


@pytest.fixture
async def buses(nats_server: NatsServer) -> AsyncIterator[tuple[HubBus, HubBus]]:
    made = [HubBus(nats_server.url, name=n, on_register=lambda r: wire.RegisterAck(hub="t"), on_heartbeat=lambda hb: None)
            for n in ("gw", "ctl")]
    for b in made:
        await b.connect()
    try:
        yield made[0], made[1]
    finally:
        for b in made:
            await b.close()


async def test_the_controller_adds_the_gateways_counts_to_its_own(buses: tuple[HubBus, HubBus]) -> None:
    gw_bus, ctl_bus = buses
    served = {KEY: 5, ("acme", "qwen", "shanghai", 5.0): 2}
    gateway = DemandShare(hub_id="gw-1", role="gateway", bus=gw_bus, local=lambda: dict(served), clock=WallClock(),
                          interval_s=5.0)
    own = {KEY: 1}
    controller = DemandShare(hub_id="ctl-1", role="controller", bus=ctl_bus, local=lambda: dict(own),
                             clock=WallClock(), interval_s=5.0)
    await controller.start()
    try:
        await gateway.publish_once()
        await until(lambda: controller.counters["received"] == 1, 5, "the gateway's report")
        assert controller.drain() == {KEY: 6, ("acme", "qwen", "shanghai", 5.0): 2}
        assert controller.drain() == {KEY: 1}  # drained: only its own counts again
        assert gateway.counters["published"] == 1
    finally:
        await controller.stop()


async def test_a_malformed_report_is_counted_and_dropped(buses: tuple[HubBus, HubBus]) -> None:
    gw_bus, ctl_bus = buses
    controller = DemandShare(hub_id="ctl-1", role="controller", bus=ctl_bus, local=dict, clock=WallClock(),
                             interval_s=5.0)
    await controller.start()
    try:
        await gw_bus.publish_hub(SUBJECT, b"not json")
        await gw_bus.publish_hub(SUBJECT, b'{"hub": "gw", "counts": [["acme", "qwen", "hangzhou", 10.0, -3]]}')
        await gw_bus.publish_hub(SUBJECT, b'{"hub": "gw", "counts": [["acme", "qwen", "hangzhou", 0, 3]]}')
        await gw_bus.publish_hub(SUBJECT, b'{"hub": "gw", "counts": [["acme", "qwen", "hangzhou", 10.0, 3]]}')
        await until(lambda: controller.counters["malformed"] + controller.counters["received"] == 4, 5, "four reports")
        assert controller.counters["malformed"] == 3 and ctl_bus.stats.by_kind.get("demand") == 3
        assert controller.drain() == {KEY: 3}
    finally:
        await controller.stop()
