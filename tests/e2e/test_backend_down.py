"""A site's local model server goes down: tenants never read the site's internal address, the site
reports its replicas not ready within a probe interval, the hub routes elsewhere (or answers 503),
and the site is served again once its server answers. Real hub, real agents, real nats-server, a
real OpenAI-compatible HTTP server on port 0."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from controlplane.hub import Hub
from controlplane.nats.natsserver import NatsServer
from edge_agent.agent import Agent
from edge_agent.config import AgentConfig, BackendConfig, ModelConfig, OpenAIHttpConfig, SimBackendConfig
from tests.support.waiting import until
from tests.support.hubrig import Client, hub_config, running_hub
from tests.support.localllm import LocalServer, local_llm  # noqa: F401  (the fixture)

HEADERS = {"X-CPN-Budget-Ms": "50"}


def _ready(hub: Hub, site: str, model: str) -> bool:
    view = hub.registry.get(site)
    return view is not None and view.state == "up" and (r := view.replicas.get(model)) is not None \
        and r.state == "ready"


def _leaks(server: LocalServer, status: int, body: Any, headers: dict[str, str]) -> list[str]:
    """Every place a tenant-visible answer names the local server."""
    seen = f"{status} {body} {headers}"
    return [needle for needle in (f"127.0.0.1:{server.port}", server.url, str(server.port), "localhost")
            if needle in seen]


@asynccontextmanager
async def _network(tmp: Path, nats_url: str, server: LocalServer, *, probe_s: float,
                   with_sim_site: bool) -> AsyncIterator[tuple[Hub, dict[str, Agent], Client]]:
    """hz-edge serves ``qwen`` and ``solo`` from the local server; sh-hub (optional) serves ``qwen``
    from the sim backend."""
    async with running_hub(hub_config(tmp, nats_url)) as hub:
        key = hub.create_tenant("acme", default_origin="hangzhou")
        agents = {"hz-edge": Agent(AgentConfig(
            site="hz-edge", nats=nats_url, city="hangzhou", accelerators={"910B": 4},
            models=[ModelConfig(name="qwen", cards=1.0), ModelConfig(name="solo", cards=1.0)],
            backend=BackendConfig(kind="openai-http", openai_http=OpenAIHttpConfig(
                url=server.url, probe_s=probe_s, probe_timeout_s=0.5, timeout_s=5.0)),
        ))}
        if with_sim_site:
            agents["sh-hub"] = Agent(AgentConfig(
                site="sh-hub", nats=nats_url, city="shanghai", tier="hub", accelerators={"910B": 8},
                models=[ModelConfig(name="qwen", cards=1.0)],
                backend=BackendConfig(sim=SimBackendConfig(ttft_ms=1, per_token_ms=1)),
            ))
        try:
            for agent in agents.values():
                await agent.start()
            await until(lambda: all(_ready(hub, s, "qwen") for s in agents), 10, "replicas ready")
            async with aiohttp.ClientSession() as session:
                yield hub, agents, Client(session, f"http://127.0.0.1:{hub.http_port}", key)
        finally:
            for agent in agents.values():
                await agent.stop()


def _chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}


async def test_a_dead_local_server_is_routed_around_and_served_again_once_it_answers(
        tmp_path: Path, nats_server: NatsServer, local_llm: LocalServer) -> None:  # noqa: F811
    probe_s = 0.3
    async with _network(tmp_path, nats_server.url, local_llm, probe_s=probe_s, with_sim_site=True) as (hub, _, tenant):
        status, body, headers = await tenant.call("POST", "/v1/chat/completions", _chat("solo"), headers=HEADERS)
        assert (status, headers["X-CPN-Site"]) == (200, "hz-edge"), body

        await local_llm.stop()
        noticed = await until(lambda: not _ready(hub, "hz-edge", "qwen") and not _ready(hub, "hz-edge", "solo"),
                              5, "hz-edge's replicas not ready at the hub")
        assert noticed < probe_s + 0.5 + 0.5, f"the hub learnt it after {noticed:.2f} s"
        leaks: list[str] = []
        for _ in range(6):  # every request goes to the site whose server answers
            status, body, headers = await tenant.call("POST", "/v1/chat/completions", _chat("qwen"), headers=HEADERS)
            assert (status, headers["X-CPN-Site"]) == (200, "sh-hub"), body
        status, body, headers = await tenant.call("POST", "/v1/chat/completions", _chat("solo"), headers=HEADERS)
        assert status == 503 and body["error"]["code"] == "no_capacity", body
        leaks += _leaks(local_llm, status, body, headers)

        await local_llm.start()  # back on the same port
        back = await until(lambda: _ready(hub, "hz-edge", "solo"), 5, "hz-edge ready again")
        assert back < probe_s + 0.5 + 0.5
        status, body, headers = await tenant.call("POST", "/v1/chat/completions", _chat("solo"), headers=HEADERS)
        assert (status, headers["X-CPN-Site"]) == (200, "hz-edge"), body
        assert body["choices"][0]["message"]["content"] == "hello! there!"
        assert not leaks, leaks


async def test_a_request_that_finds_the_server_down_reads_no_internal_address(
        tmp_path: Path, nats_server: NatsServer, local_llm: LocalServer) -> None:  # noqa: F811
    # Probes every 60 s: the first request is the one that finds the server gone.
    async with _network(tmp_path, nats_url=nats_server.url, server=local_llm, probe_s=60,
                        with_sim_site=False) as (hub, agents, tenant):
        await local_llm.stop()
        leaks: list[str] = []
        status, body, headers = await tenant.call("POST", "/v1/chat/completions", _chat("solo"), headers=HEADERS)
        assert status == 502 and body["error"]["code"] == "upstream_failed", body
        message = body["error"]["message"]
        assert "hz-edge" in message and "backend_unavailable" in message, message
        leaks += _leaks(local_llm, status, body, headers)
        # The site marked its server down at once: the hub stops sending to it (503, not 502).
        await until(lambda: not _ready(hub, "hz-edge", "solo"), 3, "hz-edge's replica not ready")
        assert agents["hz-edge"].health.probes == 1
        for stream in (False, True):
            status, body, headers = await tenant.call("POST", "/v1/chat/completions",
                                                      {**_chat("solo"), "stream": stream}, headers=HEADERS)
            assert status == 503, body
            leaks += _leaks(local_llm, status, body, headers)
        assert not leaks, leaks


SECRET = "http://10.9.8.7:8000/v1/chat/completions: Cannot connect to host gpu-node-7.internal.example"


class _LeakyBackend:
    """A site that puts its internals into its error text (an old agent, or a lying one)."""

    name = "sim"
    default_slots = 4
    load_time_s = 0.0

    def __init__(self, code: str, retryable: bool) -> None:
        self.code = code
        self.retryable = retryable

    def generate_now(self, request: Any) -> None:
        return None

    async def generate(self, request: Any, on_text: Any) -> Any:
        from edge_agent.errors import BackendError

        if on_text is not None:
            await on_text("partial ")  # fail mid-stream, after the tenant got a first piece
        raise BackendError(self.code, SECRET, retryable=self.retryable)

    async def close(self) -> None:
        pass


async def test_the_hub_passes_on_no_free_text_from_a_site(tmp_path: Path, nats_server: NatsServer) -> None:
    async with running_hub(hub_config(tmp_path, nats_server.url)) as hub:
        key = hub.create_tenant("acme", default_origin="hangzhou")
        seen: list[str] = []
        for site, city, card, code, retryable in (("hz-edge", "hangzhou", "910B", "backend", True),
                                                  ("nj-edge", "nanjing", "L20", "gpu-node-7.internal", False)):
            agent = Agent(AgentConfig(site=site, nats=nats_server.url, city=city, accelerators={card: 4},
                                      models=[ModelConfig(name=f"m-{site}", cards=1.0)]),
                          backend=_LeakyBackend(code, retryable))  # type: ignore[arg-type]
            await agent.start()
            try:
                await until(lambda: _ready(hub, site, f"m-{site}"), 10, "replica ready")
                async with aiohttp.ClientSession() as session:
                    tenant = Client(session, f"http://127.0.0.1:{hub.http_port}", key)
                    status, body, headers = await tenant.call("POST", "/v1/chat/completions", _chat(f"m-{site}"),
                                                              headers={**HEADERS, "X-CPN-Budget-Policy": "nearest"})
                    assert status == 502, body
                    message = body["error"]["message"]
                    # The code when it is one tenants may read, else "error"; the site id; nothing else.
                    assert message == (f"every candidate site failed ({site}); last error: backend: site {site} "
                                       "could not serve the request" if retryable
                                       else f"error: site {site} could not serve the request"), message
                    seen.append(f"{body} {headers}")
                    status, body, headers = await tenant.call("POST", "/v1/completions",
                                                              {"model": f"m-{site}", "prompt": "x", "stream": True},
                                                              headers={**HEADERS, "X-CPN-Budget-Policy": "nearest"})
                    assert status == 200 and "partial" in str(body) and "error" in str(body), body
                    seen.append(f"{body} {headers}")
            finally:
                await agent.stop()
    for text in seen:
        for needle in ("10.9.8.7", "gpu-node-7", "Cannot connect", "internal.example"):
            assert needle not in text, text
