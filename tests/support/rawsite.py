"""A site played by a bare NATS client (``RawSite``), for tests that need to hold, refuse or forge
what an agent would say: it registers and heartbeats like one, and answers commands only once told
to (``serve_commands``), with what ``answer`` returns. The ``site`` fixture gives each test one
(import it into the test module); ``submit`` sends ``JOB``, a small sim training job, and ``dispatched``
sends it to the site and waits until the hub did. ``raw_agent`` is a simpler one that only serves
inference.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import nats
import pytest

from controlplane.nats.natsserver import NatsServer
from controlplane.store import jobs as store_jobs
from edge_agent import wire
from edge_agent.nats_barrier import barrier
from tests.support.hubrig import Client
from tests.support.waiting import until

JOB = {"name": "t", "cards": 2, "accelerators": ["910B"], "est_hours": 1.0, "checkpoint_interval_min": 10}


class RawSite:
    """hz-edge as a bare NATS client: Register, heartbeats every 0.3 s (listing the attempts it
    acknowledged and was not told to stop, as an agent does), commands answered by ``answer``."""

    def __init__(self, url: str, site: str = "hz-edge") -> None:
        self.url = url
        self.site = site
        self.nc: Any = None
        self.commands: list[Any] = []
        self.running: dict[tuple[str, int], float] = {}
        """(job, attempt) -> progress: what the heartbeats list"""
        self.answer: Callable[[Any], Any] = lambda cmd: wire.Ack(detail="ok")
        self._beat: asyncio.Task[None] | None = None
        self._sub: Any = None

    async def start(self) -> None:
        self.nc = await nats.connect(self.url)
        await self.register()
        self._beat = asyncio.create_task(self._heartbeats())

    async def register(self) -> None:
        msg = wire.Register(site=self.site, tier="edge", city="hangzhou", accelerators={"910B": 4}, executors=["sim"])
        reply = await self.nc.request(wire.register_subject(self.site), wire.encode(msg), timeout=5)
        assert isinstance(wire.register_reply_decoder.decode(reply.data), wire.RegisterAck)

    async def _heartbeats(self) -> None:
        seq = 0
        while True:
            seq += 1
            hb = wire.Heartbeat(site=self.site, seq=seq, free_cards={"910B": 4.0}, attempts=[
                wire.AttemptRef(job=j, attempt=a, progress=p) for (j, a), p in self.running.items()])
            await self.nc.publish(wire.heartbeat_subject(self.site), wire.encode(hb))
            await asyncio.sleep(0.3)  # the site's heartbeat period

    async def serve_commands(self) -> None:
        async def on_cmd(msg: Any) -> None:
            cmd = wire.command_decoder.decode(msg.data)
            if isinstance(cmd, wire.Reregister):  # a new hub asks who we are, as it would an agent
                await msg.respond(wire.encode(wire.Ack(detail="registering")))
                await self.register()
                return
            self.commands.append(cmd)
            answer = self.answer(cmd)
            if isinstance(cmd, wire.StartAttempt) and isinstance(answer, wire.Ack):
                self.running[(cmd.job, cmd.attempt)] = cmd.progress
            elif isinstance(cmd, wire.StopAttempt):
                self.running.pop((cmd.job, cmd.attempt), None)
            await msg.respond(wire.encode(answer))

        self._sub = await self.nc.subscribe(wire.cmd_subject(self.site), cb=on_cmd)
        await barrier(self.nc)

    async def publish_event(self, event: Any, site: str | None = None, key: str = "") -> None:
        """Publish an attempt event as an agent does (on ``site``'s subject; ``key``: the attempt's
        ``event_key``, which only the site holding the attempt knows): a request whose reply is in
        the publishing site's own inbox; the hub stores it and relays JetStream's PubAck."""
        msg_id = wire.event_msg_id(event.job, event.attempt, event.seq, key)
        who = site or self.site
        inbox = f"{wire.inbox_prefix(who)}.{secrets.token_hex(8)}"
        sub = await self.nc.subscribe(inbox, max_msgs=1)
        await self.nc.publish(wire.event_subject(who), wire.encode(event), reply=inbox, headers={"Nats-Msg-Id": msg_id})
        ack = await sub.next_msg(timeout=5)
        assert b'"stream"' in ack.data, ack.data

    async def close(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
            await asyncio.gather(self._beat, return_exceptions=True)
        await self.nc.close()

    async def join(self, hub: Any) -> None:
        """Register, heartbeat and answer commands, and wait until ``hub`` lists this site."""
        await self.start()
        await self.serve_commands()
        await until(lambda: hub.registry.get(self.site) is not None, 5, "site registered")


@pytest.fixture
async def site(nats_server: NatsServer) -> AsyncIterator[RawSite]:
    peer = RawSite(nats_server.url)
    try:
        yield peer
    finally:
        await peer.close()


async def submit(hub: Any, key: str) -> str:
    async with aiohttp.ClientSession() as session:
        status, body, _ = await Client(session, f"http://127.0.0.1:{hub.http_port}", key).call("POST", "/v1/jobs", JOB)
    assert status == 201, body
    return str(body["id"])


async def dispatched(hub: Any, site: RawSite) -> str:
    """Tenant acme's ``JOB`` sent to ``site``: create the tenant, ``site.join(hub)``, submit and wait
    until the hub has sent its StartAttempt (state ``starting``); the job's id."""
    key = hub.create_tenant("acme")
    await site.join(hub)
    jid = await submit(hub, key)
    await until(lambda: store_jobs.get_job(hub.db, jid).state == "starting", 10, "dispatched")  # type: ignore[union-attr]
    return jid


async def raw_agent(url: str, site: str, city: str, model: str = "m") -> tuple[object, asyncio.Task[None]]:
    """A site ``site`` in ``city`` played by a bare NATS client serving ``model``: registered,
    heartbeating every 0.2 s (8 free slots), each inference answered at once with ``site:prompt``
    (a stream whole, as its tail). Returns the connection and the heartbeats' task (cancel it, then
    close the connection)."""
    nc = await nats.connect(url)

    async def on_infer(msg):  # type: ignore[no-untyped-def]
        req = wire.infer_request_decoder.decode(msg.data)
        output = f"{site}:{req.prompt}"
        tail = output if req.stream and req.tail_ok else ""  # a stream answered whole: all of it a tail
        await msg.respond(wire.encode(wire.InferResult(request_id=req.request_id, site=site, model=req.model,
                                                        output=output, completion_tokens=2, tail=tail)))

    await nc.subscribe(wire.infer_subject(site), cb=on_infer)
    ack = await nc.request(wire.register_subject(site), wire.encode(wire.Register(site=site, city=city)), timeout=2)
    assert isinstance(wire.register_reply_decoder.decode(ack.data), wire.RegisterAck)

    async def beat() -> None:
        seq = 0
        while True:
            seq += 1
            hb = wire.Heartbeat(site=site, seq=seq, models=[wire.ReplicaStatus(model=model, slots=8)])
            await nc.publish(wire.heartbeat_subject(site), wire.encode(hb))
            await asyncio.sleep(0.2)  # the site's heartbeat period

    return nc, asyncio.create_task(beat())
