"""Per-site NATS identities in the network `cpn up` runs: a site cannot act as another, and the hub sees it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import nats

from edge_agent import wire
from edge_agent.nats_barrier import barrier
from tests.support.hubrig import running_network
from tests.support.waiting import until


async def test_a_site_cannot_publish_as_another_or_listen_to_all_and_the_hub_counts_it(tmp_path: Path) -> None:
    async with running_network(tmp_path) as net:
        assert net.hub is not None and net.nats is not None
        hub = net.hub
        user, password = net.site_credentials["hz-edge"]
        errors: list[Exception] = []

        async def on_error(exc: Exception) -> None:
            errors.append(exc)

        rogue = await nats.connect(net.nats.url, user=user, password=password, inbox_prefix=wire.inbox_prefix("hz-edge"),
                                   error_cb=on_error, allow_reconnect=False)
        try:
            # Listening to everything is refused; nothing reaches this subscription.
            seen: list[bytes] = []

            async def spy(msg):  # type: ignore[no-untyped-def]
                seen.append(msg.data)

            await rogue.subscribe("cpn.>", cb=spy)
            # Publishing a heartbeat as sh-edge is refused; the hub never applies it.
            fake = wire.Heartbeat(site="sh-edge", seq=10**6, draining=True)
            await rogue.publish(wire.heartbeat_subject("sh-edge"), wire.encode(fake))
            await barrier(rogue)
            await until(lambda: hub.permission_violations >= 2, 5, "violations counted by the hub")
            assert not hub.registry.get("sh-edge").draining  # type: ignore[union-attr]
            assert seen == []
            await until(lambda: any("permissions violation" in str(e).lower() for e in errors), 5, f"client told: {errors}")
            # Aiming the hub's answer at another site's inbox is dropped and counted.
            await rogue.publish(wire.register_subject("hz-edge"), wire.encode(wire.Register(site="hz-edge")),
                                reply=wire.inbox_prefix("sh-edge") + ".spoof")
            await barrier(rogue)
            await until(lambda: hub.bus.stats.by_kind.get("reply_spoof", 0) == 1, 5, "reply spoof dropped")
            # Its own subjects still work.
            ok = wire.Heartbeat(site="hz-edge", seq=10**6)
            await rogue.publish(wire.heartbeat_subject("hz-edge"), wire.encode(ok))
        finally:
            await rogue.close()
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{hub.http_port}/metrics") as resp:
                text = await resp.text()
        value = next(float(line.split()[1]) for line in text.splitlines() if line.startswith("cpn_nats_permission_violations_total "))
        assert value >= 2


async def test_a_wrong_password_cannot_connect(tmp_path: Path) -> None:
    async with running_network(tmp_path, agents=False) as net:
        assert net.nats is not None
        # Speak the protocol by hand (nats-py leaks its socket when auth fails).
        reader, writer = await asyncio.open_connection("127.0.0.1", net.nats.port)
        try:
            assert (await reader.readline()).startswith(b"INFO ")
            writer.write(b'CONNECT {"user":"site-hz-edge","pass":"guess","verbose":false}\r\nPING\r\n')
            await writer.drain()
            answer = await asyncio.wait_for(reader.readline(), 5)
            assert b"Authorization Violation" in answer
        finally:
            writer.close()
            await writer.wait_closed()
