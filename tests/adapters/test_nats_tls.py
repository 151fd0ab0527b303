"""NATS links are encrypted: configs and certificates from ``cpn deploy nats-config`` on real nats-servers.

The hub's bus and an agent's bus verify the server (CA and host name) and work over TLS; a client
without the CA, with another CA, or dialling a name the certificate does not carry is refused; a
site's leaf node dials the hub over TLS with its own certificate and traffic crosses it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import ssl
from pathlib import Path
from typing import Any

import nats
import pytest

from controlplane import cli
from controlplane.nats import natscerts, natsconf
from controlplane.nats.bus import HubBus
from controlplane.core.errors import BusUnavailable
from controlplane.nats.natsserver import NatsServer
from edge_agent import config as agent_config
from edge_agent import wire
from edge_agent.bus import AgentBus
from edge_agent.nats_barrier import barrier
from tests.support.confserver import leaf_port, server_from
from tests.support.waiting import until


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tls") / "nats"
    assert cli.main(["deploy", "nats-config", "--sites", "a,b", "--out", str(out), "--server-name", "127.0.0.1"]) == 0
    return out


def creds_of(out: Path, name: str) -> natsconf.CredentialsFile:
    return natsconf.read_credentials_file((out / "creds" / f"{name}.json").read_bytes())


def for_test(text: str, store: Path) -> str:
    """A generated server config made runnable here: loopback, ports from the server, no monitor."""
    text = re.sub(r'listen: "0\.0\.0\.0:(\d+)"', 'listen: "127.0.0.1:-1"', text)
    text = re.sub(r'jetstream: \{\n  store_dir: "[^"]*"\n  sync_interval: "always"\n\}', "jetstream: enabled", text)
    return text.replace('http: "127.0.0.1:8222"\n', "")


def hub_bus(url: str, out: Path, **tls: Any) -> HubBus:
    hub = creds_of(out, "hub")
    options = {"tls_ca": hub.tls_ca} | tls
    return HubBus(url, user=hub.user, password=hub.password, strict_inboxes=True,
                  on_register=lambda r: wire.RegisterAck(hub="tls"), on_heartbeat=lambda h: None, **options)


def agent_bus(url: str, out: Path, site: str, **extra: Any) -> AgentBus:
    c = creds_of(out, site)
    raw: dict[str, object] = {"site": site, "nats": url, "user": c.user, "password": c.password, "tls_ca": c.tls_ca}
    return AgentBus(agent_config.from_dict(raw | extra))


async def test_hub_and_agent_verify_the_server_and_talk_over_tls(tmp_path: Path, out: Path) -> None:
    text = for_test((out / "single" / "nats-server.conf").read_text(), tmp_path)
    assert "tls: {" in text
    async with server_from(tmp_path, "single", text) as srv:
        bus = hub_bus(srv.url, out)
        await bus.connect()
        assert not bus.clustered  # a single server: the hub's default is one event replica
        agent = agent_bus(srv.url, out, "a")
        try:
            await agent.connect()
            assert bus.nc.connected_url.scheme == "tls" and agent._nc is not None
            assert agent._nc.connected_url.scheme == "tls"
            reply = await agent.request(wire.register_subject("a"), wire.encode(wire.Register(site="a")), timeout_s=3)
            assert isinstance(wire.register_reply_decoder.decode(reply), wire.RegisterAck)
            # Mutual TLS works too where a server asks for it (the client certificate is accepted).
            c = creds_of(out, "a")
            mutual = agent_bus(srv.url, out, "a", tls_cert=c.tls_cert, tls_key=c.tls_key)
            await mutual.connect()
            await mutual.close()
        finally:
            await agent.close()
            await bus.close()


async def test_a_client_that_cannot_verify_the_server_is_refused(tmp_path: Path, out: Path) -> None:
    text = for_test((out / "single" / "nats-server.conf").read_text(), tmp_path)
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_bytes(natscerts.make_ca(dt.datetime.now(dt.timezone.utc)).cert)
    async with server_from(tmp_path, "single", text) as srv:
        hub = creds_of(out, "hub")
        # No CA: nats-py falls back to the system's CAs, which never signed this server.
        with pytest.raises((ssl.SSLError, nats.errors.NoServersError, OSError)):
            await nats.connect(srv.url, user=hub.user, password=hub.password, allow_reconnect=False,
                               max_reconnect_attempts=0, connect_timeout=2)
        # Another CA: refused.
        with pytest.raises(BusUnavailable):
            await hub_bus(srv.url, out, tls_ca=str(other_ca)).connect(timeout_s=1.0)
        # The right CA but a host name the certificate does not carry: refused.
        with pytest.raises(BusUnavailable):
            await hub_bus(f"nats://localhost:{srv.port}", out).connect(timeout_s=1.0)
        # Plain text is not spoken at all: the server wants TLS first.
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        try:
            info = await asyncio.wait_for(reader.readline(), 3)
            assert b'"tls_required":true' in info
        finally:
            writer.close()
            await writer.wait_closed()


async def test_a_leaf_node_dials_the_hub_over_tls_and_traffic_crosses(tmp_path: Path, out: Path) -> None:
    text = for_test((out / "single" / "nats-server.conf").read_text(), tmp_path)
    async with server_from(tmp_path, "hub", text) as hub_srv:
        c = creds_of(out, "a")
        leaf_text = natsconf.leaf_config(
            "a", [f"nats-leaf://127.0.0.1:{leaf_port(hub_srv)}"],
            natsconf.Credentials(user=c.user, password=c.password, site="a"), listen="127.0.0.1:-1",
            tls=natsconf.tls_files(str(out / "tls"), natsconf.leaf_user("a")))
        assert f"tls://leaf-a:{c.password}@127.0.0.1:" in leaf_text
        async with server_from(tmp_path, "leaf-a", leaf_text) as leaf_srv:
            await until(lambda: "Leafnode connection created" in "\n".join(hub_srv.tail()), 10, "TLS leaf link")
            seen: list[wire.Heartbeat] = []
            bus = HubBus(hub_srv.url, user=creds_of(out, "hub").user, password=creds_of(out, "hub").password,
                         tls_ca=creds_of(out, "hub").tls_ca, strict_inboxes=True,
                         on_register=lambda r: wire.RegisterAck(hub="tls"), on_heartbeat=seen.append)
            await bus.connect()
            # The agent at the site speaks plain to its own loopback leaf server.
            agent = AgentBus(agent_config.from_dict({"site": "a", "nats": leaf_srv.url}))
            try:
                await agent.connect()
                replies: list[bytes] = []
                errors: list[Exception] = []

                async def answered(subject: str, data: bytes, **kw: Any) -> bool:
                    try:
                        replies.append(await agent.request(subject, data, timeout_s=1, **kw))
                    except Exception as exc:  # interest crosses the leaf link asynchronously: ask again
                        errors.append(exc)
                    return bool(replies)

                await until(lambda: answered(wire.register_subject("a"), wire.encode(wire.Register(site="a"))), 30,
                            "registration across the TLS leaf link", interval_s=0.1, last=lambda: errors[-1:])
                assert isinstance(wire.register_reply_decoder.decode(replies.pop()), wire.RegisterAck)
                await agent.publish(wire.heartbeat_subject("a"), wire.encode(wire.Heartbeat(site="a", seq=1)))
                await agent.flush()
                await until(lambda: len(seen) == 1, 5, "heartbeat across the TLS leaf link")
                # An event through the leaf: the hub stores it and its PubAck comes back the same way.
                await bus.ensure_event_stream()
                event = wire.encode(wire.AttemptStarted(job="j1", attempt=1, seq=1, site="a", at=0.0))
                # The hub's new queue interest crosses the leaf link asynchronously too.
                await until(lambda: answered(wire.event_subject("a"), event, headers={"Nats-Msg-Id": "j1:1:1:x"}), 30,
                            "an event's PubAck across the TLS leaf link", interval_s=0.1, last=lambda: errors[-1:])
                assert b'"stream":"CPN_EVENTS"' in replies.pop()
            finally:
                await agent.close()
                await bus.close()


async def test_a_leaf_without_a_certificate_of_the_ca_is_refused(tmp_path: Path, out: Path) -> None:
    text = for_test((out / "single" / "nats-server.conf").read_text(), tmp_path)
    async with server_from(tmp_path, "hub", text) as hub_srv:
        c = creds_of(out, "a")
        files = natsconf.tls_files(str(out / "tls"), natsconf.leaf_user("a"))
        # The right password and CA, but no client certificate: the hub's leaf port verifies clients.
        leaf_text = natsconf.leaf_config(
            "a", [f"nats-leaf://127.0.0.1:{leaf_port(hub_srv)}"],
            natsconf.Credentials(user=c.user, password=c.password, site="a"), listen="127.0.0.1:-1", tls=files)
        leaf_text = re.sub(r'\n\s*cert_file: "[^"]*"\n\s*key_file: "[^"]*"', "", leaf_text)
        async with server_from(tmp_path, "leaf-a", leaf_text):
            await until(lambda: "client didn't provide a certificate" in "\n".join(hub_srv.tail()), 10, "refused leaf")
            await until(lambda: "Leafnode connection closed: TLS Handshake Failure" in "\n".join(hub_srv.tail()), 5, "closed")


def free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def test_a_leaf_reaches_a_tls_cluster_and_crosses_its_routes(tmp_path: Path) -> None:
    """The 3-node cluster scaled down onto 127.0.0.1-3: routes and the leaf link are TLS, mutual."""
    hosts = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    out = tmp_path / "nats"
    argv = ["deploy", "nats-config", "--sites", "a", "--out", str(out)]
    for host in hosts:
        argv += ["--cluster-host", host]
    assert cli.main(argv) == 0
    route_port = free_port("127.0.0.1")
    servers: list[NatsServer] = []
    try:
        for i, host in enumerate(hosts, 1):
            text = (out / "cluster" / f"node-{i}.conf").read_text()
            assert text.count("verify: true") == 2  # routes and leaf connections: mutual TLS
            text = text.replace('listen: "0.0.0.0:6222"', f'listen: "{host}:{route_port}"')
            text = re.sub(r"@(127\.0\.0\.\d):6222", rf"@\1:{route_port}", text)
            text = text.replace('listen: "0.0.0.0:7422"', f'listen: "{host}:-1"')
            text = for_test(text, tmp_path)
            conf = tmp_path / f"node-{i}.conf"
            conf.write_text(text)
            srv = NatsServer(tmp_path / f"node-{i}-js", host=host, port=-1, config=conf)
            servers.append(srv)
        await asyncio.gather(*(srv.start(timeout_s=20) for srv in servers))
        hub = creds_of(out, "hub")
        seen: list[wire.Heartbeat] = []
        bus = HubBus(servers[1].url, user=hub.user, password=hub.password, tls_ca=hub.tls_ca, strict_inboxes=True,
                     on_register=lambda r: wire.RegisterAck(hub="tls"), on_heartbeat=seen.append)
        await bus.connect(timeout_s=10)
        try:
            assert bus.clustered  # so a hub with event_stream_replicas = 0 (default) asks for 3
            # A replicated stream needs the JetStream cluster, i.e. the TLS routes, to be up.
            errors: list[Exception] = []

            async def stream_made() -> bool:
                try:
                    await bus.ensure_event_stream(replicas=3)
                    return True
                except Exception as exc:
                    errors.append(exc)
                    return False

            await until(stream_made, 30, "the replicated event stream", interval_s=0.2, last=lambda: errors[-1:])
            c = creds_of(out, "a")
            leaf_text = natsconf.leaf_config(
                "a", [f"nats-leaf://127.0.0.1:{leaf_port(servers[0])}"],
                natsconf.Credentials(user=c.user, password=c.password, site="a"), listen="127.0.0.1:-1",
                tls=natsconf.tls_files(str(out / "tls"), natsconf.leaf_user("a")))
            async with server_from(tmp_path, "leaf-a", leaf_text) as leaf_srv:
                agent = AgentBus(agent_config.from_dict({"site": "a", "nats": leaf_srv.url}))
                await agent.connect()
                try:
                    # Leaf at node 1, hub at node 2: the heartbeat crosses the leaf link and a route.
                    async def beat() -> bool:
                        await agent.publish(wire.heartbeat_subject("a"), wire.encode(wire.Heartbeat(site="a", seq=1)))
                        await agent.flush()
                        return bool(seen)

                    await until(beat, 10, "a heartbeat across the leaf link and a route", interval_s=0.1)
                    assert seen[0].site == "a"
                finally:
                    await agent.close()
        finally:
            await bus.close()
    finally:
        await asyncio.gather(*(srv.stop() for srv in servers), return_exceptions=True)


async def test_the_record_opens_with_the_hubs_nats_identity_and_tls(tmp_path: Path, out: Path) -> None:
    """A hub on the replicated record connects to it as it connects its bus: with its NATS user and
    TLS files (the record's and the leadership's connections had neither, so a hub on the servers
    of ``cpn deploy nats-config`` could not open its record); never in clear."""
    from controlplane.compose import record_connection
    from controlplane.config import HubConfig
    from controlplane.replicated.kv import Record

    text = for_test((out / "single" / "nats-server.conf").read_text(), tmp_path)
    hub = creds_of(out, "hub")
    async with server_from(tmp_path, "single", text) as srv:
        config = HubConfig(record="nats", nats_url=f"nats://127.0.0.1:{srv.port}", nats_user=hub.user,
                           nats_password=hub.password, nats_tls_ca=hub.tls_ca)
        urls, connect = record_connection(config)
        assert urls == [f"tls://127.0.0.1:{srv.port}"] and connect["user"] == hub.user
        record = await Record.open(urls, replicas=1, connect=connect, write_deadline_s=10)
        try:
            revision = await record.create("t.one", b"x")
            assert (await record.get("t.one")).revision == revision
        finally:
            await record.close()
