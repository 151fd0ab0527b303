"""The agent against a real nats-server and a fake hub: registration, heartbeats, inference, commands."""

from __future__ import annotations

import asyncio

from controlplane.nats.natsserver import NatsServer
from edge_agent import wire
from tests.support.fakehub import FakeHub, agent_config, running, wait_for
from tests.support.timers import timers_armed


async def test_registers_and_heartbeats_free_cards_and_replicas(nats_server: NatsServer) -> None:
    async with FakeHub(nats_server.url, heartbeat_s=0.1) as hub:
        cfg = agent_config(nats_server.url, "edge-a", accelerators={"H20": 4, "910B": 2}, tee=True, lat=30.2,
                           lon=120.1, city="hangzhou", models=[{"name": "qwen", "cards": 0.5, "slots": 3}])
        async with running(cfg) as agent:
            await asyncio.wait_for(agent.registered.wait(), 5)
            reg = hub.registrations_of("edge-a")[0]
            assert reg.accelerators == {"H20": 4, "910B": 2} and reg.infer_acks
            assert reg.backends == ["sim"] and reg.executors == ["sim"]  # what the test config enables
            assert reg.tee and reg.lat == 30.2 and reg.city == "hangzhou" and reg.proto == wire.PROTO
            assert [(m.model, m.deployment, m.cards, m.slots) for m in reg.models] == [("qwen", "local", 0.5, 3)]

            hb = await hub.wait_heartbeat("edge-a", lambda hb: hb.seq >= 3, what="three heartbeats")
            # The replica's half card comes off the accelerator with the most free cards.
            assert hb.free_cards == {"H20": 3.5, "910B": 2.0}
            assert [(m.model, m.state, m.slots, m.busy) for m in hb.models] == [("qwen", "ready", 3, 0)]
            assert not hb.draining and hb.health == "ok"
            seqs = [h.seq for h in hub.heartbeats["edge-a"]]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
            assert "registered=True" in repr(agent) and "replicas=1" in repr(agent)


async def test_sim_inference_is_deterministic_and_names_the_site(nats_server: NatsServer) -> None:
    async with FakeHub(nats_server.url) as hub:
        async with running(agent_config(nats_server.url, "edge-a")), \
                running(agent_config(nats_server.url, "edge-b")):
            req = wire.InferRequest(request_id="r1", model="qwen", prompt="hello world", max_tokens=5)
            a1 = await hub.infer("edge-a", req)
            a2 = await hub.infer("edge-a", req)
            b = await hub.infer("edge-b", req)
            assert isinstance(a1, wire.InferResult) and isinstance(b, wire.InferResult)
            assert a1.output == a2.output
            assert a1.output.startswith("edge-a: ") and b.output.startswith("edge-b: ")
            assert len(a1.output.split()) == 1 + 5 and a1.completion_tokens == 5 and a1.prompt_tokens == 2
            assert a1.site == "edge-a" and a1.request_id == "r1"
            chat = await hub.infer("edge-a", wire.InferRequest(
                request_id="r2", model="qwen", max_tokens=5,
                messages=[wire.ChatMessage(role="user", content="hello world")]))
            assert isinstance(chat, wire.InferResult) and chat.output != a1.output


async def test_an_answer_that_needs_no_waiting_is_the_same_as_a_waited_one(nats_server: NatsServer) -> None:
    req = wire.InferRequest(request_id="n1", model="qwen", prompt="same question", max_tokens=6)
    answers = {}
    async with FakeHub(nats_server.url) as hub:
        for ttft_ms in (0.0, 5.0):  # 0: answered inline, no task; 5: served by a task
            cfg = agent_config(nats_server.url, backend={"sim": {"ttft_ms": ttft_ms, "slots": 32}})
            async with running(cfg) as agent:
                got = await asyncio.gather(*(hub.infer("edge-a", req) for _ in range(20)))
                assert all(isinstance(g, wire.InferResult) for g in got)
                assert agent.counters["infer_ok"] == 20 and agent.inventory.inflight() == 0
                assert len(agent.inference.service_times) == 20
                answers[ttft_ms] = got[0]
    quick, waited = answers[0.0], answers[5.0]
    assert isinstance(quick, wire.InferResult) and isinstance(waited, wire.InferResult)
    assert (quick.output, quick.completion_tokens, quick.finish_reason) == \
        (waited.output, waited.completion_tokens, waited.finish_reason)
    assert quick.service_ms < 5 <= waited.service_ms


async def test_streaming_chunks_arrive_before_the_result(nats_server: NatsServer) -> None:
    async with FakeHub(nats_server.url) as hub:
        cfg = agent_config(nats_server.url, backend={"sim": {"ttft_ms": 20.0, "per_token_ms": 40.0}})
        async with running(cfg):
            req = wire.InferRequest(request_id="s1", model="qwen", prompt="tell me", max_tokens=4, stream=True)
            got = await hub.infer_stream("edge-a", req)
            chunks = [m for _, m in got if isinstance(m, wire.InferChunk)]
            final_at, final = got[-1]
            assert isinstance(final, wire.InferResult)
            assert [c.index for c in chunks] == [0, 1, 2, 3]
            assert "".join(c.text for c in chunks) == final.output
            # Real streaming: the first chunk arrived well before the answer was complete.
            first_at = got[0][0]
            assert final_at - first_at >= 0.1, (first_at, final_at)
            assert final.service_ms >= 20 + 3 * 40 - 5
            # The first chunk states the site's own time to it (the hub's overhead estimate tells
            # its own time to the first chunk from the site's); later chunks do not.
            assert chunks[0].site_ms is not None and 20 - 5 <= chunks[0].site_ms < final.service_ms
            assert [c.site_ms for c in chunks[1:]] == [None, None, None]


async def test_busy_when_every_slot_is_taken(nats_server: NatsServer) -> None:
    async with FakeHub(nats_server.url) as hub:
        cfg = agent_config(nats_server.url, backend={"sim": {"ttft_ms": 1500.0, "slots": 2}})
        async with running(cfg) as agent:
            slow = [asyncio.create_task(hub.infer("edge-a", wire.InferRequest(request_id=f"r{i}", model="qwen")))
                    for i in range(2)]
            await wait_for(lambda: agent.inventory.inflight() == 2, 3, "two requests in flight")
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            third = await hub.infer("edge-a", wire.InferRequest(request_id="r3", model="qwen"))
            assert isinstance(third, wire.ErrorReply) and third.code == "busy" and third.retryable
            assert loop.time() - t0 < 1.0  # at once, not after a slot frees up (1.5 s)
            assert all(isinstance(r, wire.InferResult) for r in await asyncio.gather(*slow))
            unknown = await hub.infer("edge-a", wire.InferRequest(request_id="r4", model="nope"))
            assert isinstance(unknown, wire.ErrorReply) and unknown.code == "unknown_model" and unknown.retryable


async def test_a_request_past_its_deadline_gets_timeout_and_frees_its_slot(nats_server: NatsServer) -> None:
    async with FakeHub(nats_server.url) as hub:
        cfg = agent_config(nats_server.url, backend={"sim": {"ttft_ms": 1500.0, "slots": 1}})
        async with running(cfg) as agent:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            late = await hub.infer("edge-a", wire.InferRequest(request_id="d1", model="qwen", deadline_ms=150))
            assert isinstance(late, wire.ErrorReply) and late.code == "timeout" and late.retryable, late
            assert 0.14 <= loop.time() - t0 < 1.2  # the deadline, not the 1.5 s answer
            assert agent.inventory.inflight() == 0 and agent.counters["infer_errors"] == 1
            assert not agent.inference._expired  # nothing left behind
            # The slot is free again; a request with no deadline of its own is not cut short.
            t1 = loop.time()
            ok = await hub.infer("edge-a", wire.InferRequest(request_id="d2", model="qwen"), timeout_s=5)
            assert isinstance(ok, wire.InferResult) and loop.time() - t1 >= 1.4


async def test_malformed_messages_are_answered_and_counted(nats_server: NatsServer) -> None:
    async with FakeHub(nats_server.url) as hub:
        async with running(agent_config(nats_server.url)) as agent:
            for body in (b"not json", b'{"type": "infer"}', b'{"type":"infer","request_id":"x","model":7}'):
                reply = await hub.infer("edge-a", body)
                assert isinstance(reply, wire.ErrorReply) and reply.code == "bad_message", body
            bad_cmd = await hub.command_raw("edge-a", b'{"type": "launch_missiles"}')
            assert isinstance(bad_cmd, wire.ErrorReply) and bad_cmd.code == "bad_message"
            assert agent.counters["bad_messages"] == 4
            ok = await hub.infer("edge-a", wire.InferRequest(request_id="after", model="qwen"))
            assert isinstance(ok, wire.InferResult)


async def test_cancel_infer_stops_generation(nats_server: NatsServer) -> None:
    async with FakeHub(nats_server.url) as hub:
        cfg = agent_config(nats_server.url, backend={"sim": {"ttft_ms": 10.0, "per_token_ms": 50.0}})
        async with running(cfg) as agent:
            req = wire.InferRequest(request_id="long", model="qwen", max_tokens=200, stream=True)
            stream = asyncio.create_task(hub.infer_stream("edge-a", req, timeout_s=5))
            await wait_for(lambda: agent.inventory.inflight() == 1, 3, "the stream to start")
            ack = await hub.command("edge-a", wire.CancelInfer(request_id="long"))
            assert isinstance(ack, wire.Ack) and ack.detail == "cancelled"
            got = await stream
            assert isinstance(got[-1][1], wire.ErrorReply) and got[-1][1].code == "cancelled"
            assert len(got) < 50
            await wait_for(lambda: agent.inventory.inflight() == 0, 2, "the slot to be released")


async def test_load_model_goes_loading_then_ready_and_refuses_without_cards(nats_server: NatsServer) -> None:
    async with FakeHub(nats_server.url, heartbeat_s=0.05) as hub:
        cfg = agent_config(nats_server.url, accelerators={"H20": 2}, models=[],
                           backend={"sim": {"load_time_s": 0.5}})
        async with running(cfg) as agent:
            await asyncio.wait_for(agent.registered.wait(), 5)
            ack = await hub.command("edge-a", wire.LoadModel(model="llama", deployment="d1", cards=1.5, slots=2))
            assert isinstance(ack, wire.Ack)
            loading = await hub.wait_heartbeat("edge-a", lambda hb: bool(hb.models), what="a loading replica")
            assert loading.models[0].state == "loading" and loading.free_cards == {"H20": 0.5}
            early = await hub.infer("edge-a", wire.InferRequest(request_id="e", model="llama"))
            assert isinstance(early, wire.ErrorReply) and early.code == "unknown_model"
            again = await hub.command("edge-a", wire.LoadModel(model="llama", deployment="d1", cards=1.5))
            assert isinstance(again, wire.Ack) and "already" in again.detail  # idempotent
            await hub.wait_heartbeat("edge-a", lambda hb: bool(hb.models) and hb.models[0].state == "ready",
                                     what="the replica ready")
            assert isinstance(await hub.infer("edge-a", wire.InferRequest(request_id="l", model="llama")),
                              wire.InferResult)
            refused = await hub.command("edge-a", wire.LoadModel(model="big", deployment="d2", cards=1.0))
            assert isinstance(refused, wire.ErrorReply) and refused.code == "no_capacity"
            gone = await hub.command("edge-a", wire.UnloadModel(model="llama", deployment="d1"))
            assert isinstance(gone, wire.Ack) and gone.detail == "unloaded"
            await hub.wait_heartbeat("edge-a", lambda hb: not hb.models and hb.free_cards == {"H20": 2.0},
                                     what="cards freed")


async def test_drain_shows_in_heartbeats_and_refuses_new_work(nats_server: NatsServer) -> None:
    async with FakeHub(nats_server.url) as hub:
        async with running(agent_config(nats_server.url)) as agent:
            await asyncio.wait_for(agent.registered.wait(), 5)
            assert isinstance(await hub.command("edge-a", wire.Drain(on=True)), wire.Ack)
            await hub.wait_heartbeat("edge-a", lambda hb: hb.draining, what="draining")
            refused = await hub.command("edge-a", wire.LoadModel(model="m2", deployment="d"))
            assert isinstance(refused, wire.ErrorReply) and refused.code == "draining"
            refused = await hub.command("edge-a", wire.StartAttempt(job="j", attempt=1, cards=1, accelerator="H20"))
            assert isinstance(refused, wire.ErrorReply) and refused.code == "draining"
            # Inference on loaded replicas continues while draining.
            assert isinstance(await hub.infer("edge-a", wire.InferRequest(request_id="d", model="qwen")),
                              wire.InferResult)
            assert isinstance(await hub.command("edge-a", wire.Drain(on=False)), wire.Ack)
            await hub.wait_heartbeat("edge-a", lambda hb: not hb.draining, what="not draining")


async def test_agent_started_before_its_hub_registers_when_the_hub_comes(nats_server: NatsServer) -> None:
    async with running(agent_config(nats_server.url)) as agent:
        await wait_for(lambda: agent.counters["register_failures"] >= 2, 5, "failed register attempts")
        assert not agent.registered.is_set()
        async with FakeHub(nats_server.url) as hub:
            hub.refuse_register = wire.ErrorReply(code="unknown_site", message="not yet", retryable=True)
            await wait_for(lambda: agent.counters["register_refused"] >= 2, 5, "refused registrations")
            assert not agent.registered.is_set() and not hub.heartbeats.get("edge-a")
            hub.refuse_register = None
            await asyncio.wait_for(agent.registered.wait(), 5)
            await hub.wait_heartbeat("edge-a")


async def test_reregisters_after_reregister_command_and_nats_restart(nats_server: NatsServer) -> None:
    async with FakeHub(nats_server.url) as hub:
        async with running(agent_config(nats_server.url)) as agent:
            await asyncio.wait_for(agent.registered.wait(), 5)
            assert len(hub.registrations_of("edge-a")) == 1
            ack = await hub.command("edge-a", wire.Reregister(hub="fakehub"))
            assert isinstance(ack, wire.Ack)
            await wait_for(lambda: len(hub.registrations_of("edge-a")) == 2, 5, "a second registration")

            await nats_server.restart()
            await wait_for(lambda: len(hub.registrations_of("edge-a")) >= 3, 10, "registration after restart")
            assert agent.bus.counters["reconnects"] >= 1
            before = len(hub.heartbeats["edge-a"])
            await wait_for(lambda: len(hub.heartbeats["edge-a"]) > before + 2, 5, "heartbeats after restart")
            reply = await hub.infer("edge-a", wire.InferRequest(request_id="after-restart", model="qwen"))
            assert isinstance(reply, wire.InferResult)


async def test_heartbeats_stop_while_disconnected(nats_server: NatsServer) -> None:
    async with FakeHub(nats_server.url) as hub:
        async with running(agent_config(nats_server.url)) as agent:
            await hub.wait_heartbeat("edge-a", lambda hb: hb.seq >= 2)
            await nats_server.stop()
            await wait_for(lambda: not agent.bus.is_connected, 5, "the agent to notice")
            sent = agent.counters["heartbeats"]
            await wait_for(lambda: agent.counters["heartbeats_skipped"] >= 3, 3, "skipped heartbeats")
            assert agent.counters["heartbeats"] == sent  # none queued while away
            registrations = len(hub.registrations_of("edge-a"))
            await nats_server.start()
            await wait_for(lambda: len(hub.registrations_of("edge-a")) > registrations, 10, "re-registration")
            await wait_for(lambda: agent.counters["heartbeats"] > sent, 5, "heartbeats again")


async def test_a_request_asking_for_an_ack_gets_one_before_a_slow_answer_and_none_before_an_instant_one(
        nats_server: NatsServer) -> None:
    async with FakeHub(nats_server.url) as hub:
        cfg = agent_config(nats_server.url, backend={"sim": {"ttft_ms": 300.0, "slots": 1}})
        async with running(cfg) as agent:
            got = await hub.infer_stream("edge-a", wire.InferRequest(request_id="k1", model="qwen", ack=True))
            (t_ack, ack), (t_result, result) = got
            assert isinstance(ack, wire.InferAccepted) and ack.request_id == "k1"
            assert isinstance(result, wire.InferResult) and t_result - t_ack >= 0.25  # the ack did not wait
            streamed = await hub.infer_stream("edge-a", wire.InferRequest(request_id="k2", model="qwen", ack=True,
                                                                          stream=True, max_tokens=2))
            assert [type(m).__name__ for _, m in streamed] == ["InferAccepted", "InferChunk", "InferChunk", "InferResult"]
            plain = await hub.infer_stream("edge-a", wire.InferRequest(request_id="k3", model="qwen"))
            assert [type(m).__name__ for _, m in plain] == ["InferResult"]  # not asked: not sent
            assert agent.inventory.inflight() == 0
    async with FakeHub(nats_server.url) as hub:
        async with running(agent_config(nats_server.url)):  # no delays: answered at once, nothing to acknowledge
            instant = await hub.infer_stream("edge-a", wire.InferRequest(request_id="k4", model="qwen", ack=True))
            assert [type(m).__name__ for _, m in instant] == ["InferResult"]


async def test_an_ack_asked_for_after_a_delay_is_sent_only_when_the_answer_is_slower(nats_server: NatsServer) -> None:
    # ack_after_ms: a fast answer (or first chunk) stands for the acknowledgement (two messages a
    # request, not three); a slow one is still acknowledged, that long after the request arrived.
    async with FakeHub(nats_server.url) as hub:
        cfg = agent_config(nats_server.url, backend={"sim": {"ttft_ms": 300.0, "per_token_ms": 0.0, "slots": 2}})
        async with running(cfg):
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            got = await hub.infer_stream("edge-a", wire.InferRequest(request_id="d1", model="qwen", ack=True,
                                                                     ack_after_ms=100.0))
            (t_ack, ack), (t_result, result) = got
            assert isinstance(ack, wire.InferAccepted) and isinstance(result, wire.InferResult)
            assert t_ack - t0 >= 0.09 and t_result - t_ack >= 0.15  # after the delay, well before the answer
            fast = await hub.infer_stream("edge-a", wire.InferRequest(request_id="d2", model="qwen", ack=True,
                                                                      ack_after_ms=2000.0))
            assert [type(m).__name__ for _, m in fast] == ["InferResult"]
            streamed = await hub.infer_stream("edge-a", wire.InferRequest(request_id="d3", model="qwen", ack=True,
                                                                          ack_after_ms=2000.0, stream=True, max_tokens=2))
            assert [type(m).__name__ for _, m in streamed] == ["InferChunk", "InferChunk", "InferResult"]


async def test_a_request_costs_the_inference_service_one_loop_timer_for_its_ack_and_its_deadline(
        nats_server: NatsServer) -> None:
    # The acknowledgement's time and the deadline share one timer: armed for the ack, re-armed for
    # the deadline. Fast answers: one timer each (not two); a slow one: ack, then the timeout.
    loop = asyncio.get_running_loop()
    with timers_armed(owners=("_Watch.", "InferenceService.")) as armed:
        async with FakeHub(nats_server.url) as hub:
            cfg = agent_config(nats_server.url, backend={"sim": {"ttft_ms": 5.0, "slots": 8}})
            async with running(cfg) as agent:
                reqs = [wire.InferRequest(request_id=f"w{i}", model="qwen", ack=True, ack_after_ms=2000.0,
                                          deadline_ms=10000.0) for i in range(6)]
                got = await asyncio.gather(*(hub.infer("edge-a", r) for r in reqs))
                assert all(isinstance(g, wire.InferResult) for g in got)
                assert len(armed) == 6  # one each: the old code armed two (ack, deadline)
            slow = agent_config(nats_server.url, backend={"sim": {"ttft_ms": 2000.0, "slots": 1}})
            async with running(slow) as agent:
                loop_t0 = loop.time()
                msgs = await hub.infer_stream("edge-a", wire.InferRequest(
                    request_id="late", model="qwen", ack=True, ack_after_ms=100.0, deadline_ms=400.0))
                (t_ack, ack), (t_end, end) = msgs
                assert isinstance(ack, wire.InferAccepted) and isinstance(end, wire.ErrorReply)
                assert end.code == "timeout" and t_ack - loop_t0 >= 0.09 and t_end - loop_t0 >= 0.38
                await wait_for(lambda: agent.inventory.inflight() == 0, 2, "the slot back")
            # A stream whose first chunk beat the ack's time and runs past it: no ack, and the
            # timer, re-armed at the ack's time, is not taken for the deadline.
            paced = agent_config(nats_server.url, backend={"sim": {"ttft_ms": 10.0, "per_token_ms": 80.0}})
            async with running(paced):
                msgs = await hub.infer_stream("edge-a", wire.InferRequest(
                    request_id="paced", model="qwen", ack=True, ack_after_ms=100.0, deadline_ms=5000.0,
                    stream=True, max_tokens=4))
                assert [type(m).__name__ for _, m in msgs] == ["InferChunk"] * 4 + ["InferResult"]
                assert msgs[-1][0] - msgs[0][0] >= 0.2  # the stream did run past the ack's time
