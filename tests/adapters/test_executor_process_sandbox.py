"""The ``process`` executor's sandbox, through a real agent, nats-server and bubblewrap.

Attack row closed: a tenant job ``sh -c 'id > ...'`` ran on the site host as the agent's user
(root). Now a default agent runs no tenant code at all, and a site that opts in runs only the
programs it allow-listed, as an unprivileged user, without network, without the agent's files.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import msgspec
import pytest

from controlplane.nats.natsserver import NatsServer
from edge_agent import config, wire
from edge_agent.executors.process import sandbox_argv
from tests.support.engines import needs
from tests.support.fakehub import FakeHub, agent_config, exit_event, running, wait_for
from tests.support.sandboxbait import planted

PYTHON = "/usr/bin/python3"
NOBODY = 65534

sandboxed = needs("bwrap", package="bubblewrap")


def _start(job: str, argv: list[str]) -> wire.StartAttempt:
    return wire.StartAttempt(job=job, attempt=1, cards=1, accelerator="H20", executor="process", command=argv)


def _process_site(url: str, data: Path, **process: object) -> config.AgentConfig:
    return agent_config(url, data_dir=str(data), executors={
        "enabled": ["process"], "process": {"commands": [PYTHON, "/bin/sh"], "grace_s": 1.0, **process}})


def test_an_agent_config_without_executors_enables_none() -> None:
    cfg = config.loads('site = "s1"\n')
    assert cfg.executors.enabled == []
    assert config.from_flags(site="s1").executors.enabled == []


async def test_a_default_agent_refuses_a_tenant_command(nats_server: NatsServer, tmp_path: Path) -> None:
    """Failed before: the default enabled ``process``, so ``sh -c 'id > marker'`` ran as root."""
    marker = tmp_path / "ran-as"
    cfg = msgspec.structs.replace(agent_config(nats_server.url, data_dir=str(tmp_path / "a")),
                                  executors=config.ExecutorsConfig())
    async with FakeHub(nats_server.url) as hub:
        async with running(cfg) as agent:
            reply = await hub.command("edge-a", _start("id", ["sh", "-c", f"id > {marker}"]))
            assert isinstance(reply, wire.ErrorReply) and reply.code == "unsupported", reply
            assert reply.message == "executor 'process' is not enabled at edge-a (enabled: none)"
            sim = await hub.command("edge-a", wire.StartAttempt(job="s", attempt=1, cards=1, accelerator="H20"))
            assert isinstance(sim, wire.ErrorReply) and sim.code == "unsupported"
            registered = await wait_for(lambda: hub.registrations_of("edge-a"), 5, "the registration")
            assert registered[-1].executors == []
            assert agent.inventory.free_cards()["H20"] == 3.5 and not agent.training.attempts
    assert not marker.exists()


@sandboxed
async def test_an_enabled_site_runs_it_as_the_unprivileged_user_inside_bwrap(
        nats_server: NatsServer, tmp_path: Path) -> None:
    data = tmp_path / "agent"
    script = ('id -u > "$CPN_CHECKPOINT_DIR/uid"; id -g >> "$CPN_CHECKPOINT_DIR/uid"; '
              'readlink /proc/self/ns/net > "$CPN_CHECKPOINT_DIR/netns"; '
              'grep CapEff /proc/self/status > "$CPN_CHECKPOINT_DIR/caps"; '
              'echo "CPN_CHECKPOINT uid 0.5"')
    async with FakeHub(nats_server.url) as hub:
        await hub.create_stream()
        async with running(_process_site(nats_server.url, data)):
            exited, events = await hub.run_attempt("edge-a", _start("idjob", ["sh", "-c", script]))
    assert exited.reason == "completed", exited
    ck = data / "checkpoints" / "idjob"
    assert (ck / "uid").read_text().split() == [str(NOBODY), str(NOBODY)]
    assert (ck / "uid").stat().st_uid == NOBODY
    assert (ck / "netns").read_text().strip() != os.readlink("/proc/self/ns/net")  # its own network namespace
    assert (ck / "caps").read_text().split() == ["CapEff:", "0000000000000000"]
    checkpoints = [e.event for e in events if isinstance(e.event, wire.Checkpointed)]
    assert [(c.checkpoint, c.progress) for c in checkpoints] == [(str(ck / "uid"), 0.5)]


NETWORK_AND_FILES = """
import json, os, socket, sys
out = {}
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2).close()
    out["loopback"] = "connected"
except OSError as exc:
    out["loopback"] = type(exc).__name__
for name in ("creds", "other", "data", "root"):
    path = sys.argv[{"creds": 2, "other": 3, "data": 4, "root": 5}[name]]
    try:
        out[name] = os.listdir(path) if os.path.isdir(path) else open(path).read()
    except OSError as exc:
        out[name] = type(exc).__name__
open(os.path.join(os.environ["CPN_CHECKPOINT_DIR"], "seen.json"), "w").write(json.dumps(out))
"""


@sandboxed
async def test_no_network_and_none_of_the_agents_files(nats_server: NatsServer, tmp_path: Path) -> None:
    data = tmp_path / "agent"
    async with planted(data) as bait, FakeHub(nats_server.url) as hub:
        await hub.create_stream()
        async with running(_process_site(nats_server.url, data)):
            argv = [PYTHON, "-c", NETWORK_AND_FILES, str(bait.port), str(bait.creds), str(bait.other), str(data), "/root"]
            exited, _ = await hub.run_attempt("edge-a", _start("nosy", argv))
    assert exited.reason == "completed", exited
    seen = json.loads((data / "checkpoints" / "nosy" / "seen.json").read_text())
    assert seen["loopback"] in ("ConnectionRefusedError", "OSError"), seen  # not the host's loopback
    assert bait.connections == 0
    assert seen["creds"] == "FileNotFoundError" and seen["other"] == "FileNotFoundError", seen
    assert seen["data"] == ["checkpoints"] and seen["root"] == [], seen  # empty tmpfs; only its own dir bound


@sandboxed
async def test_a_command_off_the_allow_list_is_refused_with_the_reason(nats_server: NatsServer, tmp_path: Path) -> None:
    data = tmp_path / "agent"
    async with FakeHub(nats_server.url) as hub:
        async with running(_process_site(nats_server.url, data, commands=[PYTHON])) as agent:
            for argv in (["sh", "-c", "id"], ["/usr/bin/perl", "-e", "1"], ["nonexistent-tool"]):
                reply = await hub.command("edge-a", _start("deny", argv))
                assert isinstance(reply, wire.ErrorReply) and reply.code == "not_allowed", reply
                assert f"command {argv[0]!r} is not allowed at this site (allowed programs: {PYTHON})" in reply.message
            assert not agent.training.attempts and agent.inventory.free_cards()["H20"] == 3.5
    assert not (data / "checkpoints" / "deny").exists()


@sandboxed
async def test_memory_limit_ends_the_attempt_as_a_user_error(nats_server: NatsServer, tmp_path: Path) -> None:
    hog = "b = bytearray(512 * 1024 * 1024)\nprint('allocated', flush=True)\n"
    async with FakeHub(nats_server.url) as hub:
        await hub.create_stream()
        async with running(_process_site(nats_server.url, tmp_path / "a", memory_mib=256)):
            exited, _ = await hub.run_attempt("edge-a", _start("hog", [PYTHON, "-c", hog]))
    assert exited.reason == "user_error" and exited.exit_code == 1, exited
    assert "MemoryError" in exited.detail


async def test_without_bwrap_every_attempt_is_refused_and_the_agent_says_so(
        nats_server: NatsServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    marker = tmp_path / "ran"
    cfg = _process_site(nats_server.url, tmp_path / "a", bwrap="/nonexistent/bwrap")
    caplog.set_level(logging.ERROR)
    async with FakeHub(nats_server.url) as hub:
        async with running(cfg):
            assert "executor_unavailable" in caplog.text and "never runs unsandboxed" in caplog.text
            registered = await wait_for(lambda: hub.registrations_of("edge-a"), 5, "the registration")
            assert registered[-1].executors == []  # not offered to the hub
            reply = await hub.command("edge-a", _start("nobw", ["sh", "-c", f"touch {marker}"]))
    assert isinstance(reply, wire.ErrorReply) and reply.code == "not_allowed", reply
    assert "bubblewrap ('/nonexistent/bwrap') is not installed" in reply.message
    assert not marker.exists()


def test_the_sandbox_hides_before_it_binds_the_checkpoint_dir() -> None:
    data = Path("/var/lib/cpn")
    ck = data / "checkpoints" / "j1"
    argv = sandbox_argv(["/usr/bin/python3", "-c", "1"], bwrap="bwrap", uid=NOBODY, gid=NOBODY, checkpoint_dir=ck,
                        cwd=ck, hidden=[Path("/root"), data], memory_mib=256, nproc=64, nofile=256)
    text = " ".join(argv)
    assert "--unshare-net" in argv and "--die-with-parent" in argv and "--share-net" not in argv
    assert text.index("--tmpfs /var/lib/cpn") < text.index("--dir /var/lib/cpn/checkpoints") < text.index(
        f"--bind {ck} {ck}")
    assert f"--reuid={NOBODY}" in argv and "--no-new-privs" in argv and "--as=268435456" in argv
    assert argv[-3:] == ["/usr/bin/python3", "-c", "1"]


def test_cpn_up_sites_run_simulated_training_only(tmp_path: Path) -> None:
    from controlplane.tools.up import agent_config_for
    from topology import loader

    layout = loader.load_default()
    configs = [agent_config_for(site, "nats://127.0.0.1:4222", tmp_path, None) for site in layout.sites]
    assert configs and {tuple(c.executors.enabled) for c in configs} == {("sim",)}
