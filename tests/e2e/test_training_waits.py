"""End to end: why a training job waits is in its events (a real hub, agent and nats-server), and
``prefer`` is part of the job API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from controlplane.nats.natsserver import NatsServer
from tests.e2e.test_training import network, sim_job
from tests.support.hubrig import Client, services_of
from tests.support.waiting import until


async def test_a_waiting_job_says_why_in_its_events_once_per_kind_of_wait(tmp_path: Path,
                                                                         nats_server: NatsServer) -> None:
    async with network(tmp_path, nats_server.url, scale=600, sites=("hz-edge",)) as (hub, _, tenant):
        service = services_of(hub).training
        status, bad, _ = await tenant.call("POST", "/v1/jobs", sim_job(prefer="soon"))
        assert status == 400 and "prefer" in str(bad), bad
        # Far over its price cap on the only pool: it waits, and says so.
        status, sub, _ = await tenant.call("POST", "/v1/jobs", sim_job(prefer="cost", max_price_cny=0.0001))
        assert status in (200, 201, 202), sub
        jid = sub["id"]

        async def waiting() -> list[dict[str, Any]]:
            _, events, _ = await tenant.call("GET", f"/v1/jobs/{jid}/events")
            return [e for e in events["data"] if e["kind"] == "waiting"]

        await until(waiting, 10, "a waiting event")
        (ev,) = await waiting()
        assert ev["body"]["kind"] == "price" and "over max_price" in ev["body"]["reason"], ev
        _, view, _ = await tenant.call("GET", f"/v1/jobs/{jid}")
        assert view["state"] == "queued" and "over max_price" in view["reason"], view
        # Later ticks keep the same kind of wait: no second event.
        ticks = service.counters["ticks"]
        await until(lambda: service.counters["ticks"] >= ticks + 3, 10, "three more ticks")
        _, again, _ = await tenant.call("GET", f"/v1/jobs/{jid}/events")
        assert [e for e in again["data"] if e["kind"] == "waiting"] == [ev]


async def test_the_gang_reserved_for_keeps_its_reservation_when_another_tenant_queues_behind_it(
        tmp_path: Path, nats_server: NatsServer) -> None:
    """The hub keeps the head of the queue from one plan to the next (``Snapshot.head``): a gang of
    another tenant, ahead of it by fair share, queues behind it instead of taking its reservation."""
    async with network(tmp_path, nats_server.url, scale=600, sites=("hz-edge",)) as (hub, _, tenant):
        service = services_of(hub).training
        # hz-edge has 4 910B cards: a long job of acme holds 3 of them.
        status, long_job, _ = await tenant.call("POST", "/v1/jobs", sim_job(cards=3, est_hours=20.0))
        assert status in (200, 201, 202), long_job
        await until(lambda: service.last_plan is not None and any(s.job_id == long_job["id"]
                                                                  for s in service.last_plan.start), 10, "it started")
        status, big_a, _ = await tenant.call("POST", "/v1/jobs", sim_job(cards=4))
        assert status in (200, 201, 202), big_a

        def reserved_for() -> str:
            plan = service.last_plan
            return plan.reservation.job_id if plan is not None and plan.reservation is not None else ""

        await until(lambda: reserved_for() == big_a["id"], 10, "acme's gang reserved for")
        # beta holds nothing, acme 3 cards: fair share alone would put beta's gang first.
        other = Client(tenant.session, tenant.base, hub.create_tenant("beta"))
        status, big_b, _ = await other.call("POST", "/v1/jobs", sim_job(cards=4))
        assert status in (200, 201, 202), big_b
        def waits_of_b() -> list[Any]:
            plan = service.last_plan
            return [w for w in plan.wait if w.job_id == big_b["id"]] if plan is not None else []

        await until(waits_of_b, 10, "beta's gang planned")
        ticks = service.counters["ticks"]
        await until(lambda: service.counters["ticks"] >= ticks + 2, 10, "two more ticks")
        assert reserved_for() == big_a["id"]
        (wait,) = waits_of_b()
        assert f"behind {big_a['id']}" in wait.reason, wait
