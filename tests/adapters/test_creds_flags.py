"""``--creds FILE`` on ``cpn hub`` and ``cpn agent``: the files ``cpn deploy nats-config`` writes.

The files decide the NATS URLs, user, password and TLS files; explicit flags still win; another
site's file, or a site's file given to the hub, is refused naming the file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from controlplane import cli
from controlplane.nats import natsconf
from controlplane.tools.commands import hub as hub_cmd
from controlplane.core.errors import RequestError
from edge_agent import cli as agent_cli
from edge_agent.errors import ConfigError


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("creds") / "nats"
    argv = ["deploy", "nats-config", "--sites", "a,b", "--out", str(out), "--client-url", "tls://nats.example.net:14222"]
    assert cli.main(argv) == 0
    return out


def agent_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    agent_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_hub_takes_its_nats_identity_from_creds(out: Path) -> None:
    creds = natsconf.read_credentials_file((out / "creds" / "hub.json").read_bytes())
    fields = hub_cmd.creds_overrides(str(out / "creds" / "hub.json"))
    assert fields == {"nats_url": "tls://nats.example.net:14222", "nats_user": "cpn-hub", "nats_password": creds.password,
                      "nats_tls_ca": creds.tls_ca, "nats_tls_cert": creds.tls_cert, "nats_tls_key": creds.tls_key}
    with pytest.raises(RequestError, match="site 'a'"):
        hub_cmd.creds_overrides(str(out / "creds" / "a.json"))
    with pytest.raises(RequestError, match="--creds"):
        hub_cmd.creds_overrides(str(out / "creds" / "nope.json"))


def test_an_agent_takes_its_identity_from_creds_and_flags_still_win(out: Path, tmp_path: Path) -> None:
    site = tmp_path / "a.toml"
    site.write_text('site = "a"\nnats = "nats://127.0.0.1:4222"\n[accelerators]\nH20 = 2\n')
    creds = natsconf.read_credentials_file((out / "creds" / "a.json").read_bytes())
    config = agent_cli.config_from_args(agent_args("--config", str(site), "--creds", str(out / "creds" / "a.json")))
    assert (config.site, config.servers, config.user, config.password) == (
        "a", ["tls://nats.example.net:14222"], "site-a", creds.password)
    assert (config.tls_ca, config.tls_cert, config.tls_key) == (creds.tls_ca, creds.tls_cert, creds.tls_key)
    assert config.accelerators == {"H20": 2}
    flagged = agent_cli.config_from_args(agent_args("--creds", str(out / "creds" / "a.json"), "--nats", "tls://x:1"))
    assert flagged.servers == ["tls://x:1"] and flagged.site == "a"
    with pytest.raises(ConfigError, match="site 'b'"):
        agent_cli.config_from_args(agent_args("--config", str(site), "--creds", str(out / "creds" / "b.json")))
    with pytest.raises(ConfigError, match="not a site's credentials"):
        agent_cli.config_from_args(agent_args("--creds", str(out / "creds" / "hub.json")))


def test_every_port_and_path_of_the_generated_configs_comes_from_a_flag(tmp_path: Path) -> None:
    out = tmp_path / "nats"
    argv = ["deploy", "nats-config", "--sites", "a", "--out", str(out), "--client-port", "14222", "--leaf-port", "17422",
            "--cluster-port", "16222", "--gateway-port", "17222", "--monitor", "127.0.0.1:18222", "--store-dir",
            "/srv/js", "--listen-host", "10.0.0.5", "--site-listen", "127.0.0.1:24222", "--gateway", "west=tls://w:17222"]
    assert cli.main(argv) == 0
    single = (out / "single" / "nats-server.conf").read_text()
    for want in ('listen: "10.0.0.5:14222"', 'listen: "10.0.0.5:17422"', 'http: "127.0.0.1:18222"', 'store_dir: "/srv/js"'):
        assert want in single
    node = (out / "cluster" / "node-1.conf").read_text()
    for want in ('listen: "10.0.0.5:16222"', 'listen: "10.0.0.5:17222"', "@node-2:16222", 'store_dir: "/srv/js"'):
        assert want in node
    assert 'listen: "127.0.0.1:24222"' in (out / "leaf" / "a.conf").read_text()
    assert "@node-1:17422" in (out / "leaf" / "a.conf").read_text()
    assert natsconf.read_credentials_file((out / "creds" / "a.json").read_bytes()).nats[0] == "tls://node-1:14222"
    readme = (out / "README.md").read_text()
    assert "10.0.0.5:14222" in readme and "/srv/js" in readme and "--creds" in readme
    assert cli.main(["deploy", "nats-config", "--sites", "a", "--out", str(tmp_path / "off"), "--monitor", "off"]) == 0
    assert "http:" not in (tmp_path / "off" / "single" / "nats-server.conf").read_text()
