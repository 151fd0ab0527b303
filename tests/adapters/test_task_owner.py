"""One task owner per process: the services, the bus and the outboxes spawn into the process's
``BackgroundTasks`` (through scopes) or run as children of a call it owns; nothing is left running
outside it, and finished tasks do not accumulate."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats

from controlplane.compose import build
from controlplane.nats.bus import HubBus
from controlplane.nats.natsserver import NatsServer
from controlplane.runtime import BackgroundTasks
from controlplane.services.outbox import CommandOutbox
from controlplane.store.handle import Store
from controlplane.store import outbox as store_outbox
from edge_agent import wire
from tests.support.hubrig import hub_config
from tests.support.waiting import until


def outbox_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("outbox-")]


async def test_a_scope_spawns_into_its_owner_and_closes_only_its_own() -> None:
    owner = BackgroundTasks("hub")
    bus, sites = owner.scope("bus"), owner.scope("sites")
    forever = bus.spawn(asyncio.Event().wait(), "events")
    sweep = sites.spawn(asyncio.Event().wait(), "sweep")
    for i in range(100):
        sites.spawn(asyncio.sleep(0), f"quick-{i}")
    assert "hub:bus:events" in owner.names() and "hub:sites:sweep" in owner.names()
    await until(lambda: len(owner) == 2 and len(sites) == 1, 2, "the quick ones done and dropped from both")
    await sites.close()
    assert sweep.cancelled() and not forever.done() and owner.names() == ["hub:bus:events"]
    await owner.close()  # the owner cancels what every scope left running
    assert forever.cancelled() and len(owner) == 0 and len(bus) == 0


async def test_the_outboxs_senders_are_children_of_its_run(tmp_path: Path, nats_server: NatsServer) -> None:
    # A site that takes the command and never answers holds its sender in the middle of a request.
    site = await nats.connect(nats_server.url)
    got: list[bytes] = []

    async def swallow(msg: object) -> None:
        got.append(msg.data)  # type: ignore[attr-defined]

    await site.subscribe(wire.cmd_subject("x"), cb=swallow)
    store = Store(tmp_path / "hub.db")
    db = store.open()
    bus = HubBus(nats_server.url, on_register=lambda r: wire.RegisterAck(hub="t"), on_heartbeat=lambda hb: None)
    await bus.connect()
    owner = BackgroundTasks("hub")
    try:
        outbox = CommandOutbox(db, bus, clock=lambda: 1_800_000_000.0, timeout_s=60.0)
        store_outbox.enqueue(db, "x", "stop_attempt", "j1", 1, wire.encode(wire.StopAttempt(job="j1", attempt=1)),
                             1_800_000_000.0)
        owner.spawn(outbox.run(), "outbox")
        await until(lambda: got and outbox_tasks(), 5, "the sender waiting on the silent site")
        assert len(owner) == 1  # the run; its sender is its child, not a task of its own
        await owner.close()
        assert not outbox_tasks(), "a sender outlived the outbox's owner"
        assert store_outbox.counts(db)["pending"] == 1  # the entry stays for the next start
    finally:
        await owner.close()
        await bus.close()
        await site.close()
        store.close()


async def test_a_hub_owns_every_background_task_and_drops_finished_ones(tmp_path: Path,
                                                                      nats_server: NatsServer) -> None:
    process = build(hub_config(tmp_path, nats_server.url))
    hub = process.hub
    await hub.start(serve_http=False)
    try:
        names = hub.tasks.names()
        # The bus's event consumer, the outbox sender, the loops of the services: all in one place.
        assert any(n.startswith("hub:bus:event-consumer") for n in names), names  # one per event stream
        for expected in ("hub:sites:sweep", "hub:accounting:usage-flush",
                         "hub:dashboard:sample"):
            assert expected in names, names
        baseline = len(hub.tasks)
        # Heartbeats from 50 sites the hub does not know: each asks the site to register, in a task
        # of its own (no site answers: each ends at once). None of them may stay behind.
        for i in range(50):
            process.services.sites.on_heartbeat(wire.Heartbeat(site=f"ghost{i}", seq=1))
        assert len(hub.tasks) >= baseline + 50
        await until(lambda: len(hub.tasks) == baseline, 10, "every finished task dropped")
        assert hub.tasks.failures == 0
    finally:
        await hub.stop()
    assert len(hub.tasks) == 0
