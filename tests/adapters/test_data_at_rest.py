"""Data at rest: every directory and file the hub, its nats-server and an agent write is 0700 / 0600,
whatever the umask they were started with; looser ones found at start are tightened and logged.

Closes the row "files: hub.db, its WAL and the JetStream store are world-readable": with umask 022
the old code left hub.db, hub.db-wal, hub.db-shm and the JetStream tree 0644/0755.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from controlplane.nats.natsserver import NatsServer
from edge_agent import private_files
from tests.support.hubrig import DEMO3, Client, hub_config, running_hub


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def loose(root: Path) -> list[str]:
    """Everything under ``root`` (root included) with group/other bits, or not 0700/0600 exactly."""
    bad = []
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        want = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
        if stat.S_IMODE(st.st_mode) != want:
            bad.append(f"{path.relative_to(root)} {stat.S_IMODE(st.st_mode):o}")
    return bad


async def test_hub_store_and_jetstream_private_under_umask_022(tmp_path: Path) -> None:
    data = tmp_path / "data" / "hub"  # neither exists: the hub creates both
    with umask(0o022):
        nats = NatsServer(data / "jetstream")
        await nats.start()
        try:
            async with running_hub(hub_config(tmp_path, nats.url, db_path=str(data / "hub.db"))) as hub:
                admin = hub.create_admin_key("t")
                async with aiohttp.ClientSession() as session:
                    client = Client(session, f"http://127.0.0.1:{hub.http_port}", admin)
                    status, _, _ = await client.call("POST", "/v1/tenants", {"id": "acme"})
                    assert status == 201
                names = {p.name for p in data.iterdir()}
                assert {"hub.db", "hub.db-wal", "hub.db-shm", "jetstream"} <= names, names
                streams = list((data / "jetstream").rglob("*"))
                assert any(p.is_file() for p in streams), "JetStream wrote no files: the test would prove nothing"
                assert loose(data) == []
                assert loose(tmp_path / "data") == []
        finally:
            await nats.stop()


async def test_looser_files_found_at_start_are_tightened_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    js = data / "jetstream" / "old"
    with umask(0o022):
        js.mkdir(parents=True)
        (js / "blk").write_bytes(b"x")
        (data / "hub.db").touch()
        (data / "hub.db-wal").touch()
        os.chmod(data / "hub.db", 0o644)
        os.chmod(data / "jetstream", 0o755)
        assert loose(data / "jetstream") and stat.S_IMODE((data / "hub.db").stat().st_mode) == 0o644
        caplog.set_level(logging.WARNING, logger="cpn.files")
        nats = NatsServer(data / "jetstream")
        await nats.start()
        try:
            async with running_hub(hub_config(tmp_path, nats.url, db_path=str(data / "hub.db"))):
                assert loose(data / "jetstream") == []
                for name in ("hub.db", "hub.db-wal", "hub.db-shm"):
                    assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
        finally:
            await nats.stop()
    logged = caplog.text
    for path in (data / "hub.db", data / "hub.db-wal", data / "jetstream", js / "blk"):
        assert f"event=tightened_mode path={path} " in logged, path


def test_db_next_to_the_users_files_leaves_their_directory_alone(tmp_path: Path) -> None:
    from controlplane.store import db as store_db

    os.chmod(tmp_path, 0o755)
    with umask(0o022):
        db = store_db.open_db(tmp_path / "hub.db")
        db.execute("CREATE TABLE t (x)")
        assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755  # maybe the user's cwd: not ours to change
        for name in ("hub.db", "hub.db-wal", "hub.db-shm"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
        db.conn.close()


def test_agent_data_dir_and_outbox_private(tmp_path: Path) -> None:
    from edge_agent import wire
    from edge_agent.agent import Agent
    from edge_agent.config import AgentConfig

    fresh, old = tmp_path / "agents" / "fresh", tmp_path / "agents" / "old"
    with umask(0o022):
        old.mkdir(parents=True)
        os.chmod(tmp_path / "agents", 0o700)
        for data in (fresh, old):
            agent = Agent(AgentConfig(site="site-a", nats="nats://127.0.0.1:1", data_dir=str(data)))
            agent.outbox.add(wire.AttemptStarted(site="site-a", job="j", attempt=1, seq=1, at=1.0))
            agent.outbox.ack(agent.outbox.peek().msg_id)  # type: ignore[union-attr]  # rewrites the journal
            agent.outbox.add(wire.AttemptStarted(site="site-a", job="j", attempt=2, seq=1, at=1.0))
        assert (old / "outbox.jsonl").exists()
        assert loose(tmp_path / "agents") == []


def test_write_private_replaces_atomically_with_0600(tmp_path: Path) -> None:
    target = tmp_path / "creds.json"
    with umask(0o000):
        target.write_text("old")
        os.chmod(target, 0o666)
        (tmp_path / "creds.json.tmp").write_text("stale")
        os.chmod(tmp_path / "creds.json.tmp", 0o666)
        private_files.write_private(target, "new")
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert not (tmp_path / "creds.json.tmp").exists()


def test_cpn_up_started_with_umask_022_writes_nothing_readable_by_others(tmp_path: Path) -> None:
    """The real ``cpn up`` (hub, nats-server, three simulated agents) as a user starts it."""
    data = tmp_path / "cpn"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    (data / "notes.txt").write_text("left by an older version")
    os.chmod(data / "notes.txt", 0o644)
    proc = subprocess.Popen(
        [sys.executable, "-m", "controlplane.cli", "up", "--data-dir", str(data), "--port", "0", "--nats-port", "0",
         "--layout", str(DEMO3)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "CPN_LOG": "WARNING"},
        preexec_fn=lambda: os.umask(0o022),
    )
    try:
        assert proc.stdout is not None
        started = time.monotonic()
        for line in proc.stdout:
            if "Ctrl-C" in line:
                break
            assert time.monotonic() - started < 90, "no banner"
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        names = {p.relative_to(data).as_posix() for p in data.rglob("*")}
        for must in ("hub.db", "hub.db-wal", "hub.db-shm", "jetstream", "demo-credentials.json", "nats-secret",
                     "nats-server.conf", "agents"):
            assert must in names, (must, sorted(names))
        assert sum(n.startswith("agents/") and n.count("/") == 1 for n in names) == 4, sorted(names)  # one per site
        assert any(n.startswith("jetstream/") and (data / n).is_file() for n in names), "no JetStream files"
        assert loose(data) == []
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert re.search(rf"event=tightened_mode path={re.escape(str(data / 'notes.txt'))} from=644 to=600", err), err[-2000:]
    assert re.search(rf"event=tightened_mode path={re.escape(str(data))} from=755 to=700", err), err[-2000:]
