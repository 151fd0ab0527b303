"""A real single-node Slurm (munged + slurmctld + slurmd) run entirely from a temp dir, for tests.

Nothing under /etc is read or written: the clients and daemons find the config through
``SLURM_CONF``, munged keeps its key, socket, pid and log in the same dir. Ports are picked at
start (bind port 0, release: Slurm cannot listen on port 0 itself), the cluster name is unique per
instance, and ``stop()`` ends every daemon it started (by pid) and the jobs slurmd ran.
The daemons need root.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.support.waiting import until_blocking

CONF = """\
ClusterName={cluster}
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.sock
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.txt
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=1
MinJobAge=300
SchedulerParameters=sched_interval=1
NodeName=localhost CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def free_port() -> int:
    """A port free right now (bind 0, release): the accepted way for daemons that cannot take 0."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SlurmCluster:
    """One munged + slurmctld + slurmd under ``root``; ``conf`` is the ``SLURM_CONF`` clients need."""

    def __init__(self, root: Path, *, cpus: int = 2) -> None:
        self.root = root
        self.cpus = cpus
        self.conf = root / "slurm.conf"
        self.cluster = "cpn" + secrets.token_hex(4)
        self.jobcomp = root / "jobcomp.txt"
        self._procs: list[subprocess.Popen[bytes]] = []

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=30, check=check)

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.root / f"{name}.out", "wb")  # noqa: SIM115 - closed with the process
        try:
            proc = subprocess.Popen(list(args), env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        self._procs.append(proc)

    def start(self, timeout_s: float = 30.0) -> None:
        root = self.root
        for sub in ("state", "spool", "munge"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)
        os.chmod(root / "munge", 0o755)  # munged refuses a socket dir others cannot traverse
        key = root / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        os.chmod(key, 0o400)
        self.conf.write_text(CONF.format(cluster=self.cluster, root=root, ctld_port=free_port(),
                                         d_port=free_port(), cpus=self.cpus))
        m = root / "munge"
        self._spawn("munged", "munged", "-F", "-f", f"--socket={m}/munge.sock", f"--key-file={key}",
                    f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed")
        self._wait(lambda: (m / "munge.sock").exists(), timeout_s, "munged's socket")
        self._spawn("slurmctld", "slurmctld", "-D", "-i", "-f", str(self.conf))
        self._spawn("slurmd", "slurmd", "-D", "-N", "localhost", "-f", str(self.conf))
        self._wait(self._node_idle, timeout_s, "the node to be idle")

    def _node_idle(self) -> bool:
        for proc in self._procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}; see {self.root}/*.log")
        out = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def _wait(self, ready: Callable[[], object], timeout_s: float, what: str) -> None:
        try:
            until_blocking(ready, timeout_s, what, interval_s=0.1)
        except AssertionError as exc:
            self.stop()
            raise RuntimeError(f"{exc}; logs in {self.root}") from None

    def squeue_ids(self) -> list[str]:
        """Ids of jobs Slurm still has pending or running."""
        out = self.run("squeue", "-h", "-o", "%i")
        return out.stdout.split()

    def stop(self) -> None:
        """Cancel what still runs, then end slurmd, slurmctld and munged (by pid), waiting for each."""
        if any(p.poll() is None for p in self._procs[1:]):
            self.run("scancel", "--full", "--user=root", check=False)
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        self._procs.clear()
        self._reap_stepds()

    def _ours(self) -> list[int]:
        """Live processes started under this cluster's config (slurmstepd detaches from slurmd)."""
        mark = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if mark in (entry / "environ").read_bytes().split(b"\0") and \
                        (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    pids.append(int(entry.name))
            except (OSError, IndexError):
                continue
        return pids

    def _reap_stepds(self, timeout_s: float = 10.0) -> None:
        with contextlib.suppress(AssertionError):  # those still there after the wait are killed below
            until_blocking(lambda: not self._ours(), timeout_s, "slurmstepd to leave", interval_s=0.1)
        for pid in self._ours():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
