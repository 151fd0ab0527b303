"""Site limits on a real nats-server configured as cpn configures it (natsconf), with the hub's real bus.

Attack rows of issue #11 closed here:
- a site publishing 60 x 900 KB junk events on its own subject: nothing stored, counted;
- a site publishing events with another site's subject (or inbox) as reply: nothing arrives there;
- a site flooding heartbeats: beyond its own bucket they are dropped before decoding, counted,
  and another site's heartbeats still get through.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import RetentionPolicy, StreamConfig

from controlplane.nats import natsconf
from controlplane.nats.bus import HubBus, stored_event_subject
from controlplane.core.sitegate import SiteLimits
from edge_agent import wire
from edge_agent.nats_barrier import barrier
from tests.adapters.test_nats_permissions import connected, server_from, single_text, site_login
from tests.support.waiting import until

SITES = ["a", "b"]


@pytest.fixture
def creds() -> natsconf.CredentialSet:
    return natsconf.generate_credentials(SITES, secrets.token_bytes)


@asynccontextmanager
async def hub_bus(url: str, creds: natsconf.CredentialSet, limits: SiteLimits | None = None,
                  heartbeats: list[wire.Heartbeat] | None = None) -> AsyncIterator[HubBus]:
    seen = heartbeats if heartbeats is not None else []
    bus = HubBus(url, user=creds.hub.user, password=creds.hub.password, strict_inboxes=True,
                 on_register=lambda r: wire.RegisterAck(hub="t"), on_heartbeat=seen.append, site_limits=limits)
    await bus.connect()
    try:
        yield bus
    finally:
        await bus.close()


def event(site: str, seq: int) -> bytes:
    return wire.encode(wire.AttemptStarted(job="j1", attempt=1, seq=seq, site=site, at=0.0))


async def stream_state(hub_nc: Any) -> Any:
    return (await hub_nc.jetstream().stream_info(wire.EVENTS_STREAM)).state


async def test_junk_events_are_refused_before_the_disk_and_counted(tmp_path: Path, creds: natsconf.CredentialSet) -> None:
    async with server_from(tmp_path, "single", single_text(creds, tmp_path)) as server, \
            hub_bus(server.url, creds) as bus, connected(server.url, **site_login(creds, "a")) as a:
        await bus.ensure_event_stream()
        junk = b"\x00" * 900_000
        answers = []
        for i in range(60):
            reply = await a.request(wire.event_subject("a"), junk, headers={"Nats-Msg-Id": f"junk-{i}"}, timeout=3)
            answers.append(json.loads(reply.data))
        assert all(ans["error"]["code"] == 413 for ans in answers), answers[:2]
        assert bus.stats.dropped[("event", "oversize")] == 60
        state = await stream_state(bus.nc)
        assert (state.messages, state.bytes) == (0, 0)
        # A genuine event is stored and its PubAck reaches the site.
        ok = await a.request(wire.event_subject("a"), event("a", 1), headers={"Nats-Msg-Id": "j1:1:1:x"}, timeout=3)
        assert json.loads(ok.data) == {"stream": wire.EVENTS_STREAM, "seq": 1}
        # The stream itself refuses what is too big even from the hub (defence in depth) ...
        info = await bus.nc.jetstream().stream_info(wire.EVENTS_STREAM)
        assert info.config.max_msg_size == SiteLimits().max_event_bytes
        assert info.config.max_bytes == SiteLimits().stream_max_bytes
        assert info.config.discard_new_per_subject
        with pytest.raises(nats.js.errors.APIError):
            await bus.nc.jetstream().publish(stored_event_subject("a"), junk)
        # ... and the account's JetStream storage is bounded.
        account = await bus.nc.jetstream().account_info()
        assert account.limits.max_storage == natsconf.ACCOUNT_MAX_FILE_BYTES
        assert account.limits.max_memory == natsconf.ACCOUNT_MAX_MEMORY_BYTES


async def test_one_sites_backlog_is_bounded_and_never_pushes_out_anothers(tmp_path: Path, creds: natsconf.CredentialSet) -> None:
    limits = SiteLimits(stream_max_msgs_per_site=5)
    async with server_from(tmp_path, "single", single_text(creds, tmp_path)) as server, \
            hub_bus(server.url, creds, limits) as bus, \
            connected(server.url, **site_login(creds, "a")) as a, connected(server.url, **site_login(creds, "b")) as b:
        await bus.ensure_event_stream()  # nobody consumes: the backlog grows
        stored = 0
        for seq in range(1, 11):
            reply = json.loads((await a.request(wire.event_subject("a"), event("a", seq),
                                                headers={"Nats-Msg-Id": f"a{seq}"}, timeout=3)).data)
            stored += "error" not in reply
        assert stored == 5
        for seq in range(1, 4):
            reply = json.loads((await b.request(wire.event_subject("b"), event("b", seq),
                                                headers={"Nats-Msg-Id": f"b{seq}"}, timeout=3)).data)
            assert "error" not in reply, reply
        state = await stream_state(bus.nc)
        assert state.messages == 8


async def test_no_jetstream_answer_lands_on_a_subject_the_site_chose(tmp_path: Path, creds: natsconf.CredentialSet) -> None:
    async with server_from(tmp_path, "single", single_text(creds, tmp_path)) as server, \
            hub_bus(server.url, creds) as bus, \
            connected(server.url, **site_login(creds, "a")) as a, connected(server.url, **site_login(creds, "b")) as b, \
            connected(server.url, user=creds.hub.user, password=creds.hub.password, inbox_prefix=wire.HUB_INBOX_PREFIX) as watcher:
        await bus.ensure_event_stream()
        landed: list[str] = []

        async def record(msg: Any) -> None:
            landed.append(msg.subject)

        for subject in (wire.cmd_subject("b"), wire.infer_subject("b"), wire.inbox_prefix("b") + ".>"):
            await b.subscribe(subject, cb=record)
        for subject in (wire.register_subject("b"), wire.heartbeat_subject("b"), wire.event_subject("b")):
            await watcher.subscribe(subject, cb=record)
        await barrier(b)
        await barrier(watcher)
        targets = [wire.cmd_subject("b"), wire.infer_subject("b"), wire.inbox_prefix("b") + ".x",
                   wire.register_subject("b"), wire.heartbeat_subject("b"), wire.event_subject("b")]
        for i, target in enumerate(targets):
            await a.publish(wire.event_subject("a"), event("a", i + 1), reply=target, headers={"Nats-Msg-Id": f"s{i}"})
        await barrier(a)
        await until(lambda: bus.stats.dropped.get(("event", "reply_spoof"), 0) == len(targets), 5, "spoofs counted")
        # A genuine event after them: once its PubAck is back, anything the spoofs caused has landed too.
        await a.request(wire.event_subject("a"), event("a", 99), headers={"Nats-Msg-Id": "ok"}, timeout=3)
        await barrier(b)
        await barrier(watcher)
        assert landed == []
        assert (await stream_state(bus.nc)).messages == 1


async def test_a_heartbeat_flood_is_cut_per_site_before_decoding(tmp_path: Path, creds: natsconf.CredentialSet) -> None:
    limits = SiteLimits(heartbeat_rate_per_s=2.0, heartbeat_burst=10, max_heartbeat_bytes=4096)
    seen: list[wire.Heartbeat] = []
    async with server_from(tmp_path, "single", single_text(creds, tmp_path)) as server, \
            hub_bus(server.url, creds, limits, seen) as bus, \
            connected(server.url, **site_login(creds, "a")) as a, connected(server.url, **site_login(creds, "b")) as b:
        started = asyncio.get_running_loop().time()
        for seq in range(2000):
            await a.publish(wire.heartbeat_subject("a"), wire.encode(wire.Heartbeat(site="a", seq=seq)))
        big = b"x" * 5000  # the size alone is looked at
        for _ in range(50):
            await a.publish(wire.heartbeat_subject("a"), big)
        await barrier(a)
        for seq in range(5):
            await b.publish(wire.heartbeat_subject("b"), wire.encode(wire.Heartbeat(site="b", seq=seq)))
        await barrier(b)
        await until(lambda: sum(1 for h in seen if h.site == "b") == 5, 5, "b's heartbeats")
        await until(lambda: sum(bus.stats.dropped.values()) >= 2000 + 50 - 10 - 2 * 10, 5, "drops counted")
        elapsed = asyncio.get_running_loop().time() - started
        from_a = sum(1 for h in seen if h.site == "a")
        assert from_a <= 10 + 2.0 * elapsed + 1
        assert bus.stats.dropped[("heartbeat", "oversize")] == 50
        assert bus.stats.dropped[("heartbeat", "rate")] == 2000 - from_a
        assert bus.stats.malformed == 0  # nothing dropped was decoded


async def test_an_old_stream_is_updated_and_its_events_still_consumed(tmp_path: Path, creds: natsconf.CredentialSet) -> None:
    async with server_from(tmp_path, "single", single_text(creds, tmp_path)) as server, \
            hub_bus(server.url, creds) as bus, connected(server.url, **site_login(creds, "a")) as a:
        js = bus.nc.jetstream()
        # What an older hub made: no limits, the sites' own subjects, a durable with a filter.
        await js.add_stream(StreamConfig(name=wire.EVENTS_STREAM, subjects=[wire.EVENT_WILDCARD]))
        await js.pull_subscribe(wire.EVENT_WILDCARD, durable="hub", stream=wire.EVENTS_STREAM)
        await a.request(wire.event_subject("a"), event("a", 1), headers={"Nats-Msg-Id": "old"}, timeout=3)
        await bus.ensure_event_stream()
        info = await js.stream_info(wire.EVENTS_STREAM)
        assert info.config.subjects == ["cpn.v1.events.*"]
        assert info.config.retention == RetentionPolicy.INTEREST
        assert info.config.max_msg_size == SiteLimits().max_event_bytes
        await a.request(wire.event_subject("a"), event("a", 2), headers={"Nats-Msg-Id": "new"}, timeout=3)
        got: list[int] = []

        async def handler(ev: Any) -> None:
            got.append(ev.seq)

        bus.consume_events(handler)
        await until(lambda: sorted(got) == [1, 2], 10, f"old and new events consumed, got {got}")
        # Acknowledged events leave the stream (interest retention): a site's count is its backlog.
        async def drained() -> bool:
            return (await stream_state(bus.nc)).messages == 0

        await until(drained, 5, "the stream to drain", interval_s=0.05)
