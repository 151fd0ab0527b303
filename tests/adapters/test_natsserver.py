from __future__ import annotations

import nats

from controlplane.nats.natsserver import NatsServer, default_gomaxprocs
from tests.support.cpnup import environ_of


async def test_server_starts_on_port_zero_and_serves_requests(nats_server: NatsServer) -> None:
    assert nats_server.port > 0
    nc = await nats.connect(nats_server.url)
    try:
        async def echo(msg):  # type: ignore[no-untyped-def]
            await msg.respond(msg.data.upper())

        await nc.subscribe("t.echo", cb=echo)
        reply = await nc.request("t.echo", b"ping", timeout=2)
        assert reply.data == b"PING"
    finally:
        await nc.close()


async def test_restart_keeps_port(nats_server: NatsServer) -> None:
    port = nats_server.port
    await nats_server.restart(kill=True)
    assert nats_server.port == port and nats_server.running


async def test_gomaxprocs_is_given_to_the_server_unless_the_operator_set_it(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # cpn up's server gets GOMAXPROCS=1 on a small host (2 CPUs or fewer), Go's default on a larger
    # one; an operator's own GOMAXPROCS is passed on untouched.
    assert default_gomaxprocs(1) == 1 and default_gomaxprocs(2) == 1 and default_gomaxprocs(3) is None
    assert default_gomaxprocs() in (1, None)
    monkeypatch.delenv("GOMAXPROCS", raising=False)
    async with NatsServer(tmp_path / "a", gomaxprocs=1) as one, NatsServer(tmp_path / "b") as default:
        assert one.proc is not None and default.proc is not None
        assert environ_of(one.proc.pid).get("GOMAXPROCS") == "1"
        assert "GOMAXPROCS" not in environ_of(default.proc.pid)
        nc = await nats.connect(one.url)  # and it serves
        try:
            await nc.flush(timeout=2)
        finally:
            await nc.close()
    monkeypatch.setenv("GOMAXPROCS", "3")
    async with NatsServer(tmp_path / "c", gomaxprocs=1) as chosen:
        assert chosen.proc is not None and environ_of(chosen.proc.pid).get("GOMAXPROCS") == "3"
