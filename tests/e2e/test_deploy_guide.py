"""docs/deploy.md, run: the guide's own commands as separate processes on loopback.

Every fenced block of the guide marked ``deploy-test`` is taken in order: ``toml`` blocks are
written to their ``file=``, ``sh`` blocks run line by line (``\\`` continuations joined) in bash
with ``set -euo pipefail -a``, variables carried from one line to the next. Lines starting
``nats-server``, ``cpn hub`` or ``cpn agent`` are daemons: started in the background and waited
for (server ready, ``/readyz`` 200, the site up in the hub's metrics). A block marked
``sites=a,b`` runs once per site with ``SITE`` set.

What the test changes, and nothing else: the four hosts become 127.0.0.1, the hub's NATS and
gateway ports free ones, ``/etc/cpn`` and ``/var/lib/cpn`` directories under ``tmp_path``,
``/opt/cpn/`` this checkout, ``sudo -u cpn `` is dropped, ``DNS:`` becomes ``IP:`` in the trial
certificate's name, and because the three sites share one host, each leaf server's listen port
(in the generated ``leaf/<site>.conf`` and the site's ``nats`` URL) is a free one of its own.

Then it checks what the guide says the operator sees: three sites up, an OpenAI chat completion,
a training job ``succeeded`` at ``sh-hub``, a backup that passes ``integrity_check`` and holds the
tenant, two leaf connections and one direct site identity at the hub's NATS, ``strict_inboxes`` on
and one ``CPN_EVENTS`` replica; and that the systemd units start the guide's commands and the
example configs name every key.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest

from controlplane.config import HubConfig
from edge_agent import config as agent_config
from tests.support.waiting import until_blocking

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "deploy.md"
VENV_BIN = Path(sys.executable).parent
BLOCK_RE = re.compile(r"^```(\w+) deploy-test([^\n]*)\n(.*?)^```", re.M | re.S)
DAEMON_RE = re.compile(r"^(nats-server|cpn hub|cpn agent)\b")
SITES = ("sh-hub", "sh-edge", "hz-edge")


@dataclass
class Block:
    lang: str
    attrs: dict[str, str]
    text: str


def guide_blocks() -> list[Block]:
    """The guide's ``deploy-test`` blocks, in order."""
    out = []
    for m in BLOCK_RE.finditer(GUIDE.read_text()):
        attrs = dict(a.split("=", 1) for a in m.group(2).split())
        out.append(Block(m.group(1), attrs, m.group(3)))
    return out


def logical_lines(text: str) -> list[str]:
    """Shell lines with ``\\`` continuations joined; blank and comment-only lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def until(cond: Callable[[], bool], timeout_s: float, what: str, proc: subprocess.Popen[bytes] | None = None,
          log: Path | None = None) -> None:
    """:func:`tests.support.waiting.until_blocking` that fails at once if ``proc`` exits, with ``log``'s tail."""
    def tail() -> str:
        return "\n" + log.read_text()[-3000:] if log else ""

    def holds() -> bool:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: exited {proc.returncode}{tail()}")
        return cond()

    until_blocking(holds, timeout_s, what, interval_s=0.1, last=tail)


@dataclass
class Deployment:
    """Runs the guide's blocks on loopback, remembering outputs and daemons."""

    root: Path
    ports: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    outputs: list[tuple[str, str]] = field(default_factory=list)
    daemons: list[tuple[str, subprocess.Popen[bytes], Path]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("client", "leaf", "monitor", "gateway", *SITES):
            self.ports[name] = free_port()
        for d in ("etc/cpn", "var/lib/cpn"):
            (self.root / d).mkdir(parents=True, mode=0o700)
        self.env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                    "CURL_CA_BUNDLE": str(self.root / "etc/cpn/gateway.pem"), "CPN_LOG_JSON": ""}

    # ------------------------------------------------------------------ text

    def localise(self, text: str) -> str:
        p = self.ports
        for old, new in [
            ("sudo -u cpn ", ""),
            ("DNS:hub.example.net", "IP:127.0.0.1"),
            ("hub.example.net:4222", f"127.0.0.1:{p['client']}"),
            ("--client-port 4222", f"--client-port {p['client']}"),
            ("hub.example.net:7422", f"127.0.0.1:{p['leaf']}"),
            ("--leaf-port 7422", f"--leaf-port {p['leaf']}"),
            ("127.0.0.1:8222", f"127.0.0.1:{p['monitor']}"),
            ("hub.example.net:8443", f"127.0.0.1:{p['gateway']}"),
            ("listen_port = 8443", f"listen_port = {p['gateway']}"),
            ("hub.example.net", "127.0.0.1"),
            ("/opt/cpn/", f"{ROOT}/"),
            ("/etc/cpn", f"{self.root}/etc/cpn"),
            ("/var/lib/cpn", f"{self.root}/var/lib/cpn"),
        ]:
            text = text.replace(old, new)
        return text

    def site_port(self, site: str, text: str) -> str:
        """One loopback port per site's leaf server (the guide's sites each have a host)."""
        return text.replace("127.0.0.1:4222", f"127.0.0.1:{self.ports[site]}")

    # ------------------------------------------------------------------ running

    def run(self, blocks: list[Block]) -> None:
        for block in blocks:
            if block.lang == "toml":
                path = Path(self.localise(block.attrs["file"]))
                text = self.localise(block.text)
                if path.parent.name == "sites":
                    text = self.site_port(path.stem, text)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
            elif "sites" in block.attrs:
                for site in block.attrs["sites"].split(","):
                    leaf = self.root / "etc/cpn/nats/leaf" / f"{site}.conf"
                    conf = leaf.read_text()
                    assert 'listen: "127.0.0.1:4222"' in conf, conf
                    leaf.write_text(self.site_port(site, conf))
                    self.shell(block.text, {"SITE": site})
            else:
                self.shell(block.text, {})

    def shell(self, text: str, extra: dict[str, str]) -> None:
        env = {**self.env, **extra}
        for line in logical_lines(self.localise(text)):
            if DAEMON_RE.match(line):
                self.start(line, env)
                continue
            env_file = self.root / "env.out"
            script = f"set -euo pipefail -a\n{line}\nenv -0 > {env_file}\n"
            done = subprocess.run(["bash", "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                                  timeout=60)
            assert done.returncode == 0, f"{line}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}"
            self.outputs.append((line, done.stdout))
            env = dict(kv.split("=", 1) for kv in env_file.read_text().split("\0") if "=" in kv)
        self.env.update({k: v for k, v in env.items() if k not in extra})

    def start(self, line: str, env: dict[str, str]) -> None:
        expanded = subprocess.run(["bash", "-c", f'printf %s "{line}"'], env=env, capture_output=True, text=True,
                                  check=True).stdout
        log = self.root / f"daemon-{len(self.daemons)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(["bash", "-c", f"exec {line}"], env=env, cwd=ROOT, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.daemons.append((expanded, proc, log))
        if expanded.startswith("nats-server"):
            until(lambda: "Server is ready" in log.read_text(), 15, expanded, proc, log)
        elif expanded.startswith("cpn hub"):
            until(lambda: self.get("/readyz")[0] == 200, 30, expanded, proc, log)
        else:
            m = re.search(r"sites/([a-z0-9_-]+)\.toml", expanded)
            assert m, expanded
            up = re.compile(rf'^cpn_site_up\{{[^}}]*site="{m.group(1)}"[^}}]*\}} 1(\.0)?$', re.M)
            until(lambda: bool(up.search(self.get("/metrics")[1])), 30, expanded, proc, log)

    def get(self, path: str, base: str | None = None) -> tuple[int, str]:
        url = (base or f"https://127.0.0.1:{self.ports['gateway']}") + path
        ctx = ssl.create_default_context(cafile=str(self.root / "etc/cpn/gateway.pem")) if url.startswith("https") else None
        try:
            with urllib.request.urlopen(url, timeout=3, context=ctx) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""
        except OSError:
            return 0, ""

    def output_of(self, needle: str) -> str:
        found = [out for line, out in self.outputs if needle in line]
        assert found, f"no command with {needle!r} ran"
        return found[-1]

    def log_of(self, prefix: str) -> str:
        return next(log.read_text() for cmd, _, log in self.daemons if cmd.startswith(prefix))

    def stop(self) -> None:
        for _, proc, _ in reversed(self.daemons):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _, proc, _ in self.daemons:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    for tool in ("jq", "curl", "sqlite3", "openssl"):
        if shutil.which(tool) is None:
            pytest.skip(f"the guide uses {tool} (Debian package {tool})")
    d = Deployment(tmp_path)
    try:
        yield d
    finally:
        d.stop()


def test_the_guide_deploys_a_hub_and_three_sites_that_answer_and_train(deployment: Deployment) -> None:
    start = time.monotonic()
    deployment.run(guide_blocks())

    # The three sites are up, as the operator's listing shows.
    sites = dict(line.split() for line in deployment.output_of("/v1/sites").splitlines())
    assert sites == {"sh-hub": "up", "sh-edge": "up", "hz-edge": "up"}

    # The tenant's chat request is answered.
    answer = json.loads(deployment.output_of("/v1/chat/completions"))
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"]

    # The training job ran to the end where the guide says.
    job = json.loads(deployment.output_of("jq '{state"))
    assert job["state"] == "succeeded" and job["pool"] == "sh-hub" and job["card_hours"] > 0, job

    # The backup is whole and holds the tenant.
    assert deployment.output_of("integrity_check").strip() == "ok"
    assert "acme" in deployment.output_of("cpn tenant list")

    # Two sites reached the hub's NATS through leaf servers, one with its own identity over TLS.
    monitor = f"http://127.0.0.1:{deployment.ports['monitor']}"
    leafz = json.loads(deployment.get("/leafz", monitor)[1])
    assert leafz["leafnodes"] == 2
    conns = json.loads(deployment.get("/connz?auth=true", monitor)[1])["connections"]
    users = {c.get("authorized_user") for c in conns}
    assert {"cpn-hub", "site-hz-edge"} <= users, users
    assert all(c.get("tls_version") for c in conns), conns

    # With per-site identities the hub checks inboxes; a single server gets one event replica.
    assert "event_replicas=1 strict_inboxes=True" in deployment.log_of("cpn hub")
    print(f"guide ran in {time.monotonic() - start:.1f} s")


def daemon_commands() -> set[str]:
    """The guide's daemon commands as a systemd unit would spell them (``$SITE`` is ``%i``)."""
    out = set()
    for block in guide_blocks():
        if block.lang == "sh":
            for line in logical_lines(block.text):
                line = line.replace("sudo -u cpn ", "").replace("$SITE", "%i")
                if DAEMON_RE.match(line):
                    out.add(line)
    return out


@pytest.mark.parametrize("unit", ["cpn-nats.service", "cpn-hub.service", "cpn-nats-leaf@.service", "cpn-agent@.service"])
def test_the_systemd_units_start_the_guides_commands(unit: str) -> None:
    text = (ROOT / "deploy" / "systemd" / unit).read_text()
    m = re.search(r"^ExecStart=/opt/cpn/\.venv/bin/(.*)$", text, re.M)
    assert m, unit
    assert m.group(1) in daemon_commands(), (m.group(1), daemon_commands())


def test_hub_example_toml_names_every_key_with_its_default() -> None:
    text = (ROOT / "deploy" / "hub.example.toml").read_text()
    assert msgspec.toml.decode(text.encode(), type=HubConfig) == HubConfig()
    missing = [f for f in HubConfig.__struct_fields__
               if not re.search(rf"^(# )?{f} =|^\[{f}\]", text, re.M)]
    assert not missing


def test_site_example_toml_names_every_key() -> None:
    text = (ROOT / "deploy" / "site.example.toml").read_text()
    agent_config.loads(text)
    missing = []

    def walk(struct: type, prefix: str) -> None:
        for f in struct.__struct_fields__:  # type: ignore[attr-defined]
            name = "openai-http" if f == "openai_http" else f
            if not re.search(rf'^\s*"?{re.escape(name)}"?\s*=|^\[+{re.escape(prefix + name)}[\].]', text, re.M):
                missing.append(prefix + name)

    c = agent_config
    for struct, prefix in [(c.AgentConfig, ""), (c.BusConfig, "bus."), (c.BackendConfig, "backend."),
                           (c.SimBackendConfig, "backend.sim."), (c.OpenAIHttpConfig, "backend.openai-http."),
                           (c.ModelConfig, "models."), (c.ExecutorsConfig, "executors."),
                           (c.ProcessExecutorConfig, "executors.process."),
                           (c.ContainerExecutorConfig, "executors.container."),
                           (c.SlurmExecutorConfig, "executors.slurm.")]:
        walk(struct, prefix)
    assert not missing
