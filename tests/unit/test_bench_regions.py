"""`cpn bench regions` measures in-region figures only over origins that have an in-region site
within the budget on the full path through their region's gateway."""

from __future__ import annotations

from bench import regions
from topology import latency, loader


def test_origins_whose_leg_to_their_gateway_exceeds_the_budget_are_measured_apart() -> None:
    layout = loader.load_default()
    index = latency.RttIndex.build(layout)
    inside, outside = regions.choose_origins(layout, index, "wuhan", "central", ("wh-edge", "hb-regional"), 3)
    # The region's heaviest origins reach Wuhan's gateway along the Beijing-Wuhan-Guangzhou trunk
    # (Zhengzhou ~8.2 ms, Changsha ~5.5 ms; ~31 and ~22 ms before the layout had those links);
    # Nanyang and Luoyang do not make it within 10 ms, and were mixed into the in-region p99 before.
    assert [o.id for o in inside] == ["zhengzhou", "wuhan", "changsha"]
    assert {"nanyang", "luoyang"} <= {o.id for o in outside}
    assert all(o.path_ms <= regions.BUDGET_MS for o in inside)
    assert all(o.path_ms > regions.BUDGET_MS for o in outside)
    # Without an in-region site in the run, no origin is in budget.
    inside, _ = regions.choose_origins(layout, index, "wuhan", "central", ("bj-edge",), 3)
    assert inside == []


def test_a_requests_parts_are_what_its_stamps_leave_beyond_the_layouts_delays_and_the_service_time() -> None:
    # client sends at 0, the gateway's handler takes it at 3 ms, the agent at 6 to 6.5 ms, the
    # handler ends at 9.5 ms, the client reads it at 12.5 ms; 2 ms each way on the tenant's leg and
    # on the relay; 0.3 ms of service
    parts = regions.parts_of(0.0, 0.0125, (0.003, 0.0095), (0.006, 0.0065), 0.3, 2.0, 2.0)
    assert set(parts) == set(regions.PARTS)
    assert {k: round(v, 6) for k, v in parts.items()} == {
        "tenant_in": 1.0, "to_agent": 1.0, "agent": 0.2, "from_agent": 1.0, "tenant_out": 1.0}
    assert round(sum(parts.values()), 6) == round(12.5 - 0.3 - 4 * 2.0, 6)  # the whole, less what is subtracted


async def test_the_tenants_floor_is_the_benchs_own_client_through_a_proxy_to_a_server_that_answers_at_once() -> None:
    """What the bench subtracts for the tenant's leg is measured, not assumed: the same client
    process, through proxies of the same child (delayed 1 ms each way and not), to a server that
    answers at once with a gateway-shaped answer (the client parses it as it parses the gateway's),
    and directly (``--wan none``). Real processes: the client, the proxies' child, the server."""
    import asyncio

    from bench import regions_client
    from bench.regions_floor import ANSWER, FloorServer
    from controlplane.tools.proxyhost import ProxyHost

    floor, host, client = FloorServer(), ProxyHost(), regions_client.Client()
    await floor.start()
    await host.start()
    await client.start()
    try:
        # Framing: two requests in one write (one with a body) get two answers, in order.
        reader, writer = await asyncio.open_connection("127.0.0.1", floor.port)
        writer.write(b"POST /v1/infer HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}GET / HTTP/1.1\r\n\r\n")
        assert await reader.readexactly(2 * len(ANSWER)) == ANSWER + ANSWER
        writer.close()
        await writer.wait_closed()
        got = await regions.tenant_floor(client, host, floor.port, direct=False, requests=4)
        assert sorted(got) == ["delayed", "undelayed"] and all(len(v) == 4 for v in got.values()), got
        got = await regions.tenant_floor(client, host, floor.port, direct=True, requests=4)
        assert sorted(got) == ["direct"] and len(got["direct"]) == 4, got
    finally:
        await client.close()
        await host.close()
        await floor.close()
