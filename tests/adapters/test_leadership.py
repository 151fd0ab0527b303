"""Roles and the leader: several hub processes on one replicated record, exactly one controller
deciding, its epoch on every command and its fence on every commit (issue: no single hub).

Real parts: a 3-node nats-server cluster on loopback, hub processes with their own SQLite
projections and HTTP gateways.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controlplane.compose import HubProcess, build
from controlplane.core.errors import RecordConflict
from controlplane.replicated.kv import Fence
from controlplane.services.leadership import LEASE
from controlplane.store import tenants as store_tenants
from controlplane.store.db import transaction
from tests.support.hubrig import Client, hub_config
from tests.support.natscluster import NatsCluster
from tests.support.waiting import until


async def started(tmp: Path, cluster: NatsCluster, name: str, **kw: Any) -> HubProcess:
    (tmp / name).mkdir(exist_ok=True)
    proc = build(hub_config(tmp / name, ",".join(cluster.urls), hub_id=name, record="nats", **kw))
    await proc.hub.start(serve_http=kw.get("role", "hub") != "controller")
    return proc


def leaders(*procs: HubProcess) -> list[HubProcess]:
    return [p for p in procs if p.services.leadership.leading]


async def test_one_of_two_hubs_leads_the_other_takes_over_when_it_stops(tmp_path: Path, cluster: NatsCluster) -> None:
    a = await started(tmp_path, cluster, "hub-a")
    b = await started(tmp_path, cluster, "hub-b")
    try:
        await until(lambda: len(leaders(a, b)) == 1, 10, "one leader")
        (leader,) = leaders(a, b)
        other = b if leader is a else a
        epoch = leader.services.leadership.epoch
        assert epoch > 0
        # The leader stamps its epoch on commands; the other stamps none and runs no scheduler.
        assert leader.hub.bus.epoch() == epoch and other.hub.bus.epoch() == 0
        assert leader.services.training.outbox is not None and other.services.training.outbox is None
        # ... and says so in its metrics (a Grafana panel of who leads, and under which epoch).
        assert leader.hub.metrics.leading.labels("hub")._value.get() == 1  # type: ignore[attr-defined]
        assert leader.hub.metrics.leader_epoch._value.get() == epoch  # type: ignore[attr-defined]
        assert other.hub.metrics.leading.labels("hub")._value.get() == 0  # type: ignore[attr-defined]

        # Any gateway tells who leads, with the epoch, the processes and the record's NATS nodes.
        admin = other.hub.create_admin_key("test")
        async with aiohttp.ClientSession() as session:
            view: dict[str, Any] = {}

            async def both_seen() -> bool:
                status, body, _ = await Client(session, f"http://127.0.0.1:{other.hub.http_port}", admin).call(
                    "GET", "/v1/cluster")
                assert status == 200, body
                view.update(body)
                up = [p for p in body["processes"] if p["state"] == "up"]
                return len(up) == 2 and any(p["leading"] for p in up)

            deadline = time.monotonic() + 10
            while not await both_seen():
                assert time.monotonic() < deadline, view
            assert view["leader"]["hub_id"] == leader.hub.config.hub_id and view["leader"]["epoch"] == epoch
            assert {p["hub_id"] for p in view["processes"]} == {"hub-a", "hub-b"}
            assert [p["leading"] for p in view["processes"] if p["hub_id"] == leader.hub.config.hub_id] == [True]
            assert len(view["nats_nodes"]) == 3 and sum(n["leader"] for n in view["nats_nodes"]) == 1

        # The leader stops (steps down and releases the lease): the other leads within 5 s, newer epoch.
        t0 = time.monotonic()
        await leader.hub.stop()
        await until(lambda: other.services.leadership.leading, 5, "takeover")
        assert time.monotonic() - t0 < 5
        assert other.services.leadership.epoch > epoch and other.hub.bus.epoch() == other.services.leadership.epoch
        assert other.services.training.outbox is not None
    finally:
        for p in (a, b):
            await p.hub.stop()


async def test_a_deposed_leaders_writes_are_fenced(tmp_path: Path, cluster: NatsCluster) -> None:
    a = await started(tmp_path, cluster, "hub-a")
    try:
        await until(lambda: a.services.leadership.leading, 10, "a leads")
        old = a.services.leadership.epoch
        b = await started(tmp_path, cluster, "hub-b")
        try:
            await a.services.leadership.stop()  # a steps down (as if its lease ran out) ...
            await until(lambda: b.services.leadership.leading, 5, "b leads")
            # ... but, frozen, still believes it leads: its next commit carries its old fence.
            bridge = a.hub.store.db.write_hook.bridge
            bridge.fence = Fence(LEASE, old)
            with pytest.raises(RecordConflict, match="no longer leads"):
                with transaction(a.hub.store.db) as db:
                    store_tenants.create_tenant(db, "sneaky", now=time.time())
            bridge.fence = None
            assert "sneaky" not in {t["id"] for t in store_tenants.list_tenants(a.hub.store.db)}  # rolled back
            # Unfenced again (what stepping down does), the same process writes as a gateway would.
            with transaction(a.hub.store.db) as db:
                store_tenants.create_tenant(db, "plain", now=time.time())
            await until(lambda: b.services.tenancy.tenant("plain") is not None, 2, "plain at b")
        finally:
            await b.hub.stop()
    finally:
        await a.hub.stop()


async def test_a_gateway_never_leads_and_a_controller_serves_no_http(tmp_path: Path, cluster: NatsCluster) -> None:
    gw = await started(tmp_path, cluster, "gw-1", role="gateway")
    ctl = await started(tmp_path, cluster, "ctl-1", role="controller")
    try:
        await until(lambda: ctl.services.leadership.leading, 10, "the controller leads")
        assert not gw.services.leadership.leading and gw.services.leadership.mode == "never"
        assert ctl.hub.http_port == 0 and gw.hub.http_port > 0
        # A tenant made at the gateway is in the record the controller decides from.
        gw.hub.create_tenant("acme")
        await until(lambda: ctl.services.tenancy.tenant("acme") is not None, 2, "acme at the controller")
    finally:
        await ctl.hub.stop()
        await gw.hub.stop()


def test_a_gateway_or_controller_needs_the_replicated_record(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs the replicated record"):
        hub_config(tmp_path, "nats://127.0.0.1:1", role="gateway")


async def test_a_gateway_restarted_on_its_projection_still_serves_the_deployed_models(
        tmp_path: Path, cluster: NatsCluster) -> None:
    """The model-access table is loaded on every process's start, not only by the leader's
    deployments service: a gateway restarted on an already current projection hears of no
    deployment change (it answered 404 model_not_found for every deployed model before)."""
    from controlplane.core.replicas import DeploymentSpec

    ctl = await started(tmp_path, cluster, "ctl-1", role="controller")
    gw = await started(tmp_path, cluster, "gw-1", role="gateway")
    try:
        await until(lambda: ctl.services.leadership.leading, 10, "the controller leads")
        gw.hub.create_tenant("acme")
        await until(lambda: ctl.services.tenancy.tenant("acme") is not None, 5, "acme at the controller")
        ctl.services.deployments.create("acme", DeploymentSpec(model="m-1", origins=["shanghai"], min_cities=1))
        await until(lambda: "m-1" in gw.services.deployments.models_for_tenant("acme"), 5, "m-1 at the gateway")
        await gw.hub.stop()
        gw = await started(tmp_path, cluster, "gw-1", role="gateway")  # same projection file
        assert "m-1" in gw.services.deployments.models_for_tenant("acme")
    finally:
        await gw.hub.stop()
        await ctl.hub.stop()


async def test_a_new_leader_announces_its_epoch_and_sites_refuse_the_old_one_at_once(
        tmp_path: Path, cluster: NatsCluster) -> None:
    """Right after a takeover, before the new leader has commanded the site anything, a command
    carrying the old leader's epoch is refused (``stale_epoch``): the new leader broadcast its epoch
    (``wire.LeaderEpoch``) on taking the lead. Before, a site learned it only with the first command."""
    import nats as nats_client

    from edge_agent import wire
    from tests.support.fakehub import agent_config, running

    a = await started(tmp_path, cluster, "hub-a")
    a_running = True
    async with running(agent_config(cluster.urls[0], site="sh-edge", data_dir=str(tmp_path / "agent"),
                                    accelerators={"H20": 4}, heartbeat_s=0.5)) as agent:
        b: HubProcess | None = None
        try:
            await until(lambda: a.services.leadership.leading, 10, "hub-a leads")
            old = a.services.leadership.epoch
            assert agent.fence.highest in (0, old)  # hub-a led before the site came: it may have said nothing
            b = await started(tmp_path, cluster, "hub-b")
            await until(lambda: any(v.id == "sh-edge" and v.state == "up" for v in b.hub.registry), 10, "hub-b sees the site")
            await a.hub.stop()  # steps down and releases: hub-b takes over
            a_running = False
            await until(lambda: b.services.leadership.leading, 10, "hub-b leads")
            new = b.services.leadership.epoch
            assert new > old
            await until(lambda: agent.fence.highest == new, 5, "the site hears hub-b's epoch")
            assert agent.counters.get("cmd_StartAttempt", 0) == 0 and agent.counters.get("cmd_LoadModel", 0) == 0
            nc = await nats_client.connect(cluster.urls[1])
            try:
                stale = wire.StopAttempt(job="j-1", attempt=1, epoch=old)
                msg = await nc.request(wire.cmd_subject("sh-edge"), wire.encode(stale), timeout=5)
            finally:
                await nc.close()
            reply = wire.command_reply_decoder.decode(msg.data)
            assert isinstance(reply, wire.ErrorReply) and reply.code == "stale_epoch", reply
            assert agent.counters["stale_epoch"] == 1
        finally:
            if b is not None:
                await b.hub.stop()
            if a_running:
                await a.hub.stop()


async def test_a_deployment_made_and_deleted_at_a_gateway_is_planned_by_the_leader(
        tmp_path: Path, cluster: NatsCluster) -> None:
    """``POST /v1/deployments`` and ``DELETE`` at a process that does not decide (a gateway): 201
    and 200 once the write is on the record, the deployment recorded without a plan of the
    gateway's own, and the leading controller plans it (its report reaches the gateway). Before,
    the gateway planned it itself and asserted an outbox only a deciding process has: a 500."""
    ctl = await started(tmp_path, cluster, "ctl-1", role="controller")
    gw = await started(tmp_path, cluster, "gw-1", role="gateway")
    try:
        await until(lambda: ctl.services.leadership.leading, 10, "the controller leads")
        key = gw.hub.create_tenant("acme", default_origin="shanghai")
        async with aiohttp.ClientSession() as session:
            acme = Client(session, f"http://127.0.0.1:{gw.hub.http_port}", key)
            body = {"model": "m-1", "origins": ["shanghai"], "min_cities": 1}
            status, made, _ = await acme.call("POST", "/v1/deployments", body, headers={"Idempotency-Key": "d-1"})
            assert status == 201, made
            assert made["state"] == "pending" and made["replicas"] == [], made  # the gateway planned nothing

            async def planned() -> bool:
                _, view, _ = await acme.call("GET", f"/v1/deployments/{made['id']}")
                return bool(view["state"] != "pending" or view["details"] or view["uncovered"])

            await until(planned, 10, "the leader's plan of it, seen at the gateway")
            status, again, headers = await acme.call("POST", "/v1/deployments", body, headers={"Idempotency-Key": "d-1"})
            assert status == 201 and again == made and headers.get("Idempotent-Replayed") == "true"
            status, gone, _ = await acme.call("DELETE", f"/v1/deployments/{made['id']}")
            assert status == 200, gone
            await until(lambda: "m-1" not in ctl.services.deployments.models_for_tenant("acme"), 5,
                        "the delete at the controller")
            assert gw.services.deployments.counters["unloads_queued"] == 0  # sends are the leader's
    finally:
        await gw.hub.stop()
        await ctl.hub.stop()


async def test_a_deployment_made_at_a_deposed_leader_that_has_not_heard_is_recorded_not_refused(
        tmp_path: Path, cluster: NatsCluster) -> None:
    """A tenant's create and delete at a process that still decides but was deposed (a newer epoch
    took over; it has not heard yet): its fenced write is refused, nothing is written, and the write
    goes again unfenced without a plan, as at a gateway: 201 and 200, the new leader plans and
    unloads. Before, the tenant got a 409 saying the process no longer leads."""
    a = await started(tmp_path, cluster, "hub-a")
    try:
        await until(lambda: a.services.leadership.leading, 10, "a leads")
        old = a.services.leadership.epoch
        key = a.hub.create_tenant("acme", default_origin="shanghai")
        b = await started(tmp_path, cluster, "hub-b")
        try:
            await a.services.leadership.stop()
            await until(lambda: b.services.leadership.leading, 5, "b leads")
            a.hub.store.db.write_hook.bridge.fence = Fence(LEASE, old)  # frozen: still deciding, old fence
            a.services.deployments.deciding = True
            async with aiohttp.ClientSession() as session:
                acme = Client(session, f"http://127.0.0.1:{a.hub.http_port}", key)
                body = {"model": "m-1", "origins": ["shanghai"], "min_cities": 1}
                status, made, _ = await acme.call("POST", "/v1/deployments", body, headers={"Idempotency-Key": "d-1"})
                assert status == 201, made
                assert made["state"] == "pending" and made["replicas"] == [], made  # no plan of its own
                await until(lambda: "m-1" in b.services.deployments.models_for_tenant("acme"), 5, "the create at b")
                status, gone, _ = await acme.call("DELETE", f"/v1/deployments/{made['id']}")
                assert status == 200, gone
                await until(lambda: "m-1" not in b.services.deployments.models_for_tenant("acme"), 5,
                            "the delete at b")
            assert a.services.deployments.counters["loads_queued"] == 0
            assert a.services.deployments.counters["unloads_queued"] == 0
        finally:
            a.services.deployments.deciding = False
            a.hub.store.db.write_hook.bridge.fence = None
            await b.hub.stop()
    finally:
        await a.hub.stop()
