"""Per-site NATS permissions on a real nats-server started from natsconf's generated configs.

A site may register, heartbeat, answer (streamed) requests and publish events into the hub's
JetStream stream; it may not publish on another site's subjects or listen to ``cpn.>``, and the
hub counts what it tried from the server's log. The same holds behind a leaf node at the site.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from controlplane.nats import natsconf
from controlplane.replicated import kv
from edge_agent import wire
from edge_agent.nats_barrier import barrier
from tests.support.confserver import leaf_port, server_from
from tests.support.waiting import until

SITES = ["a", "b"]
CHUNKS = 200


@asynccontextmanager
async def connected(url: str, **kwargs: Any) -> AsyncIterator[Client]:
    errors: list[str] = kwargs.pop("errors", [])

    async def error_cb(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(url, allow_reconnect=False, error_cb=error_cb, **kwargs)
    try:
        yield nc
    finally:
        await nc.close()


def hub_login(creds: natsconf.CredentialSet) -> dict[str, Any]:
    return {"user": creds.hub.user, "password": creds.hub.password, "inbox_prefix": wire.HUB_INBOX_PREFIX}


def site_login(creds: natsconf.CredentialSet, site: str) -> dict[str, Any]:
    c = creds.sites[site]
    return {"user": c.user, "password": c.password, "inbox_prefix": wire.inbox_prefix(site)}


@pytest.fixture
def creds() -> natsconf.CredentialSet:
    return natsconf.generate_credentials(SITES, secrets.token_bytes)


def single_text(creds: natsconf.CredentialSet, tmp_path: Path, *, leafnodes: bool = False, **perm: Any) -> str:
    text = natsconf.single_server_config(
        creds, host="127.0.0.1", port=-1, store_dir=None,
        leafnode_port=-1 if leafnodes else None, monitor=None,
    )
    if perm:  # rebuild the users with other response limits (used to show why max matters)
        doc_users = natsconf.account_users(creds, **perm)
        text = text.split("accounts:")[0] + natsconf.render(
            {"accounts": {natsconf.ACCOUNT: {"jetstream": "enabled", "users": doc_users}}})
    return text


async def serve_streaming(site_nc: Client, site: str, chunks: int = CHUNKS) -> None:
    """The site's side of streamed inference: chunks, then the result, all to one reply subject."""

    async def on_infer(msg: Msg) -> None:
        req = wire.infer_request_decoder.decode(msg.data)
        for i in range(chunks):
            await site_nc.publish(msg.reply, wire.encode(wire.InferChunk(request_id=req.request_id, index=i, text="t")))
        await site_nc.publish(msg.reply, wire.encode(wire.InferResult(
            request_id=req.request_id, site=site, model=req.model, output="t" * chunks)))

    await site_nc.subscribe(wire.infer_subject(site), cb=on_infer)
    await barrier(site_nc)


async def stream_from(hub_nc: Client, site: str, timeout_s: float = 5.0) -> tuple[int, bool]:
    """Ask ``site`` for a streamed answer; return (chunks received, final result received)."""
    inbox = hub_nc.new_inbox()
    sub = await hub_nc.subscribe(inbox)
    chunks, done = 0, False
    try:
        await hub_nc.publish(wire.infer_subject(site), wire.encode(wire.InferRequest(
            request_id="r1", model="m", stream=True)), reply=inbox)
        while not done:
            try:
                msg = await sub.next_msg(timeout=timeout_s)
            except nats.errors.TimeoutError:
                break
            reply = wire.infer_reply_decoder.decode(msg.data)
            if isinstance(reply, wire.InferChunk):
                chunks += 1
            else:
                done = isinstance(reply, wire.InferResult)
    finally:
        await sub.unsubscribe()
    return chunks, done


async def answer_registrations(hub_nc: Client) -> None:
    async def on_register(msg: Msg) -> None:
        await msg.respond(wire.encode(wire.RegisterAck(hub="test")))

    await hub_nc.subscribe(wire.REGISTER_WILDCARD, cb=on_register)
    await barrier(hub_nc)


async def exercise_allowed_paths(hub_nc: Client, site_nc: Client, site: str) -> None:
    """Everything a well-behaved site does must work under its permissions."""
    # Register: request/reply through the site's own inbox.
    # Interest crosses a leaf link asynchronously, so (like the agent) retry until the hub answers.
    for attempt in range(5):
        try:
            reply = await site_nc.request(wire.register_subject(site), wire.encode(wire.Register(site=site)), timeout=2)
            break
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            if attempt == 4:
                raise
    ack = wire.register_reply_decoder.decode(reply.data)
    assert isinstance(ack, wire.RegisterAck)
    # Heartbeat reaches the hub.
    hb_sub = await hub_nc.subscribe(wire.heartbeat_subject(site))
    await barrier(hub_nc)
    await site_nc.publish(wire.heartbeat_subject(site), wire.encode(wire.Heartbeat(site=site, seq=1)))
    assert (await hb_sub.next_msg(timeout=3)).subject == wire.heartbeat_subject(site)
    await hb_sub.unsubscribe()
    # A streamed answer of 200 chunks plus the result, all on one reply subject.
    await serve_streaming(site_nc, site)
    assert await stream_from(hub_nc, site) == (CHUNKS, True)
    # A command request answered with an Ack.
    async def on_cmd(msg: Msg) -> None:
        await msg.respond(wire.encode(wire.Ack(detail="ok")))

    await site_nc.subscribe(wire.cmd_subject(site), cb=on_cmd)
    await barrier(site_nc)
    reply = await hub_nc.request(wire.cmd_subject(site), wire.encode(wire.Drain(on=True)), timeout=3)
    assert isinstance(wire.command_reply_decoder.decode(reply.data), wire.Ack)
    # An attempt event into JetStream: a plain request with Nats-Msg-Id, PubAck to the site's inbox.
    event = wire.encode(wire.AttemptStarted(job="j1", attempt=1, seq=1, site=site, at=0.0))
    msg_id = wire.event_msg_id("j1", 1, 1)
    first = await site_nc.request(wire.event_subject(site), event, headers={"Nats-Msg-Id": msg_id}, timeout=3)
    again = await site_nc.request(wire.event_subject(site), event, headers={"Nats-Msg-Id": msg_id}, timeout=3)
    assert json.loads(first.data) == {"stream": wire.EVENTS_STREAM, "seq": 1}
    assert json.loads(again.data) == {"stream": wire.EVENTS_STREAM, "seq": 1, "duplicate": True}


async def create_events_stream(hub_nc: Client, *, replicas: int = 1) -> Any:
    """What the hub does with its own identity: the stream and a durable pull consumer."""
    js = hub_nc.jetstream()
    await js.add_stream(name=wire.EVENTS_STREAM, subjects=[wire.EVENT_WILDCARD], num_replicas=replicas)
    return await js.pull_subscribe(wire.EVENT_WILDCARD, durable="hub-events", stream=wire.EVENTS_STREAM)


async def test_site_stays_inside_its_subjects_and_the_hub_counts_violations(
    tmp_path: Path, creds: natsconf.CredentialSet
) -> None:
    counter = natsconf.ViolationCounter()
    async with server_from(tmp_path, "single", single_text(creds, tmp_path), counter.feed) as server:
        a_errors: list[str] = []
        async with connected(server.url, **hub_login(creds)) as hub, \
                connected(server.url, **site_login(creds, "a"), errors=a_errors) as a, \
                connected(server.url, **site_login(creds, "b")) as b:
            seen_by_hub: list[str] = []
            seen_by_a: list[str] = []
            seen_by_b: list[str] = []

            async def hub_cb(msg: Msg) -> None:
                seen_by_hub.append(msg.subject)

            async def a_cb(msg: Msg) -> None:
                seen_by_a.append(msg.subject)

            async def b_cb(msg: Msg) -> None:
                seen_by_b.append(msg.subject)

            await hub.subscribe("cpn.>", cb=hub_cb)
            await b.subscribe(wire.cmd_subject("b"), cb=b_cb)
            await barrier(hub)
            await barrier(b)
            psub = await create_events_stream(hub)
            await answer_registrations(hub)

            # Site a tries to listen to everything and to speak for site b and for the hub.
            await a.subscribe("cpn.>", cb=a_cb)
            await a.subscribe(wire.inbox_prefix("b") + ".>", cb=a_cb)
            await a.publish(wire.heartbeat_subject("b"), b"forged")
            await a.publish(wire.cmd_subject("b"), b"forged command")
            await barrier(a)
            await hub.publish(wire.cmd_subject("b"), wire.encode(wire.Drain()))
            await barrier(hub)

            await until(lambda: counter.total >= 4, what="4 violations in the server log")
            await until(lambda: len(a_errors) >= 4, what="4 permission errors at site a")
            await until(lambda: seen_by_b == [wire.cmd_subject("b")], what="b's own command")
            assert seen_by_a == []  # a heard nothing, not even b's command
            assert wire.heartbeat_subject("b") not in seen_by_hub
            assert seen_by_b == [wire.cmd_subject("b")]  # the forged command never reached b
            assert all("permissions violation" in e for e in a_errors)
            assert counter.by_user == {"site-a": 4}
            assert counter.by_kind == {"publish": 2, "subscribe": 2}
            assert {(v.kind, v.subject) for v in counter.recent} == {
                ("subscribe", "cpn.>"), ("subscribe", "_INBOX.b.>"),
                ("publish", "cpn.v1.site.b.hb"), ("publish", "cpn.v1.site.b.cmd")}
            assert all(v.site == "a" and v.account == natsconf.ACCOUNT for v in counter.recent)

            # Site a still does everything it is meant to do, on the same connection.
            await exercise_allowed_paths(hub, a, "a")
            events = await psub.fetch(1, timeout=3)
            assert events[0].subject == wire.event_subject("a")
            await events[0].ack()
            assert counter.total == 4  # and none of that counted as a violation


async def test_only_the_hub_identity_answers_for_a_lease_holder(tmp_path: Path, creds: natsconf.CredentialSet) -> None:
    """A candidate takes a lease over early when its holder does not answer liveness probes
    (``kv.Record.probe_alive``): a site must neither hear those probes nor answer them for a leader
    (which would keep a dead leader's lease alive), nor send them."""
    counter = natsconf.ViolationCounter()
    async with server_from(tmp_path, "single", single_text(creds, tmp_path), counter.feed) as server:
        async with connected(server.url, **hub_login(creds)) as leader_nc, \
                connected(server.url, **hub_login(creds)) as candidate_nc, \
                connected(server.url, **site_login(creds, "a"), errors=[]) as a:
            leader = kv.Record(leader_nc, kv.BUCKET, 1.0, 1.0)
            candidate = kv.Record(candidate_nc, kv.BUCKET, 1.0, 1.0)
            subject = kv.ALIVE_PREFIX + kv.alive_token("leader-x")
            heard: list[str] = []

            async def answer_for_the_leader(msg: Msg) -> None:
                heard.append(msg.subject)
                if msg.reply:
                    await a.publish(msg.reply, b"leader-x")

            await a.subscribe(subject, cb=answer_for_the_leader)
            await a.subscribe(kv.ALIVE_PREFIX + ">", cb=answer_for_the_leader)
            await a.publish(subject, b"")  # a probe of its own
            await barrier(a)
            await until(lambda: counter.total >= 3, what="3 violations in the server log")
            assert not await candidate.probe_alive("leader-x", 0.5)  # the site could not answer
            holding = [True]
            responder = await leader.answer_alive("leader-x", lambda: holding[0])
            await barrier(leader_nc)
            assert await candidate.probe_alive("leader-x", 2.0)
            assert not await candidate.probe_alive("leader-y", 0.5)  # one holder's answer is not another's
            holding[0] = False
            assert not await candidate.probe_alive("leader-x", 0.5)  # silent once it no longer holds
            await responder.stop()
            assert heard == [] and responder.answered == 1
            assert counter.by_user == {"site-a": 3}
            assert {(v.kind, v.subject) for v in counter.recent} == {
                ("subscribe", subject), ("subscribe", kv.ALIVE_PREFIX + ">"), ("publish", subject)}


async def test_plain_allow_responses_would_cut_a_stream_to_one_message(
    tmp_path: Path, creds: natsconf.CredentialSet
) -> None:
    # Why natsconf sets allow_responses {max: RESPONSE_MAX}: with max 1 (what `true` means) the
    # server drops every chunk after the first.
    async with server_from(tmp_path, "max1", single_text(creds, tmp_path, response_max=1)) as server:
        async with connected(server.url, **hub_login(creds)) as hub, connected(server.url, **site_login(creds, "a")) as a:
            await serve_streaming(a, "a", chunks=5)
            assert await stream_from(hub, "a", timeout_s=1.0) == (1, False)


async def test_site_behind_a_leaf_node_has_the_same_limits(tmp_path: Path, creds: natsconf.CredentialSet) -> None:
    counter = natsconf.ViolationCounter()
    async with server_from(tmp_path, "hub", single_text(creds, tmp_path, leafnodes=True), counter.feed) as hub_server:
        leaf_text = natsconf.leaf_config(
            "a", [f"nats-leaf://127.0.0.1:{leaf_port(hub_server)}"], creds.sites["a"], listen="127.0.0.1:-1")
        async with server_from(tmp_path, "leaf-a", leaf_text) as leaf_server, \
                connected(hub_server.url, **hub_login(creds)) as hub:
            psub = await create_events_stream(hub)
            await answer_registrations(hub)
            seen_by_hub: list[str] = []

            async def hub_cb(msg: Msg) -> None:
                seen_by_hub.append(msg.subject)

            await hub.subscribe("cpn.>", cb=hub_cb)
            await barrier(hub)
            # The agent talks to its local server, without credentials of its own.
            async with connected(leaf_server.url, inbox_prefix=wire.inbox_prefix("a")) as a:
                await until(lambda: "Leafnode connection created" in "\n".join(hub_server.tail()), what="leaf link")
                seen_by_a: list[str] = []

                async def a_cb(msg: Msg) -> None:
                    seen_by_a.append(msg.subject)

                await a.subscribe("cpn.>", cb=a_cb)  # allowed locally, filtered at the link
                await barrier(a)
                await exercise_allowed_paths(hub, a, "a")  # includes 200 chunks over the leaf link
                seen_by_a.clear()
                await a.publish(wire.heartbeat_subject("b"), b"forged")
                await a.publish(wire.heartbeat_subject("a"), b"mine")
                await barrier(a)
                await hub.publish(wire.cmd_subject("b"), b"for b only")
                await barrier(hub)
                await until(lambda: seen_by_hub.count(wire.heartbeat_subject("a")) >= 2, what="a's own heartbeat")
                assert wire.heartbeat_subject("b") not in seen_by_hub
                assert wire.cmd_subject("b") not in seen_by_a
                events = await psub.fetch(1, timeout=3)
                assert events[0].subject == wire.event_subject("a")
    # A well-behaved leaf drops forbidden traffic before the link: the hub's log says nothing
    # (docs/security.md, "what the hub sees").
    assert counter.total == 0


async def test_a_site_identity_cannot_be_used_as_a_leaf(tmp_path: Path, creds: natsconf.CredentialSet) -> None:
    async with server_from(tmp_path, "hub", single_text(creds, tmp_path, leafnodes=True)) as hub_server:
        wrong = natsconf.leaf_config(
            "a", [f"nats-leaf://127.0.0.1:{leaf_port(hub_server)}"], creds.sites["a"], listen="127.0.0.1:-1",
        ).replace("leaf-a:", "site-a:")
        async with server_from(tmp_path, "leaf-a", wrong):
            # allowed_connection_types: the client identity is refused on the leaf-node port.
            refused = 'authentication error - User "site-a"'
            await until(lambda: refused in "\n".join(hub_server.tail()), what="refused leaf")
            assert "Leafnode connection closed: Authentication Failure" in "\n".join(hub_server.tail())
