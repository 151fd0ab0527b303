"""End to end: why a training job waits is in its events (a real hub, agent and nats-server), and
``prefer`` is part of the job API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from controlplane.nats.natsserver import NatsServer
from tests.e2e.test_training import network, sim_job
from tests.support.hubrig import services_of
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
