"""``cpn agent`` as a real subprocess, and the config it reads (TOML, flags, errors naming the key)."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import pytest

from controlplane.nats.natsserver import NatsServer
from edge_agent import config, wire
from edge_agent.errors import ConfigError
from tests.support.fakehub import FakeHub, wait_for

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "site.example.toml"


async def _cpn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controlplane.cli", *args, cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


async def _finish(proc: asyncio.subprocess.Process, timeout_s: float = 20) -> tuple[int, str]:
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.communicate()
        raise
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_cpn_agent_registers_serves_and_exits_0_on_sigterm(nats_server: NatsServer, tmp_path: Path) -> None:
    async with FakeHub(nats_server.url, heartbeat_s=0.2) as hub:
        proc = await _cpn("agent", "--site", "cli-site", "--nats", nats_server.url, "--cards", "H20=8,910B=4",
                          "--tier", "regional", "--city", "hangzhou", "--model", "qwen:0.5:2",
                          "--data-dir", str(tmp_path / "data"))
        try:
            await wait_for(lambda: hub.registrations_of("cli-site"), 20, "the subprocess to register")
            reg = hub.registrations_of("cli-site")[0]
            assert reg.accelerators == {"H20": 8, "910B": 4} and reg.tier == "regional" and reg.city == "hangzhou"
            await hub.wait_heartbeat("cli-site", lambda hb: hb.free_cards == {"H20": 7.5, "910B": 4.0})
            reply = await hub.infer("cli-site", wire.InferRequest(request_id="x", model="qwen", max_tokens=3))
            assert isinstance(reply, wire.InferResult) and reply.output.startswith("cli-site: ")
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            code, err = await _finish(proc)
        assert code == 0, err
        assert "registered site=cli-site" in err and "agent_stopped site=cli-site" in err
        # It said it was draining before it went.
        assert hub.last_heartbeat("cli-site").draining  # type: ignore[union-attr]


async def test_cpn_agent_with_a_config_file(nats_server: NatsServer, tmp_path: Path) -> None:
    toml = tmp_path / "site.toml"
    toml.write_text(f'site = "toml-site"\nnats = ["{nats_server.url}"]\n[accelerators]\n"910B" = 2\n'
                    '[backend.sim]\nttft_ms = 0\n[[models]]\nname = "glm"\ncards = 1\n')
    async with FakeHub(nats_server.url) as hub:
        proc = await _cpn("agent", "--config", str(toml), "--city", "wuhu")
        try:
            await wait_for(lambda: hub.registrations_of("toml-site"), 20, "the subprocess to register")
            reg = hub.registrations_of("toml-site")[0]
            assert reg.city == "wuhu" and [m.model for m in reg.models] == ["glm"]
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)
            code, err = await _finish(proc)
        assert code == 0, err


@pytest.mark.parametrize(("text", "names"), [
    ('site = "s1"\n[backend.sim]\nslot = 3\n', "`slot` - at `$.backend.sim`"),
    ('site = "s1"\nheartbeat_s = 0\n', "$.heartbeat_s"),
    ('site = "Bad Site"\n', "$.site"),
    ('site = "s1"\ncolour = "red"\n', "`colour`"),
])
async def test_bad_config_exits_2_naming_the_key(tmp_path: Path, text: str, names: str) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text(text)
    code, err = await _finish(await _cpn("agent", "--config", str(toml)))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and names in lines[0], err


def test_example_config_documents_every_key() -> None:
    example = config.load(EXAMPLE)
    assert example.site and example.models and example.backend.kind == "sim"
    text = EXAMPLE.read_text()
    for struct in (config.AgentConfig, config.BusConfig, config.BackendConfig, config.SimBackendConfig,
                   config.OpenAIHttpConfig, config.ModelConfig, config.ExecutorsConfig,
                   config.ProcessExecutorConfig):
        for f in struct.__struct_fields__:
            name = "openai-http" if f == "openai_http" else f
            assert name in text, f"{struct.__name__}.{name} is not documented in {EXAMPLE.name}"


def test_flags_and_their_errors() -> None:
    cfg = config.from_flags(site="s1", nats=["nats://a:4222", "nats://b:4222"], cards="H20=8, 910B=4",
                            models=["qwen:0.5:2", "glm"], backend="openai-http", backend_url="http://127.0.0.1:8000",
                            password="hunter2")
    assert cfg.password == "hunter2" and "hunter2" not in repr(cfg)
    assert cfg.servers == ["nats://a:4222", "nats://b:4222"] and cfg.accelerators == {"H20": 8, "910B": 4}
    assert [(m.name, m.cards, m.slots) for m in cfg.models] == [("qwen", 0.5, 2), ("glm", 1.0, 0)]
    with pytest.raises(ConfigError, match="--cards"):
        config.from_flags(site="s1", cards="H20")
    with pytest.raises(ConfigError, match="--model"):
        config.from_flags(site="s1", models=["a:b"])
    with pytest.raises(ConfigError, match=r"\$\.models: preloaded models need 3 cards"):
        config.from_flags(site="s1", cards="H20=2", models=["a:3"])
    with pytest.raises(ConfigError, match=r"openai-http\.url"):
        config.from_flags(site="s1", backend="openai-http")
    with pytest.raises(ConfigError, match=r"\$\.nats"):
        config.from_flags(site="s1", nats="localhost")
