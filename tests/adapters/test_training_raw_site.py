"""The training service against a real hub, a real nats-server and a raw NATS peer playing the site:
the command outbox (re-send after a hub restart, obsolete commands dropped, refusals), a site that
dies while the hub is down, and events fenced by site.

The peer registers and heartbeats like an agent, and answers commands only when told to, so a test
can hold commands in the outbox, restart the hub, make the site refuse, or publish forged events.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiohttp

from controlplane.nats.natsserver import NatsServer
from controlplane.store import jobs as store_jobs
from controlplane.store import outbox as store_outbox
from edge_agent import wire
from tests.support.hubrig import Client, hub_config, running_hub, services_of
from tests.support.manualclock import ManualClock
from tests.support.rawsite import RawSite, dispatched, site, submit  # noqa: F401  (site: the fixture)
from tests.support.waiting import until


async def test_a_command_committed_but_not_delivered_is_sent_after_a_hub_restart(
        tmp_path: Path, nats_server: NatsServer, site: RawSite) -> None:
    config = hub_config(tmp_path, nats_server.url)
    async with running_hub(config) as hub:
        key = hub.create_tenant("acme")
        await site.start()  # registers and heartbeats, but nobody answers its cmd subject yet
        await until(lambda: hub.registry.get("hz-edge") is not None, 5, "site registered")
        jid = await submit(hub, key)
        await until(lambda: any(r.tries >= 2 for r in store_outbox.pending(hub.db)), 10, "start retried")
        row = store_jobs.get_job(hub.db, jid)
        assert row is not None and (row.state, row.attempt, row.pool) == ("placed", 1, "hz-edge")
    # The hub is gone with the StartAttempt committed and unsent. The site now answers.
    await site.serve_commands()
    assert site.commands == []
    async with running_hub(config) as hub:
        await until(lambda: site.commands, 10, "StartAttempt re-sent after the restart")
        cmd = site.commands[0]
        assert isinstance(cmd, wire.StartAttempt) and (cmd.job, cmd.attempt, cmd.cards) == (jid, 1, 2)
        assert cmd.executor == "sim" and cmd.checkpoint_interval_s == 600.0 and cmd.work_s == 3600.0
        await until(lambda: store_jobs.get_job(hub.db, jid).state == "starting", 5, "dispatched")  # type: ignore[union-attr]
        (entry,) = store_outbox.for_job(hub.db, jid)
        assert entry.state == "sent" and entry.detail == "ok" and entry.tries >= 3
    assert len(site.commands) == 1  # sent once it could be, never twice


async def test_an_obsolete_start_is_dropped_and_only_the_stop_goes_out(
        tmp_path: Path, nats_server: NatsServer, site: RawSite) -> None:
    async with running_hub(hub_config(tmp_path, nats_server.url)) as hub:
        key = hub.create_tenant("acme")
        await site.start()
        await until(lambda: hub.registry.get("hz-edge") is not None, 5, "site registered")
        jid = await submit(hub, key)
        await until(lambda: store_outbox.pending(hub.db), 5, "start pending")
        async with aiohttp.ClientSession() as session:
            status, view, _ = await Client(session, f"http://127.0.0.1:{hub.http_port}", key).call(
                "DELETE", f"/v1/jobs/{jid}")
        assert status == 200 and view["state"] == "cancelled"
        await site.serve_commands()
        await until(lambda: site.commands, 10, "a command delivered")
        await until(lambda: not store_outbox.pending(hub.db), 10, "outbox drained")
        assert [type(c).__name__ for c in site.commands] == ["StopAttempt"]
        assert (site.commands[0].job, site.commands[0].attempt, site.commands[0].checkpoint) == (jid, 1, False)
        start, stop = store_outbox.for_job(hub.db, jid)
        assert (start.kind, start.state) == ("start_attempt", "dropped") and "job is cancelled" in start.detail
        assert (stop.kind, stop.state) == ("stop_attempt", "sent")


async def test_a_refused_start_is_an_infrastructure_failure_and_the_job_is_placed_again(
        tmp_path: Path, nats_server: NatsServer, site: RawSite) -> None:
    async with running_hub(hub_config(tmp_path, nats_server.url)) as hub:
        key = hub.create_tenant("acme")
        refusals = 0

        def answer(cmd: Any) -> Any:
            nonlocal refusals
            if isinstance(cmd, wire.StartAttempt) and cmd.attempt == 1:
                refusals += 1
                return wire.ErrorReply(code="no_capacity", message="needs 2 910B cards, hz-edge has 0 free")
            return wire.Ack(detail="started")

        site.answer = answer
        await site.join(hub)
        jid = await submit(hub, key)
        await until(lambda: (r := store_jobs.get_job(hub.db, jid)) is not None and r.attempt == 2
                    and r.state == "starting", 10, "attempt 2 dispatched")
        row = store_jobs.get_job(hub.db, jid)
        assert row is not None and (row.infra_restarts, row.user_retries) == (1, 0)
        first = store_jobs.attempts(hub.db, jid)[0]
        assert first.exit_reason == "dispatch_failed" and "no_capacity" in first.detail
        assert first.card_hours == 0.0  # it never ran
        assert refusals == 1 and [(type(c).__name__, c.attempt) for c in site.commands] == [
            ("StartAttempt", 1), ("StartAttempt", 2)]
        keys = [c.event_key for c in site.commands]  # each attempt's events get ids no other site can guess
        assert all(len(k) >= 16 for k in keys) and keys[0] != keys[1]


async def test_a_site_that_died_while_the_hub_was_down_fails_its_attempts_after_a_grace_period(
        tmp_path: Path, nats_server: NatsServer, site: RawSite) -> None:
    config = hub_config(tmp_path, nats_server.url)
    async with running_hub(config) as hub:
        jid = await dispatched(hub, site)
    await site.close()  # the site dies while the hub is down: nobody will ever heartbeat for it
    clock = ManualClock()  # the grace passes on the hub's clock, not in real seconds
    async with running_hub(config, clock=clock) as hub:
        service = services_of(hub).training
        grace_s = max(2 * hub.registry.detection_s, 5.0)  # max(2 × 3 s detection, 5 s)
        clock.advance(grace_s - 0.5)
        ticks = service.counters["ticks"]
        await until(lambda: service.counters["ticks"] >= ticks + 2, 10, "two ticks just before the grace ends")
        assert store_jobs.get_job(hub.db, jid).state == "starting"  # type: ignore[union-attr]  # not yet
        clock.advance(1.0)
        await until(lambda: store_jobs.get_job(hub.db, jid).state == "restarting", 10, "attempt failed")  # type: ignore[union-attr]
        (first,) = store_jobs.attempts(hub.db, jid)
        assert first.exit_reason == "site_lost" and "not heard from since the hub started" in first.detail
        row = store_jobs.get_job(hub.db, jid)
        assert row is not None and (row.infra_restarts, row.user_retries) == (1, 0)


async def test_an_event_for_the_current_attempt_from_another_site_is_fenced(
        tmp_path: Path, nats_server: NatsServer, site: RawSite) -> None:
    async with running_hub(hub_config(tmp_path, nats_server.url)) as hub:
        jid = await dispatched(hub, site)
        service = services_of(hub).training
        now = time.time()
        # nj-edge (on its own subject, as its permissions allow) claims hz-edge's attempt 1.
        await site.publish_event(wire.Checkpointed(job=jid, attempt=1, seq=100, site="nj-edge", at=now,
                                                   progress=0.9, checkpoint="evil://nj-edge/x"), site="nj-edge")
        # The real site speaks for its attempt.
        await site.publish_event(wire.AttemptStarted(job=jid, attempt=1, seq=1, site="hz-edge", at=now))
        await site.publish_event(wire.Checkpointed(job=jid, attempt=1, seq=2, site="hz-edge", at=now + 1,
                                                   progress=0.25, checkpoint="sim://hz-edge/ok"))
        await until(lambda: service.counters["applied"] == 2, 10, "real events applied")
        row = store_jobs.get_job(hub.db, jid)
        assert row is not None and (row.state, row.progress, row.checkpoint) == ("running", 0.25, "sim://hz-edge/ok")
        assert service.counters["not_holder"] == 1
        assert len(store_jobs.events(hub.db, jid)) == 2  # the forged one was dropped before being recorded
