"""Sites are believed only within what the operator declared (docs/security.md, "Sites").

A real hub (SQLite file, HTTP gateway on port 0), a real nats-server, and sites played by bare NATS
clients speaking the wire, each on its own connection: the genuine hz-edge (``RawSite``) and a rogue
that lies in every way its own subjects allow. Each test is an attack row of issue #11 that
succeeded before these rules: it now reads "refused, counted".
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest

from controlplane.nats.natsserver import NatsServer
from controlplane.store import jobs as store_jobs
from controlplane.store import outbox as store_outbox
from controlplane.store import sites as store_sites
from edge_agent import wire
from tests.support.rawsite import JOB, RawSite, dispatched, site, submit  # noqa: F401  (site: the fixture)
from tests.support.waiting import until
from tests.support.hubrig import Client, hub_config, running_hub, services_of


async def register(nc: Any, msg: wire.Register) -> Any:
    reply = await nc.request(wire.register_subject(msg.site), wire.encode(msg), timeout=5)
    return wire.register_reply_decoder.decode(reply.data)


def metric(text: str, name: str) -> float:
    """Sum of a metric's samples whose line starts with ``name`` (labels included in ``name``)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def get_metrics(hub: Any) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{hub.http_port}/metrics") as r:
        return await r.text()


# --------------------------------------------------------------------------- claims


async def test_register_claims_beyond_the_declaration_are_refused_and_less_is_honoured(
        tmp_path: Path, nats_server: NatsServer) -> None:
    async with running_hub(hub_config(tmp_path, nats_server.url)) as hub:
        admin = hub.create_admin_key("ops")
        nc = await nats.connect(nats_server.url)
        try:
            # hz-edge is declared (the layout) with 4 910B cards, tier edge, in Hangzhou.
            for cards, why in (({"910B": 1_000_000}, "absurd_cards"), ({"910B": -4}, "negative_cards"),
                               ({"A800": 64}, "over_declared"), ({"910B": 5}, "over_declared")):
                answer = await register(nc, wire.Register(site="hz-edge", tier="hub", city="beijing", accelerators=cards))
                assert isinstance(answer, wire.ErrorReply) and answer.code == "refused", answer
                assert answer.message.startswith(why), answer.message
            assert hub.registry.get("hz-edge") is None and store_sites.list_sites(hub.db) == []
            # Fewer cards than declared is the site's right; its tier and city are the operator's.
            answer = await register(nc, wire.Register(site="hz-edge", tier="hub", city="beijing", accelerators={"910B": 2}))
            assert isinstance(answer, wire.RegisterAck), answer
            view = hub.registry.get("hz-edge")
            assert view is not None and (view.tier, view.city, view.accelerators) == ("edge", "hangzhou", {"910B": 2})
            (row,) = store_sites.list_sites(hub.db)
            assert (row["tier"], row["city"], row["accelerators"]) == ("edge", "hangzhou", {"910B": 2})
            # A site nobody declared is refused; once the operator declares it, it is believed within that.
            answer = await register(nc, wire.Register(site="xx-edge", city="hangzhou", accelerators={"H20": 8}))
            assert isinstance(answer, wire.ErrorReply) and answer.message.startswith("undeclared_site")
            async with aiohttp.ClientSession() as session:
                ops = Client(session, f"http://127.0.0.1:{hub.http_port}", admin)
                status, body, _ = await ops.call("PUT", "/v1/sites/xx-edge/declaration",
                                                 {"accelerators": {"H20": -1}, "city": "hangzhou"})
                assert status == 400 and "accelerators" in str(body), body
                status, body, _ = await ops.call("PUT", "/v1/sites/XX/declaration", {"city": "hangzhou"})
                assert status == 400 and body["error"]["param"] == "site", body
                status, body, _ = await ops.call("PUT", "/v1/sites/xx-edge/declaration",
                                                 {"city": "hangzhou", "accelerators": {"H20": 8}, "tier": "edge"})
                assert status == 200 and body["accelerators"] == {"H20": 8} and body["source"] == "operator", body
                status, body, _ = await ops.call("GET", "/v1/sites/xx-edge/declaration")
                assert status == 200 and body["region"] == "zhejiang", body  # from its city
            answer = await register(nc, wire.Register(site="xx-edge", city="hangzhou", accelerators={"H20": 9}))
            assert isinstance(answer, wire.ErrorReply) and answer.message.startswith("over_declared")
            answer = await register(nc, wire.Register(site="xx-edge", city="hangzhou", accelerators={"H20": 8}))
            assert isinstance(answer, wire.RegisterAck)
            text = await get_metrics(hub)
            assert metric(text, 'cpn_site_claims_refused_total{reason="over_declared"}') == 3
            assert metric(text, 'cpn_site_claims_refused_total{reason="absurd_cards"}') == 1
            assert metric(text, 'cpn_site_claims_refused_total{reason="negative_cards"}') == 1
            assert metric(text, 'cpn_site_claims_refused_total{reason="undeclared_site"}') == 1
            assert metric(text, 'cpn_site_claims_refused_total{reason="tier_ignored"}') == 1
        finally:
            await nc.close()


async def test_a_declaration_survives_a_hub_restart(tmp_path: Path, nats_server: NatsServer) -> None:
    config = hub_config(tmp_path, nats_server.url)
    async with running_hub(config) as hub:
        hub.sites.declare("xx-edge", {"city": "nanjing", "accelerators": {"L20": 2}, "local_model_tenants": ["acme"]})
    async with running_hub(config) as hub:
        decl = hub.sites.declarations["xx-edge"]
        assert (decl.city, decl.accelerators, decl.local_model_tenants) == ("nanjing", {"L20": 2}, ("acme",))
        nc = await nats.connect(nats_server.url)
        try:
            answer = await register(nc, wire.Register(site="xx-edge", accelerators={"L20": 3}))
            assert isinstance(answer, wire.ErrorReply) and answer.message.startswith("over_declared")
        finally:
            await nc.close()


# --------------------------------------------------------------------------- traffic


async def rogue_site(url: str, site: str, city: str, cards: dict[str, int], served: list[str]) -> tuple[Any, asyncio.Task[None]]:
    """A site that advertises a local replica of ``m`` with impossible load figures and answers
    with its own text."""
    nc = await nats.connect(url)

    async def on_infer(msg: Any) -> None:
        req = wire.infer_request_decoder.decode(msg.data)
        served.append(req.tenant)
        await msg.respond(wire.encode(wire.InferResult(request_id=req.request_id, site=site, model=req.model,
                                                        output="rogue says hi", completion_tokens=2)))

    await nc.subscribe(wire.infer_subject(site), cb=on_infer)
    assert isinstance(await register(nc, wire.Register(site=site, city=city, accelerators=cards)), wire.RegisterAck)

    async def beat() -> None:
        seq = 0
        while True:
            seq += 1
            hb = wire.Heartbeat(site=site, seq=seq, queue_depth=-1000, inflight=-50, service_ms_p50=-5.0,
                                free_cards={a: 10.0 ** 9 for a in cards},
                                models=[wire.ReplicaStatus(model="m", slots=10 ** 9, busy=-10 ** 6, cards=-3.0)])
            await nc.publish(wire.heartbeat_subject(site), wire.encode(hb))
            await asyncio.sleep(0.2)  # the site's heartbeat period

    return nc, asyncio.create_task(beat())


async def honest_site(url: str, site: str, city: str) -> tuple[Any, asyncio.Task[None]]:
    nc = await nats.connect(url)

    async def on_infer(msg: Any) -> None:
        req = wire.infer_request_decoder.decode(msg.data)
        await msg.respond(wire.encode(wire.InferResult(request_id=req.request_id, site=site, model=req.model,
                                                        output=f"{site} answers", completion_tokens=2)))

    await nc.subscribe(wire.infer_subject(site), cb=on_infer)
    assert isinstance(await register(nc, wire.Register(site=site, city=city)), wire.RegisterAck)

    async def beat() -> None:
        seq = 0
        while True:
            seq += 1
            hb = wire.Heartbeat(site=site, seq=seq, models=[wire.ReplicaStatus(model="m", slots=8, busy=2)])
            await nc.publish(wire.heartbeat_subject(site), wire.encode(hb))
            await asyncio.sleep(0.2)  # the site's heartbeat period

    return nc, asyncio.create_task(beat())


async def test_a_rogue_local_replica_with_negative_load_draws_no_tenant_it_was_not_allowed(
        tmp_path: Path, nats_server: NatsServer) -> None:
    served: list[str] = []
    async with running_hub(hub_config(tmp_path, nats_server.url, local_model_tenants=[])) as hub:
        admin = hub.create_admin_key("ops")
        keys = {t: hub.create_tenant(t, default_origin="nanjing") for t in ("acme", "bob")}
        # The operator lets acme use hz-edge's own models; nobody nj-edge's.
        hub.sites.declare("hz-edge", {"local_model_tenants": ["acme"]})
        hz = await honest_site(nats_server.url, "hz-edge", "hangzhou")
        rogue = await rogue_site(nats_server.url, "nj-edge", "nanjing", {"L20": 4}, served)
        try:
            await until(lambda: all((v := hub.registry.get(s)) is not None and v.heartbeats >= 2
                                    for s in ("hz-edge", "nj-edge")), 5, "both sites heard")
            view = hub.registry.get("nj-edge")
            assert view is not None
            rep = view.replicas["m"]
            assert (view.queue_depth, view.inflight, view.service_ms_p50) == (0, 0, 0.0)
            assert (rep.busy, rep.cards) == (0, 0.0) and 0 < rep.slots <= 100_000
            assert view.free_cards == {"L20": 4.0} and view.load("m") >= 0
            async with aiohttp.ClientSession() as session:
                base = f"http://127.0.0.1:{hub.http_port}"
                acme, bob = Client(session, base, keys["acme"]), Client(session, base, keys["bob"])
                outputs = []
                for i in range(40):  # nanjing is nj-edge's own city: the rogue is nearest to every request
                    status, body, headers = await acme.call(
                        "POST", "/v1/infer", {"model": "m", "input": f"secret {i}", "budget_ms": 50})
                    assert status == 200, body
                    outputs.append((headers["X-CPN-Site"], body["output"]))
                assert set(outputs) == {("hz-edge", "hz-edge answers")}
                status, body, _ = await bob.call("POST", "/v1/infer", {"model": "m", "input": "secret", "budget_ms": 50})
                assert status == 404 and body["error"]["code"] == "model_not_found", body
                status, body, _ = await bob.call("GET", "/v1/models")
                assert status == 200 and [m["id"] for m in body["data"]] == []
                # An operator's own call (admin key) may use any replica; that is the operator's choice.
                status, body, _ = await Client(session, base, admin).call(
                    "POST", "/v1/infer", {"model": "m", "input": "x", "origin": "nanjing", "budget_ms": 50})
                assert status == 200, body
            assert "acme" not in served and "bob" not in served
            text = await get_metrics(hub)
            for figure in ("queue", "replica", "free_cards", "service_ms"):
                assert metric(text, f'cpn_site_figures_clamped_total{{figure="{figure}"}}') >= 2, figure
        finally:
            for nc, task in (hz, rogue):
                task.cancel()
                await nc.close()


# --------------------------------------------------------------------------- events and attempts


async def test_a_second_site_forging_events_cannot_freeze_a_job_running_elsewhere(
        tmp_path: Path, nats_server: NatsServer, site: RawSite) -> None:
    async with running_hub(hub_config(tmp_path, nats_server.url)) as hub:
        jid = await dispatched(hub, site)
        (start,) = site.commands
        now = time.time()
        rogue = await nats.connect(nats_server.url, inbox_prefix=wire.inbox_prefix("nj-edge"))
        try:
            for seq in range(2, 301):  # nj-edge, on its own subject, speaks for hz-edge's attempt first
                ev = wire.Checkpointed(job=jid, attempt=1, seq=seq, site="nj-edge", at=now, progress=0.0,
                                       checkpoint="evil://nj-edge/x")
                ack = await rogue.request(wire.event_subject("nj-edge"), wire.encode(ev), timeout=5,
                                          headers={"Nats-Msg-Id": wire.event_msg_id(jid, 1, seq)})
                assert b'"stream"' in ack.data, ack.data  # stored: the fence must act at recording
        finally:
            await rogue.close()
        await until(lambda: hub.bus.stats.events >= 299, 15, "forged events consumed")
        # Then the genuine site's checkpoint and exit, with the same sequence numbers.
        key_ = start.event_key
        await site.publish_event(wire.AttemptStarted(job=jid, attempt=1, seq=1, site="hz-edge", at=now), key=key_)
        await site.publish_event(wire.Checkpointed(job=jid, attempt=1, seq=2, site="hz-edge", at=now + 1,
                                                   progress=0.5, checkpoint="sim://hz-edge/ok"), key=key_)
        await site.publish_event(wire.AttemptExited(job=jid, attempt=1, seq=3, site="hz-edge", at=now + 2,
                                                    reason="completed", progress=1.0), key=key_)
        await until(lambda: store_jobs.get_job(hub.db, jid).state == "succeeded", 10, "job succeeded")  # type: ignore[union-attr]
        service = services_of(hub).training
        assert service.counters["not_holder"] == 299
        events = store_jobs.events(hub.db, jid)
        assert [(e.kind, e.body["site"]) for e in events] == [
            ("attempt_started", "hz-edge"), ("checkpointed", "hz-edge"), ("attempt_exited", "hz-edge")]
        text = await get_metrics(hub)
        assert metric(text, 'cpn_events_dropped_total{reason="not_holder"}') == 299


async def test_heartbeats_listing_attempts_the_hub_never_placed_turn_into_no_commands(
        tmp_path: Path, nats_server: NatsServer, site: RawSite) -> None:
    async with running_hub(hub_config(tmp_path, nats_server.url, scheduler_tick_s=0.1)) as hub:
        await site.join(hub)
        # A heartbeat listing 2,000 attempts the hub never placed, 5 times.
        fake = [wire.AttemptRef(job=f"job-{i:016x}", attempt=1) for i in range(2000)]
        view = hub.registry.get("hz-edge")
        assert view is not None
        service = services_of(hub).training
        assert site._beat is not None
        site._beat.cancel()  # from now on this test writes hz-edge's heartbeats itself
        for seq in range(5):
            await site.nc.publish(wire.heartbeat_subject("hz-edge"), wire.encode(
                wire.Heartbeat(site="hz-edge", seq=10_000 + seq, free_cards={"910B": 4.0}, attempts=fake)))
            ticks = service.counters["ticks"]
            await until(lambda: any(a.job == fake[0].job for a in view.attempts), 5, "heartbeat applied")
            await until(lambda: service.counters["ticks"] > ticks + 1, 5, "a tick saw it")
        assert sum(store_outbox.counts(hub.db).values()) == 0  # not one command written
        assert [c for c in site.commands if isinstance(c, wire.StopAttempt)] == []
        assert service.counters["never_placed"] >= 1
        text = await get_metrics(hub)
        assert metric(text, 'cpn_heartbeat_attempts_ignored_total{site="hz-edge"}') >= 1
        # At most one listed attempt per card is believed (4 here): a heartbeat cannot make the hub
        # walk 2,000 of them.
        assert len(view.attempts) <= 4
        assert metric(text, 'cpn_site_figures_clamped_total{figure="attempts"}') >= 5


async def test_a_site_restarted_without_its_attempt_gets_it_failed_vanished_and_restarted(
        tmp_path: Path, nats_server: NatsServer, site: RawSite) -> None:
    async with running_hub(hub_config(tmp_path, nats_server.url)) as hub:  # vanished_heartbeats = 5
        key = hub.create_tenant("acme")
        await site.join(hub)
        jid = await submit(hub, key)
        await until(lambda: site.running, 10, "attempt started at the site")
        (start,) = site.commands
        now = time.time()
        await site.publish_event(wire.AttemptStarted(job=jid, attempt=1, seq=1, site="hz-edge", at=now), key=start.event_key)
        await site.publish_event(wire.Checkpointed(job=jid, attempt=1, seq=2, site="hz-edge", at=now + 1, progress=0.4,
                                                   checkpoint="sim://hz-edge/ck1"), key=start.event_key)
        await until(lambda: store_jobs.get_job(hub.db, jid).progress == 0.4, 10, "checkpoint applied")  # type: ignore[union-attr]
        view = hub.registry.get("hz-edge")
        assert view is not None
        beats = view.heartbeats
        await until(lambda: view.heartbeats >= beats + 8, 10, "heartbeats listing the attempt")
        assert store_jobs.get_job(hub.db, jid).state == "running"  # type: ignore[union-attr]  # listed: left alone
        # The site restarts as a fresh process that lost its attempt: it registers and heartbeats without it.
        site.running.clear()
        await site.register()
        await until(lambda: len(site.commands) >= 2, 15, "attempt 2 started")
        first, *_ = store_jobs.attempts(hub.db, jid)
        assert first.exit_reason == "vanished" and "heartbeats" in first.detail
        again = site.commands[1]
        assert isinstance(again, wire.StartAttempt) and again.attempt == 2
        assert (again.resume_from, again.progress) == ("sim://hz-edge/ck1", 0.4)
        row = store_jobs.get_job(hub.db, jid)
        assert row is not None and (row.infra_restarts, row.user_retries) == (1, 0)
        kinds = [e.kind for e in store_jobs.events(hub.db, jid)]
        assert "vanished" in kinds
        text = await get_metrics(hub)
        assert metric(text, "cpn_attempts_vanished_total") == 1


# --------------------------------------------------------------------------- workloads


async def test_workloads_go_only_to_sites_that_can_run_them_and_refusals_reach_the_job_events(
        tmp_path: Path, nats_server: NatsServer, site: RawSite) -> None:
    async with running_hub(hub_config(tmp_path, nats_server.url)) as hub:
        key = hub.create_tenant("acme")
        await site.join(hub)  # hz-edge registers executors ["sim"]
        async with aiohttp.ClientSession() as session:
            acme = Client(session, f"http://127.0.0.1:{hub.http_port}", key)
            for bad in ("UPPER/case", "a" * 300, "busybox;rm -rf /", "", "../x"):
                status, body, _ = await acme.call("POST", "/v1/jobs", {**JOB, "image": bad})
                assert status in (400, 422) and "image" in str(body), (bad, body)
            status, body, _ = await acme.call("POST", "/v1/jobs", {**JOB, "image": "localhost/cpn-train:1.0"})
            assert status == 201 and body["executor"] == "container", body
            jid = body["id"]
            await until(lambda: "runs no container workloads" in store_jobs.get_job(hub.db, jid).reason,  # type: ignore[union-attr]
                        10, "wait reason")
            status, events, _ = await acme.call("GET", f"/v1/jobs/{jid}/events")
            assert status == 200 and events["data"][0]["kind"] == "unplaceable"
            assert "runs no container workloads" in events["data"][0]["body"]["reason"]
            assert store_jobs.get_job(hub.db, jid).state == "queued" and site.commands == []  # type: ignore[union-attr]
            # The site comes back able to run containers, but refuses this image.
            site.answer = lambda cmd: wire.ErrorReply(code="not_allowed", message="image localhost/cpn-train:1.0 is not allow-listed here") \
                if isinstance(cmd, wire.StartAttempt) else wire.Ack(detail="ok")
            await register(site.nc, wire.Register(site="hz-edge", city="hangzhou", accelerators={"910B": 4},
                                                  executors=["sim", "container"]))
            await until(lambda: site.commands, 10, "StartAttempt sent")
            cmd = site.commands[0]
            assert isinstance(cmd, wire.StartAttempt)
            assert (cmd.executor, cmd.image) == ("container", "localhost/cpn-train:1.0")

            def refused() -> bool:
                return any(e.kind == "start_refused" for e in store_jobs.events(hub.db, jid))

            await until(refused, 10, "refusal in the job's events")
            status, events, _ = await acme.call("GET", f"/v1/jobs/{jid}/events")
            (ev,) = [e for e in events["data"] if e["kind"] == "start_refused"]
            assert ev["body"]["site"] == "hz-edge" and "not allow-listed" in ev["body"]["reason"], ev
            # The refusal cools the site down for this hub (it is not asked again at once).
            assert [type(c).__name__ for c in site.commands] == ["StartAttempt"]


async def test_cpn_site_declare_and_show_through_the_admin_api(
        tmp_path: Path, nats_server: NatsServer, capsys: pytest.CaptureFixture[str]) -> None:
    from controlplane import cli

    async with running_hub(hub_config(tmp_path, nats_server.url)) as hub:
        admin = hub.create_admin_key("ops")
        common = ["--hub", f"http://127.0.0.1:{hub.http_port}", "--admin-key", admin]
        code = await asyncio.to_thread(cli.main, ["site", "declare", "nj-edge", "--cards", "L20=2",
                                                  "--local-model-tenants", "acme, beta", *common])
        assert code == 0, capsys.readouterr().err
        assert hub.sites.declarations["nj-edge"].accelerators == {"L20": 2}
        assert hub.sites.declarations["nj-edge"].local_model_tenants == ("acme", "beta")
        assert hub.sites.declarations["nj-edge"].city == "nanjing"  # the layout's, not given
        capsys.readouterr()
        assert await asyncio.to_thread(cli.main, ["site", "show", "nj-edge", *common]) == 0
        assert '"L20": 2' in capsys.readouterr().out
        code = await asyncio.to_thread(cli.main, ["site", "declare", "nj-edge", "--cards", "L20=-1", *common])
        assert code == 2 and "accelerators" in capsys.readouterr().err
        code = await asyncio.to_thread(cli.main, ["site", "show", "nj-edge", "--hub", f"http://127.0.0.1:{hub.http_port}",
                                                  "--admin-key", "wrong"])
        assert code == 2 and "401" in capsys.readouterr().err


async def test_an_acknowledged_start_left_placed_by_a_hub_crash_is_not_stranded_either(
        tmp_path: Path, nats_server: NatsServer, site: RawSite) -> None:
    config = hub_config(tmp_path, nats_server.url)
    async with running_hub(config) as hub:
        jid = await dispatched(hub, site)
    # What a hub killed between marking the StartAttempt sent and recording its Ack leaves behind.
    from controlplane.store import db as store_db
    db = store_db.open_db(config.db_path)
    try:
        store_jobs.update_job(db, jid, time.time(), state="placed")
        assert [e.state for e in store_outbox.for_job(db, jid)] == ["sent"]
    finally:
        db.conn.close()
    site.running.clear()  # and the site restarted without the attempt
    async with running_hub(config) as hub:
        await until(lambda: len(site.commands) >= 2, 20, "attempt 2 started")
        first = store_jobs.attempts(hub.db, jid)[0]
        assert first.exit_reason == "vanished"
        assert isinstance(site.commands[1], wire.StartAttempt) and site.commands[1].attempt == 2
