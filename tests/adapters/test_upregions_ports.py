"""``cpn up --regions`` and ``cpn bench regions`` pick the nats-servers' ports before starting them
(a cluster's configs name each other's ports): a port picked free can be taken by another process
before its server binds it ("address already in use"). They start again on new ports (issue 14)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from controlplane.nats.natsserver import NatsServer, NatsServerError
from controlplane.tools import upregions
from controlplane.tools.up import UpOptions
from tests.support.hubrig import DEMO3


def test_the_advertised_refusing_address_refuses_and_cannot_be_taken_while_held() -> None:
    port = upregions.RefusingPort()
    host, num = port.address.rsplit(":", 1)
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, int(num)), timeout=2).close()
        with socket.socket() as other, pytest.raises(OSError):
            other.bind((host, int(num)))  # a port merely picked free could be taken (and then answer)
    finally:
        port.close()


async def test_a_server_whose_port_was_taken_says_so(tmp_path: Path) -> None:
    with socket.socket() as taker:
        taker.bind(("127.0.0.1", 0))
        taker.listen()
        server = NatsServer(tmp_path / "n", port=taker.getsockname()[1], host="127.0.0.1", jetstream=False)
        with pytest.raises(NatsServerError):
            await server.start(timeout_s=10)
        assert upregions.port_taken([server])
    ok = NatsServer(tmp_path / "m", port=0, host="127.0.0.1", jetstream=False)
    await ok.start(timeout_s=10)
    try:
        assert not upregions.port_taken([ok])
    finally:
        await ok.stop()


@pytest.mark.timeout(120)
async def test_regions_start_again_on_new_ports_when_one_picked_free_is_taken(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first plan's client port of the home region's first node is taken (by a listening socket,
    as another process would) before its server starts: the network comes up on the second plan."""
    plans_made: list[list[upregions.RegionPlan]] = []
    taker = socket.socket()
    real = upregions.plan_regions

    def plan_and_take(*args: object, **kw: object) -> list[upregions.RegionPlan]:
        plans = real(*args, **kw)  # type: ignore[arg-type]
        if not plans_made:
            taker.bind(("127.0.0.1", plans[0].nodes[0].client_port))
            taker.listen()
        plans_made.append(plans)
        return plans

    monkeypatch.setattr(upregions, "plan_regions", plan_and_take)
    net = upregions.RegionalNetwork(UpOptions(data_dir=tmp_path / "cpn", port=0, layout=str(DEMO3), regions=1,
                                              agents=False, ready_timeout_s=30.0))
    try:
        await net.start()
        assert len(plans_made) == 2
        taken = plans_made[0][0].nodes[0].client_port
        assert all(s.running for s in net.regions[0].servers)
        assert taken not in [n.client_port for n in net.regions[0].plan.nodes]
    finally:
        await net.stop()
        taker.close()
