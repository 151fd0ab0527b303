"""A frozen NATS node (SIGSTOP: its sockets stay open, nothing is answered) costs inference nothing.

Real parts: a 3-node nats-server cluster on loopback, a real hub (its bus connected to one node
only), two real agents serving ``qwen``: hz-edge (the tenant's nearest) and sh-edge. Two tenants'
clients send chat requests all along, and one node is paused for 4 s:

- ``agent``: the node under hz-edge (sh-edge on another). The hub's requests to hz-edge go
  unacknowledged; each fails over to sh-edge within the acknowledgement timeout; hz-edge's
  connection is found stale by its pings and moves to another node within 1.9 s (before: pings
  every 1 s, 2 outstanding, so 2-3 s, plus a connect timeout whenever the reconnect picked the
  frozen node again: 3.1 s measured).
- ``both_agents``: the node under both sites. Before, requests failed (502) once both sites had
  not acknowledged; now a request left with only silent sites waits (within the site timeout) for
  one to be heard from again on its new node, and goes there.
- ``both_agents_killed``: that node SIGKILLed instead (restarted 4 s later). Before, the hub's
  requests got "no responders" from both sites at once while their agents reconnected elsewhere
  and failed in milliseconds (502); now a site without responders is passed over as a silent one
  is, and a request left with none waits for one to be back.
- ``hub``: the node under the hub's own connections. Before, every request at that gateway waited
  out the acknowledgement timeout at each site, called both sites silent and failed (502), and the
  next ones failed at once (503, every site silent) until heartbeats came back. Now a request whose
  connection does not answer a PING goes again on the next connection, which the hub has within 1.9 s.

Every case: every request is answered 200 (0 errors), none takes longer than 4 s.

And a gateway whose only NATS server is gone answers 503 ``nats_unavailable`` within about 2 s,
calling no site silent (before: 502 once every site's acknowledgement had timed out).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controlplane.hub import Hub
from controlplane.nats.natsserver import NatsServer
from edge_agent.agent import Agent
from edge_agent.config import AgentConfig, BackendConfig, BusConfig, ModelConfig, SimBackendConfig
from tests.support.hubrig import Client, hub_config, running_hub
from tests.support.natscluster import NatsCluster, Node
from tests.support.waiting import until

CHAT = {"model": "qwen", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
CARDS = {"hz-edge": {"910B": 4}, "sh-edge": {"H20": 4}}
CITY = {"hz-edge": "hangzhou", "sh-edge": "shanghai"}


def agent(site: str, url: str, jitter_s: float) -> Agent:
    return Agent(AgentConfig(
        site=site, nats=url, city=CITY[site], tier="edge", accelerators=CARDS[site], heartbeat_s=0.5,
        bus=BusConfig(reconnect_jitter_s=jitter_s),
        models=[ModelConfig(name="qwen", cards=1.0, slots=8)],
        backend=BackendConfig(sim=SimBackendConfig(ttft_ms=5, per_token_ms=1, slots=8)),
    ))


PLACES = {
    "agent": ({"hub": "n1", "hz-edge": "n2", "sh-edge": "n3"}, "n2"),
    "hub": ({"hub": "n1", "hz-edge": "n2", "sh-edge": "n3"}, "n1"),
    "both_agents": ({"hub": "n1", "hz-edge": "n2", "sh-edge": "n2"}, "n2"),
    "both_agents_killed": ({"hub": "n1", "hz-edge": "n2", "sh-edge": "n2"}, "n2"),
}
"""Case -> (the node each part connects to, the node paused; ``_killed``: SIGKILLed, restarted after)."""


@contextlib.asynccontextmanager
async def rig(tmp_path: Path, place: dict[str, str], jitter_s: float) -> AsyncIterator[tuple[NatsCluster, Hub, list[Agent], Client]]:
    async with NatsCluster(tmp_path / "nats") as cluster:
        url = {n.name: n.url for n in cluster.nodes}
        config = hub_config(tmp_path, url[place["hub"]], heartbeat_s=1.0, miss_limit=3, site_timeout_s=5.0,
                            site_ack_timeout_s=1.0)
        async with running_hub(config) as hub:
            key = hub.create_tenant("acme", default_origin="hangzhou")
            agents = [agent(site, url[place[site]], jitter_s) for site in ("hz-edge", "sh-edge")]
            try:
                await asyncio.gather(*(a.start() for a in agents))
                await until(lambda: all((v := hub.registry.get(s)) is not None and v.slots_free("qwen") > 0
                                        for s in CARDS), 15, "both sites ready")
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
                    yield cluster, hub, agents, Client(session, f"http://127.0.0.1:{hub.http_port}", key)
            finally:
                await asyncio.gather(*(a.stop() for a in agents), return_exceptions=True)


async def _load(tenant: Client, stop: asyncio.Event, answers: list[tuple[int, float, str, Any]]) -> None:
    while not stop.is_set():
        began = time.monotonic()
        try:
            status, body, headers = await tenant.call("POST", "/v1/chat/completions", CHAT)
        except (aiohttp.ClientError, TimeoutError) as exc:
            status, body, headers = 0, repr(exc), {}
        answers.append((status, time.monotonic() - began, headers.get("X-CPN-Site", ""), body if status != 200 else ""))
        await asyncio.sleep(0.02)


@pytest.mark.serial
@pytest.mark.timeout(120)
@pytest.mark.parametrize("frozen", sorted(PLACES))
async def test_inference_goes_on_with_no_error_through_a_paused_nats_node(tmp_path: Path, frozen: str) -> None:
    place, paused = PLACES[frozen]
    # A pause: no reconnect jitter, so that the move's time is the pings' alone (production adds up
    # to 0.5 s). A kill: the production jitter, a window in which neither site has responders.
    jitter_s = 0.5 if frozen.endswith("_killed") else 0.0
    async with rig(tmp_path, place, jitter_s) as (cluster, hub, agents, tenant):
        await _through_a_pause(cluster, hub, agents, tenant, cluster.node(paused), frozen, jitter_s)


async def _through_a_pause(cluster: NatsCluster, hub: Hub, agents: list[Agent], tenant: Client, node: Node,
                           frozen: str, jitter_s: float) -> None:
    hz = agents[0]
    frozen_addr = node.url.split("://", 1)[1]
    assert (hub.bus.server if frozen == "hub" else hz.bus.server) == frozen_addr

    answers: list[tuple[int, float, str, Any]] = []
    stop = asyncio.Event()
    workers = [asyncio.create_task(_load(tenant, stop, answers)) for _ in range(2)]
    try:
        await asyncio.sleep(1.0)
        before = len(answers)
        if frozen.endswith("_killed"):
            await cluster.kill(node.name)
        else:
            await cluster.pause(node.name)
        paused_at = time.monotonic()
        moved_s = None
        while time.monotonic() - paused_at < 4.0:
            server = hub.bus.server if frozen == "hub" else hz.bus.server
            if moved_s is None and server and server != frozen_addr:
                moved_s = time.monotonic() - paused_at
            await asyncio.sleep(0.05)
        during = len(answers) - before
        if frozen.endswith("_killed"):
            await cluster.restart(node.name)
        else:
            await cluster.resume(node.name)
        await asyncio.sleep(2.0)
    finally:
        stop.set()
        await asyncio.gather(*workers)
        if cluster.node(node.name).paused:
            await cluster.resume(node.name)

    errors = [a for a in answers if a[0] != 200]
    assert not errors, errors
    assert during >= 4, answers  # requests were served while the node was frozen, not only after
    slowest = max(a[1] for a in answers)
    assert slowest < 4.0, sorted(answers, key=lambda a: -a[1])[:5]  # within the site timeout (5 s)
    assert moved_s is not None and moved_s < 1.9 + jitter_s, moved_s  # pings: 1.5 s at most, and the reconnect
    print(f"{frozen}: {len(answers)} requests, {during} during the pause, slowest {slowest:.2f} s, "
          f"moved after {moved_s:.2f} s, resent {hub.bus.stats.resent}, waited {hub.inference.waited_for_silent}")
    if frozen == "hub":
        assert hub.bus.stats.resent >= 1, hub.bus.stats
        _, metrics, _ = await tenant.call("GET", "/metrics")
        assert f'cpn_nats_errors_total{{kind="resent"}} {float(hub.bus.stats.resent)}' in metrics
    if frozen == "both_agents":
        assert hub.inference.waited_for_silent >= 1, hub.inference


@pytest.mark.timeout(60)
async def test_a_gateway_without_nats_answers_503_nats_unavailable_without_blaming_the_sites(
        tmp_path: Path, nats_server: NatsServer) -> None:
    """Its only NATS server gone, the gateway refuses at once with 503 ``nats_unavailable`` (a
    client may try another gateway) once a reconnect has not come within 2 s. Before: the request
    sat in nats-py's buffer while each site's acknowledgement timed out, every site was called
    silent, and the answer was 502 after a second per site."""
    config = hub_config(tmp_path, nats_server.url, site_timeout_s=5.0, site_ack_timeout_s=1.0)
    async with running_hub(config) as hub:
        key = hub.create_tenant("acme", default_origin="hangzhou")
        sites = [agent(site, nats_server.url, 0.0) for site in ("hz-edge", "sh-edge")]
        try:
            await asyncio.gather(*(a.start() for a in sites))
            await until(lambda: all((v := hub.registry.get(s)) is not None and v.slots_free("qwen") > 0
                                    for s in CARDS), 15, "both sites ready")
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
                tenant = Client(session, f"http://127.0.0.1:{hub.http_port}", key)
                assert (await tenant.call("POST", "/v1/chat/completions", CHAT))[0] == 200
                await nats_server.kill()
                await until(lambda: not hub.bus.connected, 5, "the hub notices")
                began = time.monotonic()
                status, body, headers = await tenant.call("POST", "/v1/chat/completions", CHAT)
                took_s = time.monotonic() - began
                assert status == 503 and body["error"]["code"] == "nats_unavailable", body
                assert headers.get("Retry-After") == "1"
                assert 1.5 <= took_s < 4.0, took_s  # the 2 s wait for a reconnect (and a loaded machine)
                assert not any(v.silent for v in hub.registry.views.values())  # no site was blamed
        finally:
            await asyncio.gather(*(a.stop() for a in sites), return_exceptions=True)
