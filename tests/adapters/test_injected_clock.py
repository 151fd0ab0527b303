"""One clock, injected: the agent and the hub's services pass time on the clock they are built with,
never on the system's (docs/architecture.md, "One clock").

Each test holds a :class:`ManualClock` still while real time passes, and shows that nothing
time-driven happened; then moves it, and shows that it did.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from controlplane.compose import build
from controlplane.core.errors import RateLimited
from controlplane.nats.natsserver import NatsServer
from edge_agent import wire
from tests.support.fakehub import FakeHub, agent_config, running
from tests.support.hubrig import hub_config
from tests.support.manualclock import ManualClock
from tests.support.waiting import until


async def test_the_agent_heartbeats_on_its_injected_clock(nats_server: NatsServer) -> None:
    clock = ManualClock()
    async with FakeHub(nats_server.url, heartbeat_s=0.2) as hub:
        async with running(agent_config(nats_server.url, "edge-a"), clock=clock) as agent:
            await asyncio.wait_for(agent.registered.wait(), 5)
            first = await hub.wait_heartbeat("edge-a", what="the heartbeat sent on registering")
            # Ten heartbeat periods of real time, the clock held still: not one more heartbeat.
            await asyncio.sleep(2.0)
            assert [hb.seq for hb in hub.heartbeats["edge-a"]] == [first.seq]
            await until(lambda: clock.sleepers >= 1, 5, "the heartbeat loop asleep on the clock")
            clock.advance(0.2)
            nxt = await hub.wait_heartbeat("edge-a", lambda hb: hb.seq > first.seq, what="the next heartbeat")
            assert nxt.seq == first.seq + 1


async def test_the_sim_backend_answers_on_the_agents_clock(nats_server: NatsServer) -> None:
    clock = ManualClock()
    async with FakeHub(nats_server.url) as hub:
        cfg = agent_config(nats_server.url, "edge-a", backend={"sim": {"ttft_ms": 50.0, "per_token_ms": 0.0}})
        async with running(cfg, clock=clock):
            req = wire.InferRequest(request_id="r1", model="qwen", prompt="hello", max_tokens=3)
            pending = asyncio.ensure_future(hub.infer("edge-a", req, timeout_s=10.0))
            await until(lambda: clock.sleepers >= 1, 5, "the backend waiting out its time to first token")
            await asyncio.sleep(0.3)  # six times the TTFT in real time
            assert not pending.done()
            clock.advance(0.05)
            answer = await asyncio.wait_for(pending, 5)
            assert isinstance(answer, wire.InferResult) and abs(answer.service_ms - 50.0) < 1e-6


async def test_the_hubs_services_read_the_injected_clock(tmp_path: Path, nats_server: NatsServer) -> None:
    clock = ManualClock()
    process = build(hub_config(tmp_path, nats_server.url), clock=clock)
    hub, services = process.hub, process.services
    await hub.start(serve_http=False)
    try:
        assert services.status.started_at == clock.time()
        principal = services.tenancy.authenticate(hub.create_tenant("acme"))
        assert principal is not None
        # The rate buckets refill on the clock: held still, a burst is all a tenant gets.
        taken = 0
        with pytest.raises(RateLimited):
            for _ in range(10_000):
                services.tenancy.rate_limit(principal)
                taken += 1
        assert taken == hub.config.default_burst
        clock.advance(10.0)
        services.tenancy.rate_limit(principal)  # refilled by the clock's ten seconds
        # The loops (site sweep, usage flush, dashboard samples) sleep on the clock: real time alone
        # runs none of them.
        await until(lambda: clock.sleepers >= 3, 5, "sweep, usage flush and dashboard asleep on the clock")
        samples = len(services.dashboard.samples)
        await asyncio.sleep(0.5)
        assert len(services.dashboard.samples) == samples
        clock.advance(services.dashboard.sample_s)
        await until(lambda: len(services.dashboard.samples) == samples + 1, 5, "a sample at the clock's time")
        assert services.dashboard.samples[-1]["at"] == clock.time()
    finally:
        await hub.stop()


async def test_a_job_is_submitted_and_cancelled_at_the_hubs_clock(tmp_path: Path, nats_server: NatsServer) -> None:
    """The gateway stamps a submission and a cancel with the services' clock, not the system's: a hub
    on a clock set a day back records its jobs a day back (it read the wall before)."""
    import aiohttp

    from tests.support.hubrig import Client, running_hub

    clock = ManualClock(start=1_700_000_000.0)
    async with running_hub(hub_config(tmp_path, nats_server.url), clock=clock) as hub:
        key = hub.create_tenant("acme")
        async with aiohttp.ClientSession() as session:
            c = Client(session, f"http://127.0.0.1:{hub.http_port}", key)
            status, job, _ = await c.call("POST", "/v1/jobs", {"name": "ft", "cards": 1, "est_hours": 1.0})
            assert status in (200, 201, 202), job
            assert job["submitted_at"] == clock.time()
            clock.advance(5.0)
            status, cancelled, _ = await c.call("DELETE", f"/v1/jobs/{job['id']}")
            assert status == 200, cancelled
            assert cancelled["updated_at"] == clock.time()
