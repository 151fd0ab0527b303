"""The ``container`` executor with real podman, through a real agent and nats-server.

A tiny image (busybox-static and its applets) is imported once per module into a throwaway podman
storage root with a containers.conf of our own (runc, cgroupfs, explicit ulimits, file events).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from controlplane.nats.natsserver import NatsServer
from edge_agent import wire
from edge_agent.config import ContainerExecutorConfig
from edge_agent.executors.container import ContainerExecutor, image_allowed, pick_cards
from tests.support.engines import needs
from tests.support.fakehub import FakeHub, agent_config, exit_event, running, wait_for
from tests.support.sandboxbait import planted

IMAGE = "localhost/tiny:1"
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""

real_podman = needs("podman", "runc", "busybox", package="podman runc busybox-static")
# One worker runs the whole module (``make test`` runs the suite on several): one throwaway podman
# store and image import, not one per worker.
pytestmark = pytest.mark.xdist_group("podman")


@pytest.fixture(scope="module")
def podman_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The ``executors.container`` table of a site whose podman holds ``localhost/tiny:1``."""
    root = tmp_path_factory.mktemp("podman")
    # podman refuses a runroot longer than 50 characters, which pytest's temp paths can exceed (a
    # worker's adds "popen-gwN/"): the runroot gets a short directory of its own. Its per-boot state
    # and locks go there too (by default /run/libpod and /dev/shm, shared with every other podman on
    # the machine: another test run's `podman system reset` wiped them under this one's containers).
    runroot = Path(tempfile.mkdtemp(prefix="cpn-podrun-"))
    conf = root / "containers.conf"
    conf.write_text(CONTAINERS_CONF + f'tmp_dir = "{runroot / "libpod"}"\nlock_type = "file"\n')
    rootfs = root / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    busybox = shutil.which("busybox")
    assert busybox is not None
    shutil.copy(busybox, rootfs / "bin" / "busybox")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (rootfs / "bin" / applet).symlink_to("busybox")
    table: dict[str, Any] = {"containers_conf": str(conf), "root": str(root / "storage"),
                             "runroot": str(runroot / "run"), "podman_args": ["--storage-driver", "overlay"]}
    base = ["podman", "--root", table["root"], "--runroot", table["runroot"], "--storage-driver", "overlay"]
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    with subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE) as tar:
        subprocess.run([*base, "import", "--change", "ENV PATH=/bin", "-", IMAGE], stdin=tar.stdout, env=env,
                       check=True, capture_output=True)
    assert tar.returncode == 0
    yield {"images": ["localhost/tiny:*"], "grace_s": 2.0, "memory_mib_per_card": 64, "cpus_per_card": 0.5,
           "pids_limit": 64, **table}
    subprocess.run([*base, "rm", "--all", "--force"], env=env, capture_output=True)
    subprocess.run([*base, "rmi", "--all", "--force"], env=env, capture_output=True)
    subprocess.run([*base, "system", "reset", "--force"], env=env, capture_output=True)
    shutil.rmtree(runroot, ignore_errors=True)


def _site(url: str, data: Path, table: dict[str, Any], **extra: Any) -> Any:
    return agent_config(url, data_dir=str(data), executors={"enabled": ["container"], "container": {**table, **extra}})


def _start(job: str, script: str = "", *, image: str = IMAGE, cards: int = 1, attempt: int = 1) -> wire.StartAttempt:
    return wire.StartAttempt(job=job, attempt=attempt, cards=cards, accelerator="H20", executor="container",
                             image=image, command=["sh", "-c", script] if script else [])


# --------------------------------------------------------------------------- pure parts


def test_image_allow_list_matches_exact_references_and_star_prefixes() -> None:
    allowed = ["localhost/*", "registry.example/team/train:1"]
    assert image_allowed("localhost/tiny:1", allowed) and image_allowed("registry.example/team/train:1", allowed)
    for image in ("registry.example/team/train:2", "docker.io/library/alpine", "tiny:1", "-v/:/host",
                  "localhost/../x", "localhost/a b", ""):
        assert not image_allowed(image, allowed), image
    assert not image_allowed("localhost/tiny:1", [])


def test_cards_get_the_lowest_free_indices() -> None:
    assert pick_cards(4, set(), 2) == [0, 1]
    assert pick_cards(4, {0, 2}, 2) == [1, 3]
    assert pick_cards(4, {0, 1, 2}, 2) is None


def test_devices_are_passed_only_for_the_cards_given(tmp_path: Path) -> None:
    cfg = msgspec.convert({"images": ["localhost/*"], "devices": {"H20": {
        "per_card": "/dev/nvidia{index}", "shared": ["/dev/nvidiactl", "/dev/nvidia-uvm"]}}}, ContainerExecutorConfig)
    ex = ContainerExecutor(cfg, tmp_path, "edge-a", {"H20": 8, "910B": 4})
    argv = ex.run_argv(_start("j", "true", cards=2), indices=[3, 5], progress=0.0)
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "--device"]
    assert devices == ["/dev/nvidia3", "/dev/nvidia5", "/dev/nvidiactl", "/dev/nvidia-uvm"]
    assert not any(a.startswith("/dev/") for i, a in enumerate(argv) if argv[i - 1] != "--device")
    assert "CPN_CARDS=3,5" in argv
    other = ex.run_argv(wire.StartAttempt(job="k", attempt=1, cards=1, accelerator="910B", executor="container",
                                          image="localhost/x:1"), indices=[0], progress=0.0)
    assert "--device" not in other  # no device map for 910B: no device at all
    for flag, value in (("--network", "none"), ("--user", "65534:65534"), ("--cap-drop", "all"),
                        ("--security-opt", "no-new-privileges"), ("--pull", "never"), ("--memory", "32768m"),
                        ("--pids-limit", "1024")):
        assert argv[argv.index(flag) + 1] == value, flag
    assert "--read-only" in argv and "--rm" in argv and argv[argv.index("--name") + 1] == "cpn-edge-a-j-1"
    assert argv[-4:] == ["localhost/tiny:1", "sh", "-c", "true"]


# --------------------------------------------------------------------------- real podman


@real_podman
async def test_an_image_off_the_allow_list_is_refused(nats_server: NatsServer, tmp_path: Path,
                                                      podman_site: dict[str, Any]) -> None:
    async with FakeHub(nats_server.url) as hub:
        async with running(_site(nats_server.url, tmp_path / "a", podman_site)) as agent:
            for image, why in (("docker.io/library/alpine:3", "image 'docker.io/library/alpine:3' is not allowed "
                                "at this site (allowed: localhost/tiny:*)"),
                               ("", "StartAttempt.image is empty")):
                reply = await hub.command("edge-a", _start("deny", "id", image=image))
                assert isinstance(reply, wire.ErrorReply) and reply.code == "not_allowed", reply
                assert why in reply.message
            assert not agent.training.attempts and agent.inventory.free_cards()["H20"] == 3.5


@real_podman
async def test_runs_as_non_root_on_a_read_only_image_writing_only_its_checkpoint_dir(
        nats_server: NatsServer, tmp_path: Path, podman_site: dict[str, Any]) -> None:
    data = tmp_path / "agent"
    script = ('cd "$CPN_CHECKPOINT_DIR"; id -u > uid; (touch /bin/evil 2>/dev/null && echo rw || echo ro) > rootfs; '
              'echo "$CPN_JOB_ID $CPN_ATTEMPT $CPN_RESUME_FROM $CPN_PROGRESS_START" > env; '
              'echo CPN_PROGRESS 0.2; echo CPN_CHECKPOINT uid 0.5; echo "$CPN_CHECKPOINT_DIR/env" >&2; exit 0')
    async with FakeHub(nats_server.url) as hub:
        await hub.create_stream()
        async with running(_site(nats_server.url, data, podman_site)):
            cmd = wire.StartAttempt(job="who", attempt=2, cards=1, accelerator="H20", executor="container",
                                    image=IMAGE, command=["sh", "-c", script], resume_from="/cpn/checkpoint/old",
                                    progress=0.25)
            exited, events = await hub.run_attempt("edge-a", cmd, timeout_s=20)
    assert exited.reason == "completed" and exited.exit_code == 0, exited
    ck = data / "checkpoints" / "who"
    assert (ck / "uid").read_text().strip() == "65534" and (ck / "uid").stat().st_uid == 65534
    assert (ck / "rootfs").read_text().strip() == "ro"
    assert (ck / "env").read_text().split() == ["who", "2", "/cpn/checkpoint/old", "0.25"]
    checkpoints = [(e.event.checkpoint, e.event.progress) for e in events if isinstance(e.event, wire.Checkpointed)]
    assert checkpoints == [("/cpn/checkpoint/uid", 0.5)]  # as the job sees it: what a resume gets


@real_podman
async def test_no_host_network_and_none_of_the_agents_files(nats_server: NatsServer, tmp_path: Path,
                                                            podman_site: dict[str, Any]) -> None:
    data = tmp_path / "agent"
    async with planted(data) as bait, FakeHub(nats_server.url) as hub:
        script = (f'cd "$CPN_CHECKPOINT_DIR"; (echo hi | nc -w 2 127.0.0.1 {bait.port} && echo reached || echo refused) > net; '
                  'ls /sys/class/net > ifaces; '
                  f'(cat {bait.creds} 2>&1 || true) > creds; (ls {bait.other} 2>&1 || true) > other; ls -a /cpn > mounts')
        await hub.create_stream()
        async with running(_site(nats_server.url, data, podman_site)):
            exited, _ = await hub.run_attempt("edge-a", _start("nosy", script), timeout_s=20)
    assert exited.reason == "completed", exited
    ck = data / "checkpoints" / "nosy"
    assert (ck / "net").read_text().strip() == "refused" and bait.connections == 0
    assert (ck / "ifaces").read_text().split() == ["lo"]
    assert "No such file or directory" in (ck / "creds").read_text()
    assert "No such file or directory" in (ck / "other").read_text()
    assert (ck / "mounts").read_text().split() == [".", "..", "checkpoint"]


@real_podman
async def test_killed_at_its_memory_limit_with_a_clear_user_error(nats_server: NatsServer, tmp_path: Path,
                                                                  podman_site: dict[str, Any]) -> None:
    hog = 'echo CPN_PROGRESS 0.1; x=$(head -c 200000000 /dev/zero | tr "\\0" a); echo survived ${#x}'
    async with FakeHub(nats_server.url) as hub:
        await hub.create_stream()
        async with running(_site(nats_server.url, tmp_path / "a", podman_site)):
            exited, _ = await hub.run_attempt("edge-a", _start("hog", hog), timeout_s=20)
    assert exited.reason == "user_error" and exited.exit_code == 137, exited
    assert exited.detail.startswith("killed: memory limit 64 MiB exceeded (out of memory, exit code 137)"), exited.detail
    assert not (tmp_path / "a" / "containers" / "cpn-edge-a-hog-1").exists()
    assert not Path("oom").exists()  # conmon's marker stays in the attempt's own scratch dir
    assert exited.progress == 0.1


@real_podman
async def test_a_failing_job_and_a_stopped_one(nats_server: NatsServer, tmp_path: Path,
                                               podman_site: dict[str, Any]) -> None:
    hang = ("trap 'echo CPN_CHECKPOINT final.ckpt 0.4; exit 0' TERM; echo CPN_PROGRESS 0.1; "
            "while true; do sleep 0.05; done")
    async with FakeHub(nats_server.url) as hub:
        await hub.create_stream()
        # A grace well past what the trap needs: at the module's 2 s, a loaded machine (the suite on
        # four workers) killed the container before its trap ran (exit -9, no final checkpoint).
        async with running(_site(nats_server.url, tmp_path / "a", podman_site, grace_s=15.0)) as agent:
            failed, _ = await hub.run_attempt("edge-a", _start("bad", "echo 'loss is nan' >&2; exit 3"), timeout_s=20)
            assert failed.reason == "user_error" and failed.exit_code == 3
            assert failed.detail == "exit code 3; stderr:\nloss is nan"

            assert isinstance(await hub.command("edge-a", _start("long", hang)), wire.Ack)
            await hub.wait_heartbeat("edge-a", lambda hb: any(a.job == "long" and a.progress == 0.1 for a in hb.attempts),
                                     what="the trap in place")
            assert isinstance(await hub.command("edge-a", wire.StopAttempt(job="long", attempt=1)), wire.Ack)
            events = await hub.wait_events(lambda ev: exit_event(ev, "long") is not None, what="the stop")
            stopped = exit_event(events, "long")
            assert stopped is not None and stopped.reason == "stopped", stopped
            final = [e.event for e in events if e.event.job == "long" and isinstance(e.event, wire.Checkpointed)]
            assert [(c.checkpoint, c.progress) for c in final] == [("/cpn/checkpoint/final.ckpt", 0.4)], stopped
            assert not agent.training.attempts


@real_podman
async def test_an_agent_stopping_ends_its_containers_as_infra_failure(nats_server: NatsServer, tmp_path: Path,
                                                                      podman_site: dict[str, Any]) -> None:
    loop = "trap 'exit 0' TERM; echo CPN_PROGRESS 0.3; while true; do sleep 0.05; done"
    async with FakeHub(nats_server.url) as hub:
        await hub.create_stream()
        async with running(_site(nats_server.url, tmp_path / "a", podman_site)) as agent:
            assert isinstance(await hub.command("edge-a", _start("left", loop, attempt=4)), wire.Ack)
            await hub.wait_heartbeat("edge-a", lambda hb: any(a.job == "left" for a in hb.attempts), what="running")
            executor = agent.training.executors["container"]
            await agent.stop(drain=True)
        events = await hub.stream_events()
    exited = exit_event(events, "left")
    assert exited is not None and exited.reason == "infra_failure" and exited.progress == 0.3, exited
    code, _ = await executor.podman("container", "exists", "cpn-edge-a-left-4")  # type: ignore[attr-defined]
    assert code == 1  # removed (--rm): nothing left holding the cards


async def test_without_podman_every_attempt_is_refused(nats_server: NatsServer, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    cfg = _site(nats_server.url, tmp_path / "a", {"images": ["localhost/*"], "podman": "/nonexistent/podman"})
    async with FakeHub(nats_server.url) as hub:
        async with running(cfg):
            assert "executor_unavailable" in caplog.text
            reply = await hub.command("edge-a", _start("nopod", "id"))
    assert isinstance(reply, wire.ErrorReply) and reply.code == "not_allowed", reply
    assert "podman ('/nonexistent/podman') is not installed" in reply.message


@real_podman
async def test_only_the_given_cards_devices_appear(nats_server: NatsServer, tmp_path: Path,
                                                   podman_site: dict[str, Any]) -> None:
    """Loop devices stand in for accelerator nodes (this machine has no GPU)."""
    if not all(Path(f"/dev/loop{i}").exists() for i in range(4)):
        pytest.skip("needs /dev/loop0..3 to stand in for cards")
    data = tmp_path / "agent"
    table = {**podman_site, "devices": {"H20": {"per_card": "/dev/loop{index}"}}}
    script = ('trap "exit 0" TERM; ls /dev > "$CPN_CHECKPOINT_DIR/dev"; echo "$CPN_CARDS" > "$CPN_CHECKPOINT_DIR/cards"; '
              'while true; do sleep 0.05; done')
    async with FakeHub(nats_server.url) as hub:
        await hub.create_stream()
        async with running(_site(nats_server.url, data, table)) as agent:
            assert isinstance(await hub.command("edge-a", _start("one", script)), wire.Ack)
            assert isinstance(await hub.command("edge-a", _start("two", script, cards=2)), wire.Ack)
            for job in ("one", "two"):
                cards = data / "checkpoints" / job / "cards"
                await wait_for(lambda f=cards: f.exists() and f.read_text().strip() != "", 20,
                               what=f"{job} listed its devices")
            await asyncio.gather(*(a.stop() for a in list(agent.training.attempts.values())))
    seen = {job: [d for d in (data / "checkpoints" / job / "dev").read_text().split() if d.startswith("loop")]
            for job in ("one", "two")}
    assert seen == {"one": ["loop0"], "two": ["loop1", "loop2"]}
    assert (data / "checkpoints" / "two" / "cards").read_text().strip() == "1,2"
