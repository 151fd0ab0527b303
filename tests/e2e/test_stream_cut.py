"""A streamed answer whose serving site's NATS node dies mid-answer (issue: no single hub).

Real parts: a 3-node nats-server cluster on loopback, a hub whose NATS connection is on one node,
a real agent (sim backend, a token every 50 ms) on another, a tenant's streaming chat completion
over real HTTP (SSE). Mid-answer the agent's node is SIGKILLed: its chunks can no longer be sent
and some are lost on the way.

What this proves (before, the tenant's stream hung until the hub's idle timeout, 30 s, then
ended; the agent only logged ``infer_stream_broken``):

- the agent, connected again through another node, tells the hub the stream broke, and the
  gateway ends the tenant's stream at once with an SSE error event (``upstream_failed``), within
  a few seconds of the kill, never a truncated answer that looks whole;
- a site that stays silent (its agent frozen) is ended the same way when the hub declares it lost
  (its detection period, 3 s here), not at the idle timeout.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from controlplane.hub import Hub
from edge_agent.agent import Agent
from tests.support.fakehub import agent_config, running
from tests.support.hubrig import hub_config, running_hub
from tests.support.natscluster import NatsCluster
from tests.support.waiting import until

pytestmark = pytest.mark.serial  # a 3-node cluster and a node killed

CHAT = {"model": "qwen", "stream": True, "max_tokens": 200, "messages": [{"role": "user", "content": "a long answer"}]}


async def read_sse(resp: aiohttp.ClientResponse, events: list[dict[str, object]], seen: asyncio.Event) -> None:
    """Collect the stream's data events as they come (``seen`` is set at the first)."""
    async for line in resp.content:
        text = line.decode().strip()
        if not text.startswith("data:") or text == "data: [DONE]":
            continue
        events.append(json.loads(text[5:]))
        seen.set()


@asynccontextmanager
async def streaming(tmp_path: Path, hub_url: str, agent_url: str) -> AsyncIterator[
        tuple[Hub, Agent, list[dict[str, object]], asyncio.Task[None]]]:
    """A hub on ``hub_url``, site sh-edge's agent on ``agent_url`` (a token every 50 ms) and a
    tenant's streamed chat completion under way, its first chunk read: the test then breaks it.
    Yields the hub, the agent, the stream's events as they come and the task reading them."""
    (tmp_path / "hub").mkdir()
    async with running_hub(hub_config(tmp_path / "hub", hub_url)) as hub:
        key = hub.create_tenant("acme", default_origin="shanghai")
        cfg = agent_config(agent_url, site="sh-edge", data_dir=str(tmp_path / "agent"),
                           backend={"sim": {"ttft_ms": 10.0, "per_token_ms": 50.0}})
        async with running(cfg) as agent:
            await until(lambda: hub.registry.get("sh-edge") is not None
                        and hub.registry.get("sh-edge").routable, 10, "the site routable")  # type: ignore[union-attr]
            events: list[dict[str, object]] = []
            seen = asyncio.Event()
            async with aiohttp.ClientSession() as session:
                async with session.post(f"http://127.0.0.1:{hub.http_port}/v1/chat/completions", json=CHAT,
                                        headers={"Authorization": f"Bearer {key}"}) as resp:
                    assert resp.status == 200
                    reader = asyncio.create_task(read_sse(resp, events, seen))
                    await asyncio.wait_for(seen.wait(), 10)
                    yield hub, agent, events, reader


@pytest.mark.parametrize("fault", ["kill", "pause"])
async def test_a_stream_whose_sites_nats_node_dies_ends_at_once_with_an_error(
        tmp_path: Path, cluster: NatsCluster, fault: str) -> None:
    hub_node, agent_node = cluster.nodes[0], cluster.nodes[1]
    async with streaming(tmp_path, hub_node.url, agent_node.url) as (_, agent, events, reader):
        await until(lambda: len(events) >= 5, 10, "a few chunks")
        killed_at = time.monotonic()
        if fault == "kill":  # mid-answer: the site's NATS node dies (or freezes)
            await cluster.kill(agent_node.name)
        else:
            await cluster.pause(agent_node.name)
        await asyncio.wait_for(reader, 20)  # the stream ends (before: at the 30 s idle timeout)
        ended_s = time.monotonic() - killed_at
        whole = "".join(str(c.get("delta", {}).get("content", "")) for e in events  # type: ignore[union-attr]
                        for c in e.get("choices", []))  # type: ignore[union-attr]
        finished = [e for e in events if any(c.get("finish_reason") for c in e.get("choices", []))]  # type: ignore[union-attr]
        errors = [e for e in events if "error" in e]
        if finished and not errors:
            # Nothing was lost (the killed node's socket closed at once and the agent's
            # client sent what it held through the next node): the answer must be whole,
            # every one of its max_tokens words after the site's name (the sim's answer).
            assert fault == "kill" and whole.startswith("sh-edge: "), (fault, whole[:80])
            assert len(whole.split()) == 1 + CHAT["max_tokens"], whole  # type: ignore[operator]
            print(f"{fault}: nothing lost, the stream ran whole to its end {ended_s:.2f} s after the fault")
        else:
            assert errors, events[-3:]
            assert errors[-1]["error"]["code"] == "upstream_failed", errors  # type: ignore[index]
            assert "stream_broken" in errors[-1]["error"]["message"], errors  # type: ignore[index]
            assert not finished
            assert ended_s < 8.0, f"the stream ended {ended_s:.2f} s after the fault"
            print(f"{fault}: the stream ended with an SSE error {ended_s:.2f} s after the site's NATS node "
                  f"failed ({len(events) - 1} chunks before); agent told: "
                  f"{agent.counters.get('streams_broken_told', 0)}")
    if fault == "kill":
        await cluster.restart(agent_node.name)
    else:
        await cluster.resume(agent_node.name)


async def test_a_stream_whose_site_goes_silent_ends_when_the_site_is_declared_lost(
        tmp_path: Path, cluster: NatsCluster) -> None:
    hub_url = cluster.nodes[0].url
    async with streaming(tmp_path, hub_url, hub_url) as (hub, agent, events, reader):
        # The agent falls silent (its link cut without a word: its socket closed under it,
        # heartbeats and chunks stop; it never comes back during the test).
        silenced_at = time.monotonic()
        await agent.bus._nc.close()  # type: ignore[attr-defined]
        await asyncio.wait_for(reader, 15)
        ended_s = time.monotonic() - silenced_at
        errors = [e for e in events if "error" in e]
        assert errors and errors[-1]["error"]["code"] == "upstream_failed", events[-3:]  # type: ignore[index]
        assert "declared lost" in errors[-1]["error"]["message"], errors  # type: ignore[index]
        assert ended_s < 8.0, f"the stream ended {ended_s:.2f} s after the site fell silent"
        print(f"silent site: the stream ended {ended_s:.2f} s after (detection {hub.registry.detection_s:.1f} s)")
