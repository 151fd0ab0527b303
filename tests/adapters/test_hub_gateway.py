"""The hub against a real nats-server, a real SQLite file and its real HTTP gateway.

The "agent" here is a few lines of nats-py speaking the wire contract: a real peer, so the hub's
handling of registrations, heartbeats, malformed messages and bad HTTP input is tested without
the edge_agent package.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import msgspec
import nats
import openai
import pytest

from controlplane.core.errors import SiteRefused, SiteSilent, SiteUnreachable
from controlplane.nats.natsserver import NatsServer
from controlplane.services.inference import ACK_AFTER_SHARE
from edge_agent import wire
from edge_agent.nats_barrier import barrier
from tests.support.hubrig import Client, hub_config, running_hub
from tests.support.rawsite import raw_agent
from tests.support.timers import timers_armed
from tests.support.waiting import until


async def _streamed(bus, *args, **kwargs) -> list:  # type: ignore[no-untyped-def,type-arg]
    """Every message of a stream (``HubBus.infer_stream``): the first, then the rest."""
    first, rest = await bus.infer_stream(*args, **kwargs)
    return [first] + ([m async for m in rest] if rest is not None else [])


async def _sh_edge_serving(site, hub, model: str) -> None:  # type: ignore[no-untyped-def]
    """The bare site ``sh-edge`` (a plain NATS client) registered with ``model`` loaded, and the hub
    knowing it."""
    ack = await site.request(wire.register_subject("sh-edge"),
                             wire.encode(wire.Register(site="sh-edge", city="shanghai")), timeout=2)
    assert isinstance(wire.register_reply_decoder.decode(ack.data), wire.RegisterAck)
    hb = wire.Heartbeat(site="sh-edge", seq=1, models=[wire.ReplicaStatus(model=model, slots=8)])
    await site.publish(wire.heartbeat_subject("sh-edge"), wire.encode(hb))
    await until(lambda: model in hub.known_models())


@pytest.fixture
async def rig(tmp_path: Path, nats_server: NatsServer):  # type: ignore[no-untyped-def]
    async with running_hub(hub_config(tmp_path, nats_server.url)) as hub:
        admin = hub.create_admin_key("test")
        key = hub.create_tenant("acme", default_origin="hangzhou")
        nc, task = await raw_agent(nats_server.url, "hz-edge", "hangzhou")
        await until(lambda: "m" in hub.known_models())
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{hub.http_port}"
            yield hub, Client(session, base, key), Client(session, base, admin), Client(session, base, None), nc
        task.cancel()
        await nc.close()  # type: ignore[attr-defined]


async def test_infer_answers_from_the_site_with_route_headers(rig) -> None:  # type: ignore[no-untyped-def]
    hub, tenant, _, _, _ = rig
    status, body, headers = await tenant.call("POST", "/v1/infer", {"model": "m", "input": "hi"})
    assert status == 200, body
    assert body["output"] == "hz-edge:hi" and headers["X-CPN-Site"] == "hz-edge"
    assert float(headers["X-CPN-RTT-Ms"]) > 0 and headers["X-CPN-Route"] == "nearest"


@pytest.mark.parametrize(
    ("raw", "status", "needle"),
    [
        (b"{not json", 400, "malformed JSON"),
        (b'{"model": 3, "input": "x"}', 400, "model"),
        (b'{"model": "m"}', 400, "input"),
        (b'{"model": "m", "input": "x", "tenant_id": "evil"}', 422, "tenant_id"),
        (b'{"model": "nope", "input": "x"}', 404, "nope"),
        (b'{"model": "m", "input": "x", "origin": "atlantis"}', 400, "atlantis"),
        (b'{"model": "m", "input": "x", "budget_ms": -1}', 400, "budget_ms"),
        (b'{"model": "m", "input": "x", "origin": "nanjing", "budget_ms": 0.1}', 503, "nearest is hz-edge"),
    ],
)
async def test_bad_input_gets_a_clear_error_and_the_hub_keeps_serving(rig, raw: bytes, status: int, needle: str) -> None:  # type: ignore[no-untyped-def]
    _, tenant, _, _, _ = rig
    got, body, _ = await tenant.call("POST", "/v1/infer", raw=raw)
    assert got == status, body
    assert needle in body["error"]["message"] or needle == body["error"].get("param")
    ok, _, _ = await tenant.call("POST", "/v1/infer", {"model": "m", "input": "again"})
    assert ok == 200


async def test_auth_and_limits(rig) -> None:  # type: ignore[no-untyped-def]
    hub, tenant, admin, anon, _ = rig
    assert (await anon.call("POST", "/v1/infer", {"model": "m", "input": "x"}))[0] == 401
    bad = Client(tenant.session, tenant.base, "cpn_wrong")
    assert (await bad.call("POST", "/v1/infer", {"model": "m", "input": "x"}))[0] == 401
    status, body, _ = await tenant.call("POST", "/v1/infer", raw=b'{"model":"m","input":"' + b"x" * (2 << 20) + b'"}')
    assert status == 413 and "larger than" in body["error"]["message"]
    assert (await tenant.call("GET", "/v1/sites"))[0] == 403
    status, body, _ = await admin.call("GET", "/v1/sites")
    assert status == 200 and [s["id"] for s in body["data"]] == ["hz-edge"]


async def test_health_and_metrics_are_public(rig) -> None:  # type: ignore[no-untyped-def]
    _, tenant, _, anon, _ = rig
    await tenant.call("POST", "/v1/infer", {"model": "m", "input": "x"})
    status, body, _ = await anon.call("GET", "/healthz")
    assert status == 200 and body["status"] == "ok" and body["sites"]["up"] == 1
    async with anon.session.get(anon.base + "/metrics") as resp:
        text = await resp.text()
    assert 'cpn_sites{state="up"} 1.0' in text and "cpn_http_requests_total" in text and "cpn_nats_errors" in text


async def test_unknown_endpoints_and_methods_get_the_error_shape(rig) -> None:  # type: ignore[no-untyped-def]
    hub, tenant, _, anonymous, _ = rig
    status, body, headers = await tenant.call("GET", "/v1/nothing-here")
    assert status == 404 and body["error"]["code"] == "not_found" and "GET /v1/nothing-here" in body["error"]["message"]
    assert {k.lower(): v for k, v in headers.items()}.get("x-request-id"), headers
    status, body, _ = await tenant.call("GET", "/v1/infer")
    assert status == 405 and body["error"]["code"] == "method_not_allowed", body
    status, body, _ = await tenant.call("DELETE", "/v1/models")
    assert status == 405 and body["error"]["code"] == "method_not_allowed", body
    # Without a key an unknown path says nothing about what exists; public endpoints need none.
    assert (await anonymous.call("GET", "/v1/nothing-here"))[0] == 401
    assert (await anonymous.call("GET", "/healthz"))[0] == 200
    assert (await anonymous.call("HEAD", "/healthz"))[0] == 200
    status, text, _ = await anonymous.call("GET", "/metrics")
    assert status == 200 and 'cpn_http_requests_total{route="unmatched",status="404"} 1.0' in text
    assert 'cpn_http_requests_total{route="/v1/infer",status="405"} 1.0' not in text  # counted as unmatched


async def test_malformed_nats_messages_are_counted_and_answered(rig) -> None:  # type: ignore[no-untyped-def]
    hub, tenant, _, _, nc = rig
    reply = await nc.request(wire.register_subject("hz-edge"), b"\x00garbage", timeout=2)
    err = wire.register_reply_decoder.decode(reply.data)
    assert isinstance(err, wire.ErrorReply) and err.code == "bad_message"
    await nc.publish(wire.heartbeat_subject("hz-edge"), b'{"type":"hb"}')
    await barrier(nc)
    await until(lambda: hub.bus.stats.malformed >= 2)
    assert (await tenant.call("POST", "/v1/infer", {"model": "m", "input": "still"}))[0] == 200


async def test_site_requests_time_out_name_missing_sites_and_refuse_forged_replies(rig) -> None:  # type: ignore[no-untyped-def]
    hub, _, _, _, nc = rig
    req = wire.InferRequest(request_id="q1", model="m", prompt="hi")
    assert (await hub.bus.infer("hz-edge", req, 2.0)).site == "hz-edge"

    async def silent(msg):  # type: ignore[no-untyped-def]
        return None

    async def impostor(msg):  # type: ignore[no-untyped-def]
        await msg.respond(wire.encode(wire.InferResult(request_id="q1", site="other", model="m", output="x")))

    await nc.subscribe(wire.infer_subject("quiet"), cb=silent)  # type: ignore[attr-defined]
    await nc.subscribe(wire.infer_subject("liar"), cb=impostor)  # type: ignore[attr-defined]
    await barrier(nc)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(SiteUnreachable, match="quiet: no answer within 300 ms"):
        await hub.bus.infer("quiet", req, 0.3)
    assert 0.29 <= loop.time() - t0 < 1.5
    with pytest.raises(SiteUnreachable, match="nobody: no responders"):
        await hub.bus.infer("nobody", req, 2.0)
    with pytest.raises(SiteRefused, match="a reply for liar came from other"):
        await hub.bus.infer("liar", req, 2.0)
    assert hub.bus.stats.timeouts == 1 and hub.bus.stats.no_responders == 1
    gone = asyncio.create_task(hub.bus.infer("quiet", req, 5.0))  # a client that goes away
    await until(lambda: len(hub.bus._waiting) == 1)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert not hub.bus._waiting  # no request left behind, answered or not


async def test_requests_share_one_timer_and_a_silent_site_still_times_out_at_its_own_time(rig) -> None:  # type: ignore[no-untyped-def]
    # Every waiting request shares the bus's one timer (armed for the earliest due, re-armed when it
    # fires): twenty answered requests arm it once, where each used to arm and cancel its own. A
    # request due sooner than the timer re-arms it, and times out at its own time while other
    # requests come and go.
    hub, _, _, _, nc = rig
    loop = asyncio.get_running_loop()

    async def silent(msg):  # type: ignore[no-untyped-def]
        return None

    await nc.subscribe(wire.infer_subject("quiet"), cb=silent)  # type: ignore[attr-defined]
    await barrier(nc)
    req = wire.InferRequest(request_id="s1", model="m", prompt="hi")
    await hub.bus.infer("hz-edge", req, 5.0)  # the bus's timer armed before counting starts
    with timers_armed(module="controlplane.nats.bus") as armed:
        for _ in range(20):
            assert (await hub.bus.infer("hz-edge", req, 5.0)).site == "hz-edge"
        assert armed == [], armed  # the old code armed one timer per request
        started = loop.time()
        quiet = asyncio.create_task(hub.bus.infer("quiet", req, 0.3))
        while not quiet.done():
            assert (await hub.bus.infer("hz-edge", req, 5.0)).site == "hz-edge"
        with pytest.raises(SiteUnreachable, match="quiet: no answer within 300 ms"):
            await quiet
        assert 0.29 <= loop.time() - started < 1.5
        assert 1 <= len(armed) <= 3, armed  # re-armed for the quiet one's due, then for the next
    assert not hub.bus._waiting


async def test_a_site_that_acknowledges_is_waited_for_and_a_silent_one_is_left_at_the_ack_timeout(rig) -> None:  # type: ignore[no-untyped-def]
    hub, _, _, _, nc = rig

    replies: list[str] = []

    async def slow(msg):  # type: ignore[no-untyped-def]  # acknowledges at once, answers 0.6 s later
        replies.append(msg.reply)
        req = wire.infer_request_decoder.decode(msg.data)
        assert req.ack
        await msg.respond(wire.encode(wire.InferAccepted(request_id=req.request_id)))
        await asyncio.sleep(0.6)  # the behaviour: a slow answer, past the ack timeout
        if req.stream:
            await nc.publish(msg.reply, wire.encode(wire.InferChunk(request_id=req.request_id, index=0, text="x")))
        await nc.publish(msg.reply, wire.encode(wire.InferResult(request_id=req.request_id, site="slow", model="m",
                                                                  output="x")))

    async def mute(msg):  # type: ignore[no-untyped-def]  # the request is lost on the way (a partition)
        return None

    await nc.subscribe(wire.infer_subject("slow"), cb=slow)  # type: ignore[attr-defined]
    await nc.subscribe(wire.infer_subject("mute"), cb=mute)  # type: ignore[attr-defined]
    await barrier(nc)
    loop = asyncio.get_running_loop()
    req = wire.InferRequest(request_id="a1", model="m", prompt="hi", ack=True)
    t0 = loop.time()
    assert (await hub.bus.infer("slow", req, 5.0, ack_timeout_s=0.2)).output == "x"
    assert loop.time() - t0 >= 0.6  # waited past the ack timeout for the answer
    t0 = loop.time()
    with pytest.raises(SiteSilent, match="mute: no acknowledgement within 300 ms"):
        await hub.bus.infer("mute", req, 5.0, ack_timeout_s=0.3)
    assert loop.time() - t0 < 3.0  # not the 5 s timeout
    assert hub.bus.stats.ack_timeouts == 1 and hub.bus.stats.timeouts == 0

    stream = wire.InferRequest(request_id="a2", model="m", prompt="hi", ack=True, stream=True)
    subs = len(hub.bus.nc._subs)
    got = await _streamed(hub.bus, "slow", stream, 5.0, ack_timeout_s=0.2)
    assert [type(m).__name__ for m in got] == ["InferChunk", "InferResult"]  # the acknowledgement is not relayed
    with pytest.raises(SiteSilent, match="mute: no acknowledgement"):
        await _streamed(hub.bus, "mute", stream, 5.0, ack_timeout_s=0.3)
    assert hub.bus.stats.ack_timeouts == 2
    # Streams come back on the hub's one reply subscription: none opened per stream, none left behind.
    assert replies[-1].startswith(hub.bus._reply_prefix)
    assert len(hub.bus.nc._subs) == subs and not hub.bus._streams


async def test_a_request_in_flight_fails_over_when_its_site_is_declared_lost(tmp_path: Path, nats_server: NatsServer) -> None:
    cfg = hub_config(tmp_path, nats_server.url, heartbeat_s=0.2, miss_limit=2, sweep_s=0.05, site_timeout_s=20.0)
    async with running_hub(cfg) as hub:
        key = hub.create_tenant("acme", default_origin="hangzhou")
        hung = await nats.connect(nats_server.url)  # hz-edge, the nearest: takes requests, never answers
        got: list[bytes] = []

        async def swallow(msg):  # type: ignore[no-untyped-def]
            got.append(msg.data)

        await hung.subscribe(wire.infer_subject("hz-edge"), cb=swallow)
        await hung.request(wire.register_subject("hz-edge"), wire.encode(
            wire.Register(site="hz-edge", city="hangzhou", accelerators={"H20": 4})), timeout=2)
        beat = wire.Heartbeat(site="hz-edge", seq=1, models=[wire.ReplicaStatus(model="m", slots=8)])
        await hung.publish(wire.heartbeat_subject("hz-edge"), wire.encode(beat))
        nc, task = await raw_agent(nats_server.url, "sh-edge", "shanghai")
        await until(lambda: {"hz-edge", "sh-edge"} <= {v.id for v in hub.registry if "m" in v.replicas})
        async with aiohttp.ClientSession() as session:
            client = Client(session, f"http://127.0.0.1:{hub.http_port}", key)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            status, body, headers = await client.call("POST", "/v1/infer", {"model": "m", "input": "hi"})
            elapsed = loop.time() - t0
        assert got, "the request went to the nearest site first"
        sent = wire.infer_request_decoder.decode(got[0])  # acknowledged only if slow: 2 messages, not 3
        assert sent.ack and sent.ack_after_ms == cfg.site_ack_timeout_s * 1000 * ACK_AFTER_SHARE > 0
        assert status == 200 and body["site"] == "sh-edge" and headers["X-CPN-Route"] == "failover", body
        assert elapsed < 3.0  # failed over at loss detection (~0.4 s), not at the 20 s timeout
        assert not hub.bus._waiting
        task.cancel()
        await nc.close()  # type: ignore[attr-defined]
        await hung.close()


async def test_tenants_and_keys_survive_a_hub_restart(tmp_path: Path, nats_server: NatsServer) -> None:
    config = hub_config(tmp_path, nats_server.url)
    async with running_hub(config) as hub:
        key = hub.create_tenant("acme", default_origin="shanghai")
    async with running_hub(config) as hub:
        assert hub.tenancy.keys.lookup(key) is not None and hub.tenancy.tenant_default_origin("acme") == "shanghai"
        assert not (tmp_path / "hub.db").read_bytes().count(key.encode())


async def test_usage_is_batched_and_reported_per_model_and_site(rig) -> None:  # type: ignore[no-untyped-def]
    hub, tenant, admin, _, _ = rig
    for _ in range(3):
        assert (await tenant.call("POST", "/v1/infer", {"model": "m", "input": "count me"}))[0] == 200
    status, body, _ = await tenant.call("GET", "/v1/usage")
    assert status == 200 and body["totals"]["requests"] == 3
    assert body["models"]["m"]["by_site"]["hz-edge"]["completion_tokens"] == 6
    hub.accounting.flush()
    assert hub.db.execute("SELECT requests FROM usage WHERE tenant = 'acme'").fetchone()[0] == 3
    status, body, _ = await admin.call("GET", "/v1/usage?tenant=acme")
    assert status == 200 and body["totals"]["requests"] == 3


async def test_openapi_is_generated_from_the_decoded_schemas(rig) -> None:  # type: ignore[no-untyped-def]
    _, _, _, anon, _ = rig
    status, doc, _ = await anon.call("GET", "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.1")
    infer = doc["paths"]["/v1/infer"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    ref = infer["$ref"].rsplit("/", 1)[1]
    schema = doc["components"]["schemas"][ref]
    assert set(schema["required"]) == {"model", "input"} and schema["additionalProperties"] is False
    assert "/v1/chat/completions" in doc["paths"] and doc["paths"]["/healthz"]["get"]["security"] == []


async def test_a_stream_says_when_its_next_message_is_already_here(rig) -> None:  # type: ignore[no-untyped-def]
    # What lets the gateway write a chunk together with the next one (one system call, not two)
    # without ever holding a chunk for a message still to come.
    hub, _, _, _, nc = rig

    async def paced(msg):  # type: ignore[no-untyped-def]  # a chunk, then the result 0.3 s later
        req = wire.infer_request_decoder.decode(msg.data)
        await nc.publish(msg.reply, wire.encode(wire.InferChunk(request_id=req.request_id, index=0, text="x")))
        await nc.flush()
        await asyncio.sleep(0.3)
        await nc.publish(msg.reply, wire.encode(wire.InferResult(request_id=req.request_id, site="paced", model="m",
                                                                  output="x")))

    await nc.subscribe(wire.infer_subject("paced"), cb=paced)  # type: ignore[attr-defined]
    await barrier(nc)
    req = wire.InferRequest(request_id="s1", model="m", prompt="hi", stream=True)
    first, it = await hub.bus.infer_stream("paced", req, 5.0)
    assert isinstance(first, wire.InferChunk) and it is not None
    assert not hub.bus.stream_ready("s1")  # the result is 0.3 s away: write the chunk now
    await until(lambda: hub.bus.stream_ready("s1"))  # it came: taking it will not wait
    assert isinstance(await it.__anext__(), wire.InferResult)
    with pytest.raises(StopAsyncIteration):
        await it.__anext__()
    assert not hub.bus.stream_ready("s1") and not hub.bus._stream_of


async def test_a_streamed_answer_whose_text_rides_in_the_result_is_relayed_whole(rig) -> None:  # type: ignore[no-untyped-def]
    # The gateway asks for tails (InferRequest.tail_ok): a site whose answer came at once sends one
    # message, the result, with the text as its tail; the client still gets it as a delta. Every
    # frame is then known, so it goes as one answer with a length (no chunked stream), accounted
    # once, and nothing of the site's stream is left open at the hub.
    hub, tenant, _, _, _ = rig
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}],
            "stream_options": {"include_usage": True}}
    async with tenant.session.post(f"{tenant.base}/v1/chat/completions", json=body, headers=tenant.headers()) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["X-CPN-Site"] == "hz-edge" and resp.headers["Cache-Control"] == "no-cache"
        assert "chunked" not in resp.headers.get("Transfer-Encoding", "")
        raw = (await resp.read()).decode()
        assert int(resp.headers["Content-Length"]) == len(raw.encode())
    frames = [line[6:] for line in raw.split("\n") if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    chunks = [msgspec.json.decode(f) for f in frames[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "hz-edge:" and chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2
    assert not hub.bus._streams and not hub.bus._stream_of
    status, usage, _ = await tenant.call("GET", "/v1/usage")
    assert status == 200 and usage["totals"]["requests"] == 1
    # The official client reads such an answer as any stream.
    client = openai.AsyncOpenAI(base_url=f"{tenant.base}/v1", api_key=tenant.key, max_retries=0)
    try:
        stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "y"}],
                                                      stream=True, stream_options={"include_usage": True})
        pieces, usage_seen = [], None
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            if chunk.usage is not None:
                usage_seen = chunk.usage
        assert "".join(pieces) == "hz-edge:" and usage_seen is not None and usage_seen.completion_tokens == 2
    finally:
        await client.close()


async def test_a_streams_first_chunk_reaches_the_client_before_the_site_sends_its_next(  # type: ignore[no-untyped-def]
        rig, nats_server: NatsServer) -> None:
    # A site that sends its second chunk only once the client has read the first: a gateway that
    # held a chunk until the next message (or the end) came would never finish this stream.
    hub, tenant, _, _, _ = rig
    seen = asyncio.Event()
    site = await nats.connect(nats_server.url)

    async def held(msg):  # type: ignore[no-untyped-def]
        req = wire.infer_request_decoder.decode(msg.data)
        await site.publish(msg.reply, wire.encode(wire.InferChunk(request_id=req.request_id, index=0, text="first")))
        await seen.wait()
        await site.publish(msg.reply, wire.encode(wire.InferChunk(request_id=req.request_id, index=1, text=" second")))
        await site.publish(msg.reply, wire.encode(wire.InferResult(request_id=req.request_id, site="sh-edge",
                                                                    model=req.model, output="first second",
                                                                    completion_tokens=2)))

    try:
        await site.subscribe(wire.infer_subject("sh-edge"), cb=held)
        await _sh_edge_serving(site, hub, "held")
        body = {"model": "held", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        texts: list[str] = []
        async with tenant.session.post(f"{tenant.base}/v1/chat/completions", json=body,
                                       headers=tenant.headers()) as resp:
            assert resp.status == 200
            while True:
                line = (await asyncio.wait_for(resp.content.readline(), 5)).decode().strip()
                if not line:
                    if resp.content.at_eof():
                        break
                    continue
                assert line.startswith("data: ")
                if line == "data: [DONE]":
                    continue
                chunk = msgspec.json.decode(line[6:])
                content = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
                if content:
                    texts.append(content)
                    seen.set()  # the site may go on now
        assert texts == ["first", " second"]
    finally:
        await site.close()


async def test_a_hub_that_stood_still_does_not_blame_its_sites(tmp_path: Path, nats_server: NatsServer) -> None:
    """A process that stood still (a write waiting for the replicated record's quorum while its
    stream elects a leader: seconds) was not listening: its silence must not be read as the sites'.
    On the injected clock: ten seconds pass in one step, far past the 3 s detection period."""
    from tests.support.manualclock import ManualClock

    clock = ManualClock()
    async with running_hub(hub_config(tmp_path, nats_server.url), clock=clock) as hub:
        nc, task = await raw_agent(nats_server.url, "hz-edge", "hangzhou")
        try:
            await until(lambda: (v := hub.registry.get("hz-edge")) is not None and v.state == "up", 5, "hz-edge up")
            clock.advance(10.0)  # the loop wakes once, 10 s late: a stall, not a silent site
            await until(lambda: clock.sleepers > 0 and clock.mono >= 10.0, 5, "the sweep ran after the stall")
            for _ in range(3):  # and the sweeps after it, with the site heartbeating again
                clock.advance(0.25)
                await asyncio.sleep(0.05)
            assert hub.registry.get("hz-edge").state == "up"  # type: ignore[union-attr]
            assert hub.metrics.site_losses._value.get() == 0  # type: ignore[attr-defined]
            # A site that really stays silent is still lost after the detection period.
            task.cancel()
            for _ in range(20):
                clock.advance(0.25)
                await asyncio.sleep(0.02)
            await until(lambda: hub.registry.get("hz-edge").state == "lost", 5, "hz-edge lost")  # type: ignore[union-attr]
        finally:
            task.cancel()
            await nc.close()  # type: ignore[attr-defined]


async def test_a_stream_costs_the_hub_one_timer_not_one_per_message_and_still_times_out(rig) -> None:  # type: ignore[no-untyped-def]
    # The waits of one stream share one timer (armed once, re-armed only when a wait is due earlier
    # than it or is still waiting when it fires): six messages, one timer. A stream that goes quiet
    # still ends at its idle timeout, counted from its last message.
    hub, _, _, _, nc = rig
    loop = asyncio.get_running_loop()

    async def drip(msg):  # type: ignore[no-untyped-def]  # five chunks 30 ms apart, then the result
        req = wire.infer_request_decoder.decode(msg.data)
        for i in range(5):
            await nc.publish(msg.reply, wire.encode(wire.InferChunk(request_id=req.request_id, index=i, text="x")))
            await nc.flush()
            await asyncio.sleep(0.03)
        await nc.publish(msg.reply, wire.encode(wire.InferResult(request_id=req.request_id, site="drip", model="m",
                                                                  output="xxxxx")))

    async def stall(msg):  # type: ignore[no-untyped-def]  # one chunk, then nothing
        req = wire.infer_request_decoder.decode(msg.data)
        await nc.publish(msg.reply, wire.encode(wire.InferChunk(request_id=req.request_id, index=0, text="x")))

    await nc.subscribe(wire.infer_subject("drip"), cb=drip)  # type: ignore[attr-defined]
    await nc.subscribe(wire.infer_subject("stall"), cb=stall)  # type: ignore[attr-defined]
    await barrier(nc)
    with timers_armed(module="controlplane.nats.bus") as armed:
        got = await _streamed(hub.bus, "drip", wire.InferRequest(
            request_id="d1", model="m", prompt="hi", stream=True), 5.0)
        assert [type(m).__name__ for m in got] == ["InferChunk"] * 5 + ["InferResult"]
        # The first message is waited for as a plain answer is (the bus's one timer for every
        # request), the rest on the stream's own: at most two, where the old code armed one per
        # message waited for.
        assert 1 <= len(armed) <= 2, armed
        # The first message is due within 0.2 s, the next ones within 0.5 s of the wait's start:
        # the timer fires at 0.2 s while the second wait has time left, re-arms, then ends it.
        first, it = await hub.bus.infer_stream("stall", wire.InferRequest(
            request_id="d2", model="m", prompt="hi", stream=True), 0.2, idle_timeout_s=0.5)
        assert isinstance(first, wire.InferChunk) and it is not None
        started = loop.time()
        with pytest.raises(SiteUnreachable, match="no chunk within 500 ms"):
            await it.__anext__()
        assert 0.45 <= loop.time() - started < 3.0
    assert not hub.bus._streams


async def test_the_hub_bus_keeps_its_loop_for_requests_and_streams(rig, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # ``asyncio.get_running_loop()`` costs a getpid system call on Python 3.11: the bus keeps its loop.
    import sys

    hub, _, _, _, nc = rig

    async def answer(msg):  # type: ignore[no-untyped-def]
        req = wire.infer_request_decoder.decode(msg.data)
        await msg.respond(wire.encode(wire.InferResult(request_id=req.request_id, site="quick", model="m", output="x")))

    await nc.subscribe(wire.infer_subject("quick"), cb=answer)  # type: ignore[attr-defined]
    await barrier(nc)
    lookups: list[str] = []
    real = asyncio.get_running_loop

    def counting() -> asyncio.AbstractEventLoop:
        if sys._getframe(1).f_globals.get("__name__") == "controlplane.nats.bus":
            lookups.append("bus")
        return real()

    req = wire.InferRequest(request_id="q0", model="m", prompt="hi")
    assert (await hub.bus.infer("quick", req, 5.0)).output == "x"
    monkeypatch.setattr(asyncio, "get_running_loop", counting)
    for i in range(3):
        assert (await hub.bus.infer("quick", wire.InferRequest(request_id=f"q{i + 1}", model="m", prompt="hi"),
                                    5.0)).output == "x"
        got = await _streamed(hub.bus, "quick", wire.InferRequest(
            request_id=f"s{i}", model="m", prompt="hi", stream=True), 5.0)
        assert [type(m).__name__ for m in got] == ["InferResult"]
    monkeypatch.setattr(asyncio, "get_running_loop", real)
    assert lookups == []


async def test_a_stream_answered_whole_is_waited_for_as_a_plain_answer(rig, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # A site whose first message is its result: the hub waits for it exactly as for a plain answer
    # (the shared waiters), with no stream of its own (no queue, no timer); only a stream whose
    # first message is a chunk gets one, and it is gone once read to its end or closed unread.
    from controlplane.nats import bus as bus_mod

    hub, _, _, _, nc = rig
    made: list[object] = []

    class Counted(bus_mod._Stream):  # type: ignore[name-defined,misc]
        __slots__ = ()

        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(bus_mod, "_Stream", Counted)

    async def whole(msg):  # type: ignore[no-untyped-def]
        req = wire.infer_request_decoder.decode(msg.data)
        await nc.publish(msg.reply, wire.encode(wire.InferResult(request_id=req.request_id, site="whole", model="m",
                                                                  output="abc", tail="abc")))

    async def pieces(msg):  # type: ignore[no-untyped-def]
        req = wire.infer_request_decoder.decode(msg.data)
        await nc.publish(msg.reply, wire.encode(wire.InferChunk(request_id=req.request_id, index=0, text="a")))
        await nc.publish(msg.reply, wire.encode(wire.InferResult(request_id=req.request_id, site="pieces", model="m",
                                                                  output="ab", tail="b")))

    await nc.subscribe(wire.infer_subject("whole"), cb=whole)  # type: ignore[attr-defined]
    await nc.subscribe(wire.infer_subject("pieces"), cb=pieces)  # type: ignore[attr-defined]
    await barrier(nc)
    first, rest = await hub.bus.infer_stream("whole", wire.InferRequest(request_id="w1", model="m", stream=True), 5.0)
    assert isinstance(first, wire.InferResult) and first.tail == "abc" and rest is None
    assert made == [] and not hub.bus._streams and not hub.bus._waiting

    got = await _streamed(hub.bus, "pieces", wire.InferRequest(request_id="p1", model="m", stream=True), 5.0)
    assert [type(m).__name__ for m in got] == ["InferChunk", "InferResult"] and len(made) == 1
    assert not hub.bus._streams and not hub.bus._stream_of and not hub.bus._waiting

    first, rest = await hub.bus.infer_stream("pieces", wire.InferRequest(request_id="p2", model="m", stream=True), 5.0)
    assert isinstance(first, wire.InferChunk) and rest is not None and hub.bus._streams
    await rest.aclose()  # type: ignore[attr-defined]  # given up before reading on (a client gone)
    assert not hub.bus._streams and not hub.bus._stream_of
    with pytest.raises(StopAsyncIteration):
        await rest.__anext__()


async def test_a_stream_answered_whole_gives_the_tenant_the_bytes_of_the_same_answer_in_pieces(  # type: ignore[no-untyped-def]
        rig, nats_server: NatsServer) -> None:
    # The same answer, once as the site's result alone (its text as the tail: the plain answer's
    # way through the hub) and once as a chunk then the result (the relay's way): the tenant reads
    # the same SSE bytes and the same headers, but for the request's own id and time, and for how
    # the body is framed (a length, or chunks).
    import re

    hub, tenant, _, _, _ = rig
    site = await nats.connect(nats_server.url)

    async def twin(msg):  # type: ignore[no-untyped-def]
        req = wire.infer_request_decoder.decode(msg.data)
        whole = "whole" in req.messages[0].content
        text = "alpha beta"
        if not whole:
            await site.publish(msg.reply, wire.encode(wire.InferChunk(request_id=req.request_id, index=0, text=text)))
        await site.publish(msg.reply, wire.encode(wire.InferResult(
            request_id=req.request_id, site="sh-edge", model=req.model, output=text, prompt_tokens=3,
            completion_tokens=2, finish_reason="length", tail=text if whole else "")))

    try:
        await site.subscribe(wire.infer_subject("sh-edge"), cb=twin)
        await _sh_edge_serving(site, hub, "twin")

        async def ask(how: str) -> tuple[dict[str, str], bytes]:
            body = {"model": "twin", "stream": True, "messages": [{"role": "user", "content": how}],
                    "stream_options": {"include_usage": True}}
            async with tenant.session.post(f"{tenant.base}/v1/chat/completions", json=body,
                                           headers=tenant.headers()) as resp:
                assert resp.status == 200
                raw = await resp.read()
                headers = dict(resp.headers)
            ids = set(re.findall(rb'"id":"([^"]+)"', raw))
            created = set(re.findall(rb'"created":(\d+)', raw))
            assert len(ids) == 1 and len(created) == 1, raw
            raw = raw.replace(ids.pop(), b"ID").replace(b'"created":' + created.pop(), b'"created":0')
            for name in ("Date", "X-Request-ID", "Content-Length", "Transfer-Encoding",
                         "X-CPN-Overhead-Ms", "X-CPN-Promise-Ms"):  # the request's own, or measured
                assert name in headers or name in ("Content-Length", "Transfer-Encoding"), name
                headers.pop(name, None)
            return headers, raw

        whole_headers, whole = await ask("whole")
        pieces_headers, pieces = await ask("pieces")
        assert whole == pieces and b"alpha beta" in whole and b'"finish_reason":"length"' in whole
        assert whole_headers == pieces_headers and whole_headers["Content-Type"].startswith("text/event-stream")
        assert not hub.bus._streams and not hub.bus._stream_of
    finally:
        await site.close()


async def test_a_stream_given_up_before_its_rest_is_read_tells_the_site_to_stop(  # type: ignore[no-untyped-def]
        rig, nats_server: NatsServer) -> None:
    # A stream whose first chunk came but whose rest was never read (the response head could not be
    # written): closing it frees the hub's queue for it and tells the site to stop, as a stream
    # given up midway does.
    from controlplane.services.inference import aclose

    hub, _, _, _, _ = rig
    site = await nats.connect(nats_server.url)
    cancelled: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def one_chunk(msg):  # type: ignore[no-untyped-def]
        req = wire.infer_request_decoder.decode(msg.data)
        await site.publish(msg.reply, wire.encode(wire.InferChunk(request_id=req.request_id, index=0, text="a")))

    async def command(msg):  # type: ignore[no-untyped-def]
        cmd = msgspec.json.decode(msg.data)
        if cmd.get("type") == "cancel_infer" and not cancelled.done():
            cancelled.set_result(cmd["request_id"])

    try:
        await site.subscribe(wire.infer_subject("sh-edge"), cb=one_chunk)
        await site.subscribe(wire.cmd_subject("sh-edge"), cb=command)
        await _sh_edge_serving(site, hub, "once")
        served, messages = await hub.inference.stream(
            wire.InferRequest(request_id="g1", model="once", prompt="x", stream=True),
            origin="shanghai", budget_ms=1000.0, policy="nearest")
        assert served.site == "sh-edge" and served.result is None and hub.bus._streams
        await aclose(messages)
        assert await asyncio.wait_for(cancelled, 5) == "g1"
        assert not hub.bus._streams and not hub.bus._stream_of
    finally:
        await site.close()
