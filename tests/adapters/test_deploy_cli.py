"""``cpn deploy nats-config`` end to end: files, modes, and ``nats-server -t`` on every config."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from controlplane import cli
from controlplane.nats import natsconf
from controlplane.nats.natsserver import binary
from edge_agent import wire
from tests.support.confserver import server_from
from topology import loader

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "deploy" / "nats"
EXAMPLE_SITES = "sh-hub,sh-edge,hz-edge"
EXAMPLE_TLS_DIR = "/etc/cpn/nats/tls"


def nats_server_accepts(path: Path) -> None:
    result = subprocess.run([binary(), "-t", "-c", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"{path}: {result.stdout}{result.stderr}"
    assert "is valid" in result.stdout + result.stderr


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_writes_every_file_private_and_valid(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert cli.main(["deploy", "nats-config", "--sites", "a,b,c", "--out", str(out)]) == 0
    confs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.conf"))
    assert confs == ["cluster/node-1.conf", "cluster/node-2.conf", "cluster/node-3.conf",
                     "leaf/a.conf", "leaf/b.conf", "leaf/c.conf", "single/nats-server.conf"]
    for conf in out.rglob("*.conf"):
        nats_server_accepts(conf)
        assert mode(conf) == 0o600
    assert mode(out) == 0o700 and (out / "README.md").exists()
    creds = {p.stem: natsconf.read_credentials_file(p.read_bytes()) for p in (out / "creds").glob("*.json")}
    assert sorted(creds) == ["a", "b", "c", "hub"]
    assert all(mode(p) == 0o600 for p in (out / "creds").glob("*.json"))
    assert creds["b"].user == "site-b" and creds["b"].inbox_prefix == "_INBOX.b"
    assert creds["hub"].user == "cpn-hub" and creds["hub"].nats[0] == "tls://node-1:4222"
    assert creds["hub"].tls_ca == str((out / "tls" / "ca.pem").resolve())
    # TLS everywhere: the CA's key and every key private, certificates readable.
    assert mode(out / "tls" / "ca-key.pem") == 0o600 and mode(out / "tls" / "ca.pem") == 0o644
    assert all(mode(p) == 0o600 for p in (out / "tls").glob("*-key.pem"))
    for conf in ["single/nats-server.conf", "cluster/node-1.conf"]:
        assert (out / conf).read_text().count("tls: {") >= 2, conf  # clients and leaf nodes at least
    assert 'urls: [\n        "tls://leaf-a:' in (out / "leaf" / "a.conf").read_text()
    # Plain passwords only where a client needs them; server configs carry hashes.
    single = (out / "single" / "nats-server.conf").read_text()
    assert creds["b"].password not in single and creds["b"].password in (out / "leaf" / "b.conf").read_text()
    assert creds["b"].password not in (out / "leaf" / "a.conf").read_text()
    assert not list(out.rglob("*.tmp"))


def test_layout_sites_and_hub_urls(tmp_path: Path) -> None:
    layout = loader.data_path("demo-3")
    out = tmp_path / "out"
    assert cli.main(["deploy", "nats-config", "--layout", str(layout), "--out", str(out),
                     "--hub-url", "tls://hub.example.net:7422"]) == 0
    ids = [s.id for s in loader.load(layout).sites]
    assert sorted(p.stem for p in (out / "leaf").glob("*.conf")) == sorted(ids)
    leaf = (out / "leaf" / f"{ids[0]}.conf").read_text()
    assert f"tls://leaf-{ids[0]}:" in leaf and "@hub.example.net:7422" in leaf


def test_existing_credentials_need_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert cli.main(["deploy", "nats-config", "--sites", "a", "--out", str(out)]) == 0
    before = (out / "creds" / "a.json").read_text()
    assert cli.main(["deploy", "nats-config", "--sites", "a", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "creds" / "a.json").read_text() == before
    assert cli.main(["deploy", "nats-config", "--sites", "a", "--out", str(out), "--force"]) == 0
    assert json.loads((out / "creds" / "a.json").read_text())["password"] != json.loads(before)["password"]


@pytest.mark.parametrize("argv, message", [
    (["--sites", "a,Bad.Site"], "sites[1]"),
    (["--sites", "a,a"], "twice"),
    (["--sites", " , "], "no sites"),
    (["--layout", "/nonexistent/layout.toml"], "--layout"),
    (["--sites", "a", "--cluster-host", "h1"], "hosts"),
])
def test_bad_input_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert cli.main(["deploy", "nats-config", "--out", str(tmp_path / "o"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "creds").exists()


def test_subprocess_with_secret_file_is_reproducible(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"0123456789abcdef0123456789abcdef")
    outs = [tmp_path / "o1", tmp_path / "o2"]
    for out in outs:
        result = subprocess.run(
            [sys.executable, "-m", "controlplane.cli", "deploy", "nats-config", "--sites", "x,y",
             "--secret-file", str(secret), "--out", str(out), "--tls-dir", "/etc/cpn/nats/tls"],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )
        assert result.returncode == 0, result.stderr
    for rel in ["single/nats-server.conf", "cluster/node-2.conf", "leaf/y.conf", "creds/x.json"]:
        assert (outs[0] / rel).read_text() == (outs[1] / rel).read_text(), rel


def test_committed_examples_are_current_and_valid(tmp_path: Path) -> None:
    # deploy/nats is generated from a public example secret; regenerate and compare.
    out = tmp_path / "ex"
    assert cli.main(["deploy", "nats-config", "--sites", EXAMPLE_SITES, "--out", str(out),
                     "--secret-file", str(EXAMPLES / "example-secret.txt"), "--tls-dir", EXAMPLE_TLS_DIR]) == 0
    for sub in ["single", "cluster", "leaf"]:
        for path in (out / sub).glob("*.conf"):
            committed = EXAMPLES / sub / path.name
            assert committed.read_text() == path.read_text(), f"{committed} is stale: see deploy/nats/README.md"
            # nats-server -t loads the certificates: check with the ones just made.
            here = tmp_path / "check" / sub / path.name
            here.parent.mkdir(parents=True, exist_ok=True)
            here.write_text(committed.read_text().replace(EXAMPLE_TLS_DIR, str(out / "tls")))
            nats_server_accepts(here)


async def test_embedded_config_runs_with_jetstream_for_the_hub(tmp_path: Path) -> None:
    # What `cpn up` does: the config names no store dir; NatsServer's -js/-sd provide it.
    text, hub, sites = natsconf.embedded_config(["a"], secret=b"s" * 32, jetstream_dir=str(tmp_path / "js"))
    async with server_from(tmp_path, "embedded", text) as server:
        nc = await nats.connect(server.url, user=hub.user, password=hub.password,
                                inbox_prefix=wire.HUB_INBOX_PREFIX, allow_reconnect=False)
        site = await nats.connect(server.url, user=sites["a"].user, password=sites["a"].password,
                                  inbox_prefix=wire.inbox_prefix("a"), allow_reconnect=False)
        try:
            js = nc.jetstream()
            await js.add_stream(name=wire.EVENTS_STREAM, subjects=[wire.EVENT_WILDCARD])
            ack = await site.request(wire.event_subject("a"), b"{}", headers={"Nats-Msg-Id": "j:1:1"}, timeout=3)
            assert json.loads(ack.data)["seq"] == 1
        finally:
            await site.close()
            await nc.close()
        # A wrong password is refused (raw protocol: nats-py leaks its socket on a failed connect).
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            await asyncio.wait_for(reader.readline(), 3)  # INFO
            writer.write(b'CONNECT {"user":"site-a","pass":"wrong","verbose":false}\r\nPING\r\n')
            assert b"Authorization Violation" in await asyncio.wait_for(reader.readline(), 3)
        finally:
            writer.close()
            await writer.wait_closed()


def test_three_hub_hosts_example_runs_hubs_on_the_durable_cluster(tmp_path: Path) -> None:
    """``ha/``: a hub config per host on the replicated record, a systemd unit and a compose project
    per host whose every mounted file exists; the cluster configs they stand on fsync every write
    and pass ``nats-server -t``; a hub config with ``creds/hub.json`` reaches the record over TLS as
    the hub identity."""
    import re

    from controlplane.compose import record_connection
    from controlplane.config import load_hub_config
    from controlplane.tools.commands.hub import creds_overrides

    yaml = pytest.importorskip("yaml")
    out = tmp_path / "out"
    assert cli.main(["deploy", "nats-config", "--sites", "a,b", "--out", str(out),
                     "--cluster-host", "h1", "--cluster-host", "h2", "--cluster-host", "h3"]) == 0
    for n in (1, 2, 3):
        node = out / "cluster" / f"node-{n}.conf"
        assert 'sync_interval: "always"' in node.read_text()
        nats_server_accepts(node)
        config = load_hub_config(out / "ha" / f"hub-{n}.toml", **creds_overrides(str(out / "creds" / "hub.json")))
        assert (config.hub_id, config.role, config.record) == (f"hub-{n}", "hub", "nats")
        assert config.nats_url == "tls://h1:4222,tls://h2:4222,tls://h3:4222" and config.nats_user == "cpn-hub"
        urls, connect = record_connection(config)
        assert urls == ["tls://h1:4222", "tls://h2:4222", "tls://h3:4222"]
        assert connect["user"] == "cpn-hub" and connect["tls"] is not None
    unit = (out / "ha" / "cpn-hub.service").read_text()
    assert "ExecStart=/opt/cpn/.venv/bin/cpn hub --config /etc/cpn/hub.toml --creds /etc/cpn/nats/creds/hub.json" in unit
    assert "After=network-online.target cpn-nats.service" in unit
    project = yaml.safe_load((out / "ha" / "compose.yaml").read_text())
    assert set(project["services"]) == {"nats", "hub"}
    assert project["services"]["nats"]["entrypoint"][0] == "nats-server"
    for n in (1, 2, 3):
        for service in project["services"].values():
            for volume in service["volumes"]:
                source = re.sub(r"\$\{CPN_NODE:\?[^}]*\}", str(n), volume).split(":", 1)[0]
                if source.startswith("."):
                    assert (out / "ha" / source).exists(), (n, volume)
    assert "## Three hub hosts" in (out / "README.md").read_text()
