"""End to end: training jobs through a real hub, real agents and a real nats-server (JetStream).

demo-3 layout: ``sh-hub`` (PUE 1.25) is the cheapest pool for 910B cards, ``hz-edge`` (PUE 1.42)
the other. Sim attempts run ``sim_time_scale`` simulated seconds per wall second, so an hour of
training passes in a few seconds; metering bills the simulated time.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nats

from controlplane.hub import Hub
from controlplane.nats.natsserver import NatsServer
from controlplane.store import jobs as store_jobs
from controlplane.store import outbox as store_outbox
from controlplane.services.training import TrainingService
from edge_agent import wire
from edge_agent.agent import Agent
from edge_agent.config import AgentConfig, BusConfig, ExecutorsConfig, ProcessExecutorConfig
from edge_agent.nats_barrier import barrier
from tests.support.engines import needs
from tests.support.faultproxy import FaultProxy
from tests.support.hubrig import Client, hub_config, running_hub, services_of
from tests.support.waiting import until

PYTHON = "/usr/bin/python3"
"""The host's Python: the process sandbox's user can run it."""

SITES = {"sh-hub": ("shanghai", "hub", {"910B": 8}), "hz-edge": ("hangzhou", "edge", {"910B": 4})}


SANDBOXED = ExecutorsConfig(enabled=["sim", "process"], process=ProcessExecutorConfig(commands=[PYTHON], grace_s=2.0))


def agent_config(site: str, url: str, tmp: Path, executors: ExecutorsConfig = SANDBOXED) -> AgentConfig:
    city, tier, cards = SITES[site]
    return AgentConfig(
        site=site, nats=url, city=city, tier=tier, accelerators=cards, heartbeat_s=1.0, data_dir=str(tmp / site),
        bus=BusConfig(reconnect_wait_s=0.2, reconnect_jitter_s=0.1, event_backoff_max_s=1.0),
        executors=executors,
    )


def job(hub: Hub, job_id: str) -> store_jobs.JobRow:
    row = store_jobs.get_job(hub.db, job_id)
    assert row is not None
    return row


def checkpoints(hub: Hub, job_id: str, attempt: int) -> list[store_jobs.EventRow]:
    return [e for e in store_jobs.events(hub.db, job_id) if e.kind == "checkpointed" and e.attempt == attempt]


def stale_metric(hub: Hub) -> float:
    m = re.search(rb"^cpn_stale_events_total ([0-9.e+]+)$", hub.metrics.render(), re.M)
    assert m is not None
    return float(m.group(1))


@asynccontextmanager
async def network(tmp: Path, nats_url: str, *, scale: float, sites: tuple[str, ...] = ("sh-hub", "hz-edge"),
                  via: dict[str, str] | None = None,
                  executors: ExecutorsConfig = SANDBOXED) -> AsyncIterator[tuple[Hub, dict[str, Agent], Client]]:
    """A hub with the training service, agents for ``sites`` (``via`` maps a site to the URL it
    connects through), and a tenant client."""
    async with running_hub(hub_config(tmp, nats_url, sim_time_scale=scale)) as hub:
        key = hub.create_tenant("acme")
        agents = {s: Agent(agent_config(s, (via or {}).get(s, nats_url), tmp, executors)) for s in sites}
        try:
            await asyncio.gather(*(a.start() for a in agents.values()))
            await until(lambda: all((v := hub.registry.get(s)) is not None and v.registered for s in sites), 10,
                        "agents registered")
            async with aiohttp.ClientSession() as session:
                yield hub, agents, Client(session, f"http://127.0.0.1:{hub.http_port}", key)
        finally:
            await asyncio.gather(*(a.stop() for a in agents.values()), return_exceptions=True)


def sim_job(**kw: Any) -> dict[str, Any]:
    body = {"name": "sim", "cards": 4, "accelerators": ["910B"], "est_hours": 1.0, "checkpoint_cost_s": 30,
            "checkpoint_interval_min": 10}
    body.update(kw)
    return body


async def test_job_runs_to_succeeded_with_checkpoints_and_metering(tmp_path: Path, nats_server: NatsServer) -> None:
    # 1,800× (2.25 s of wall time): the wall-clock slack of a loaded machine is billed scaled, and at
    # 3,600× the 0.8 s seen with the suite on four workers passed the 7.0 bound below.
    async with network(tmp_path, nats_server.url, scale=1800) as (hub, agents, tenant):
        key = {"Idempotency-Key": "first-run"}
        status, sub, _ = await tenant.call("POST", "/v1/jobs", sim_job(), headers=key)
        assert status == 201, sub
        status, again, headers = await tenant.call("POST", "/v1/jobs", sim_job(), headers=key)
        assert (status, again["id"], headers.get("Idempotent-Replayed")) == (201, sub["id"], "true")
        jid = sub["id"]
        await until(lambda: job(hub, jid).state == "succeeded", 20, "job succeeded")

        status, view, _ = await tenant.call("GET", f"/v1/jobs/{jid}")
        assert status == 200 and view["state"] == "succeeded" and view["progress"] == 1.0
        assert [(a["number"], a["pool"], a["state"]) for a in view["attempts"]] == [(1, "sh-hub", "completed")]
        # Placement explained: the cheaper PUE won, and the other pool says by how much it lost.
        assert view["placement"]["chosen"].startswith("sh-hub/910B")
        assert any(o["pool"] == "hz-edge" and "more" in o["reason"] for o in view["placement"]["others"])
        # 1 h of work, a checkpoint every 10 min (none needed at the very end): 5 checkpoints.
        _, events, _ = await tenant.call("GET", f"/v1/jobs/{jid}/events")
        agent_events = [e for e in events["data"] if e["site"] != "(hub)"]  # the hub's own: progress marks
        kinds = [e["kind"] for e in agent_events]
        assert kinds == ["attempt_started"] + ["checkpointed"] * 5 + ["attempt_exited"], kinds
        assert [e["seq"] for e in agent_events] == list(range(1, 8))
        assert view["last_checkpoint"]["uri"].startswith(f"sim://sh-hub/{jid}/1/")
        # Metering: 4 cards for 1 h of work + 5 min restart + 5 × 30 s checkpoints ≈ 4.5 card-hours of
        # simulated time (a little more: event delivery and timer slack, scaled by 1800). Unscaled
        # wall time would be ~0.003; billing twice ~9.
        assert 4.45 <= view["card_hours"] <= 7.0, view["card_hours"]
        # energy = card-hours × 0.4 kW × PUE 1.25 × tariff (0.35 .. 1.05 CNY/kWh)
        per_card_hour = view["energy_cny"] / view["card_hours"]
        # (relative slack: card-hours and CNY are stored rounded, and in the valley hours every
        # card-hour is priced at exactly the lower bound)
        assert 0.4 * 1.25 * 0.35 * (1 - 1e-5) <= per_card_hour <= 0.4 * 1.25 * 1.05 * (1 + 1e-5)
        assert view["attempts"][0]["card_hours"] == view["card_hours"]
        status, usage, _ = await tenant.call("GET", "/v1/usage")
        assert usage["training"]["card_hours"] == view["card_hours"]
        assert usage["training"]["attempts"] == 1 and usage["training"]["jobs"] == 1
        # The sim agent freed its cards.
        await until(lambda: hub.registry.get("sh-hub").free_cards.get("910B") == 8, 5, "cards freed")  # type: ignore[union-attr]


async def test_card_fault_restarts_from_the_checkpoint_without_using_the_retry_budget(
        tmp_path: Path, nats_server: NatsServer) -> None:
    async with network(tmp_path, nats_server.url, scale=1800) as (hub, agents, tenant):
        _, sub, _ = await tenant.call("POST", "/v1/jobs", sim_job(est_hours=1.0))
        jid = sub["id"]
        await until(lambda: len(checkpoints(hub, jid, 1)) >= 2 and job(hub, jid).progress > 0, 20, "2 checkpoints")
        agents["sh-hub"].training.attempts[jid].fail_now("HBM error on card 3")  # type: ignore[attr-defined]
        await until(lambda: job(hub, jid).attempt == 2 and job(hub, jid).state == "running", 10, "attempt 2 running")
        row = job(hub, jid)
        first = store_jobs.attempts(hub.db, jid)[0]
        assert (first.exit_reason, row.infra_restarts, row.user_retries) == ("infra_failure", 1, 0)
        assert "HBM error" in first.detail
        second = next(a for a in agents.values() if jid in a.training.attempts).training.attempts[jid]
        assert second.attempt == 2 and second.command.resume_from == row.checkpoint  # type: ignore[attr-defined]
        assert second.command.progress == row.progress > 0  # type: ignore[attr-defined]
        await until(lambda: job(hub, jid).state == "succeeded", 20, "job succeeded")


async def test_site_lost_mid_run_restarts_elsewhere_and_the_returning_stale_attempt_is_stopped(
        tmp_path: Path, nats_server: NatsServer) -> None:
    async with FaultProxy(nats_server.url) as proxy:
        # 4 h of work at 1,200× = 12 s of wall time per full run; checkpoints every 0.5 s.
        async with network(tmp_path, nats_server.url, scale=1200, via={"sh-hub": proxy.url}) as (hub, agents, tenant):
            service = services_of(hub).training
            _, sub, _ = await tenant.call("POST", "/v1/jobs", sim_job(est_hours=4.0))
            jid = sub["id"]
            await until(lambda: len(checkpoints(hub, jid, 1)) >= 2, 20, "attempt 1 checkpointed twice")
            assert job(hub, jid).pool == "sh-hub"

            proxy.set_blackhole()  # sh-hub is cut off: to the hub it is gone, but its attempt runs on
            await until(lambda: hub.registry.get("sh-hub").state == "lost", 6, "sh-hub lost")  # type: ignore[union-attr]
            lost_at = hub.registry.get("sh-hub").lost_at  # type: ignore[union-attr]
            at_loss = job(hub, jid)
            assert at_loss.attempt in (1, 2) and at_loss.checkpoint.startswith(f"sim://sh-hub/{jid}/1/")
            await until(lambda: len(store_jobs.attempts(hub.db, jid)) == 2
                        and store_jobs.attempts(hub.db, jid)[1].started_at is not None, 5, "attempt 2 started")
            a1, a2 = store_jobs.attempts(hub.db, jid)
            restart_s = a2.started_at - lost_at  # type: ignore[operator]
            assert restart_s < 1.5, f"attempt 2 started {restart_s:.2f} s after the loss was detected"
            assert (a1.exit_reason, a2.pool) == ("site_lost", "hz-edge")
            attempt2 = agents["hz-edge"].training.attempts[jid]
            assert attempt2.attempt == 2
            assert attempt2.command.resume_from == at_loss.checkpoint  # type: ignore[attr-defined]
            assert attempt2.command.progress == at_loss.progress > 0  # type: ignore[attr-defined]
            started = [e for e in store_jobs.events(hub.db, jid) if e.attempt == 2 and e.kind == "attempt_started"]
            assert started[0].body["resumed_from"] == at_loss.checkpoint
            # The zombie: attempt 1 still runs at sh-hub, behind the partition.
            zombie = agents["sh-hub"].training.attempts.get(jid)
            assert zombie is not None and zombie.attempt == 1 and not zombie.done

            proxy.set_pass()  # sh-hub comes back, still running attempt 1
            await until(lambda: jid not in agents["sh-hub"].training.attempts, 10, "stale attempt 1 stopped")
            exit1 = await zombie.wait()
            assert exit1.reason == "stopped" and "stale" in exit1.detail
            def stops() -> list[Any]:
                return [r for r in store_outbox.for_job(hub.db, jid) if r.kind == "stop_attempt" and r.site == "sh-hub"]

            # The agent acts on the StopAttempt before the hub has recorded its Ack: wait for the record.
            await until(lambda: bool(stops()) and stops()[0].state == "sent", 5, "stop recorded as sent")
            assert stops()[0].attempt == 1
            # Its late events (checkpoints behind the partition, the exit) arrive and are only counted.
            late = lambda: [e for e in store_jobs.events(hub.db, jid) if e.attempt == 1 and e.at > lost_at]  # noqa: E731
            await until(lambda: any(e.kind == "attempt_exited" for e in late()), 10, "attempt 1 exit delivered")
            assert service.counters["stale_attempt"] == len(late()) == stale_metric(hub) >= 2
            row = job(hub, jid)
            assert row.attempt == 2 and row.pool == "hz-edge" and row.state == "running"
            assert not row.checkpoint.startswith(f"sim://sh-hub/{jid}/1/") or row.checkpoint == at_loss.checkpoint

            await until(lambda: job(hub, jid).state == "succeeded", 25, "job succeeded on hz-edge")
            row = job(hub, jid)
            assert (row.infra_restarts, row.user_retries, row.attempt) == (1, 0, 2)
            a1, a2 = store_jobs.attempts(hub.db, jid)
            assert a1.ended_at is not None and a1.exit_reason == "site_lost"  # billed once, at the loss
            assert a2.exit_reason == "completed" and row.card_hours == a1.card_hours + a2.card_hours


async def test_hub_restart_mid_run_loses_no_event_and_applies_each_once(tmp_path: Path, nats_server: NatsServer) -> None:
    seen: set[tuple[str, int, int]] = set()

    async def watch(msg: Any) -> None:  # every event an agent sent (retries included)
        ev = msgspec.json.decode(msg.data)
        seen.add((ev["job"], ev["attempt"], ev["seq"]))

    nc = await nats.connect(nats_server.url)
    await nc.subscribe(wire.EVENT_WILDCARD, cb=watch)
    await barrier(nc)
    config = hub_config(tmp_path, nats_server.url, sim_time_scale=1200)
    agents = {s: Agent(agent_config(s, nats_server.url, tmp_path)) for s in SITES}
    try:
        async with running_hub(config) as hub:
            key = hub.create_tenant("acme")
            await asyncio.gather(*(a.start() for a in agents.values()))
            await until(lambda: all((v := hub.registry.get(s)) is not None and v.registered for s in SITES), 10, "up")
            async with aiohttp.ClientSession() as session:
                tenant = Client(session, f"http://127.0.0.1:{hub.http_port}", key)
                _, sub, _ = await tenant.call("POST", "/v1/jobs", sim_job(est_hours=2.0))
            jid = sub["id"]
            await until(lambda: len(checkpoints(hub, jid, 1)) >= 1, 20, "first checkpoint applied")
            applied_before = services_of(hub).training.counters["applied"]
        # The hub is down; the attempt runs on and its events wait in the agents' outboxes (fsynced,
        # retried): the hub checks every event before JetStream stores it (docs/security.md).
        mine = lambda: {s for s in seen if s[0] == jid}  # noqa: E731
        await until(lambda: sum(len(a.outbox) for a in agents.values()) >= 3, 10, "3 events waiting while the hub is down")
        async with running_hub(config) as hub:
            await until(lambda: job(hub, jid).state == "succeeded", 30, "job succeeded after the restart")
            stored = {(e.job_id, e.attempt, e.seq) for e in store_jobs.events(hub.db, jid)}
            await until(lambda: mine() >= stored, 5, "the watcher saw what the hub stored")
            service = services_of(hub).training
            assert stored == mine(), (sorted(stored ^ mine()))
            # Every event applied exactly once over the two hub lives; none was stale.
            assert applied_before + service.counters["applied"] == len(stored)
            assert service.counters["applied"] >= 3 and service.counters["stale_attempt"] == 0
            row = job(hub, jid)
            assert row.attempt == 1 and row.infra_restarts == 0 and row.progress == 1.0
            assert len(checkpoints(hub, jid, 1)) == 11  # 2 h, every 10 min, none at the very end
    finally:
        await asyncio.gather(*(a.stop() for a in agents.values()), return_exceptions=True)
        await nc.close()


CHECKPOINTING_SCRIPT = """
import os, pathlib
d = pathlib.Path(os.environ["CPN_CHECKPOINT_DIR"])
assert os.environ["CPN_ATTEMPT"] == "1" and os.environ["CPN_RESUME_FROM"] == ""
for i in (1, 2, 3):
    p = d / f"step-{i}.ckpt"
    p.write_text(f"{os.environ['CPN_JOB_ID']} step {i}")
    print(f"CPN_CHECKPOINT {p} {i / 4}", flush=True)
"""


@needs("bwrap", package="bubblewrap")
async def test_process_job_runs_a_real_command(tmp_path: Path, nats_server: NatsServer) -> None:
    async with network(tmp_path, nats_server.url, scale=3600, sites=("hz-edge",)) as (hub, agents, tenant):
        body = {"name": "real", "cards": 2, "accelerators": ["910B"], "est_hours": 0.01,
                "command": [PYTHON, "-c", CHECKPOINTING_SCRIPT]}
        _, sub, _ = await tenant.call("POST", "/v1/jobs", body)
        jid = sub["id"]
        await until(lambda: job(hub, jid).state in ("succeeded", "failed"), 20, "job finished")
        status, view, _ = await tenant.call("GET", f"/v1/jobs/{jid}")
        assert view["state"] == "succeeded", view
        assert view["executor"] == "process" and view["attempts"][0]["exit_code"] == 0
        ckpt = Path(view["last_checkpoint"]["uri"])
        assert ckpt.name == "step-3.ckpt" and ckpt.read_text() == f"{jid} step 3"
        assert view["last_checkpoint"]["progress"] == 1.0  # completed; the checkpoint itself said 0.75
        assert [e.body["progress"] for e in checkpoints(hub, jid, 1)] == [0.25, 0.5, 0.75]
        assert 0 < view["card_hours"] < 0.01  # real seconds on 2 cards, not scaled


@needs("bwrap", package="bubblewrap")
async def test_process_job_exiting_3_retries_then_fails_with_the_reason(tmp_path: Path, nats_server: NatsServer) -> None:
    async with network(tmp_path, nats_server.url, scale=3600, sites=("hz-edge",)) as (hub, agents, tenant):
        body = {"name": "broken", "cards": 1, "accelerators": ["910B"], "est_hours": 0.01,
                "command": [PYTHON, "-c", "import sys; print('loss is nan', file=sys.stderr); sys.exit(3)"]}
        _, sub, _ = await tenant.call("POST", "/v1/jobs", body)
        jid = sub["id"]
        await until(lambda: job(hub, jid).state == "failed", 20, "job failed")
        status, view, _ = await tenant.call("GET", f"/v1/jobs/{jid}")
        assert "exited with code 3" in view["reason"] and "retries exhausted (2)" in view["reason"], view["reason"]
        assert [(a["number"], a["exit_reason"], a["exit_code"]) for a in view["attempts"]] == [
            (1, "user_error", 3), (2, "user_error", 3), (3, "user_error", 3)]
        assert "loss is nan" in view["attempts"][2]["detail"]
        assert view["retries"] == {"user_errors": 2, "max_user_retries": 2, "infra_restarts": 0}


async def test_cancel_stops_the_running_attempt_and_bills_it(tmp_path: Path, nats_server: NatsServer) -> None:
    async with network(tmp_path, nats_server.url, scale=600, sites=("hz-edge",)) as (hub, agents, tenant):
        _, sub, _ = await tenant.call("POST", "/v1/jobs", sim_job(est_hours=10.0))
        jid = sub["id"]
        await until(lambda: jid in agents["hz-edge"].training.attempts and job(hub, jid).state == "running", 10,
                    "running")
        running = agents["hz-edge"].training.attempts[jid]
        status, view, _ = await tenant.call("DELETE", f"/v1/jobs/{jid}")
        assert status == 200 and view["state"] == "cancelled"
        assert view["attempts"][0]["exit_reason"] == "cancelled" and view["card_hours"] > 0
        exited = await asyncio.wait_for(running.wait(), 10)
        assert exited.reason == "stopped"
        service: TrainingService = services_of(hub).training
        await until(lambda: service.counters["terminal"] >= 1, 10, "the exit event arrives and is ignored")
        row = job(hub, jid)
        assert row.state == "cancelled" and round(row.card_hours, 6) == view["card_hours"]  # billed once


async def test_a_command_job_never_reaches_a_site_without_the_process_executor_and_the_tenant_sees_why(
        tmp_path: Path, nats_server: NatsServer) -> None:
    """Attack row: a tenant job ``sh -c 'id > ...'`` ran as the agent's user. A site that did not
    enable ``process`` (the default) is not offered it: the job waits, and its events say why."""
    marker = tmp_path / "ran-as"
    async with network(tmp_path, nats_server.url, scale=3600, sites=("hz-edge",),
                       executors=ExecutorsConfig(enabled=["sim"])) as (hub, agents, tenant):
        body = {"name": "id", "cards": 1, "accelerators": ["910B"], "est_hours": 0.01,
                "command": ["sh", "-c", f"id > {marker}"]}
        _, sub, _ = await tenant.call("POST", "/v1/jobs", body)
        jid = sub["id"]

        async def unplaceable() -> list[dict[str, Any]]:
            _, events, _ = await tenant.call("GET", f"/v1/jobs/{jid}/events")
            return [e for e in events["data"] if e["kind"] == "unplaceable"]

        await until(unplaceable, 10, "an unplaceable event")
        why = await unplaceable()
        assert "executor" in why[0]["body"]["reason"], why
        _, view, _ = await tenant.call("GET", f"/v1/jobs/{jid}")
        assert view["state"] == "queued" and not view["attempts"], view
        assert not marker.exists() and not agents["hz-edge"].training.attempts
