"""The leader lease on a real 3-node nats-server cluster: in-process electors, then candidate
processes that are SIGKILLed or SIGSTOPped (tests/support/leasecandidate.py).

What these prove: one leader at a time; its epoch is the fence's revision and grows on every
takeover; after the leader's SIGKILL another process leads within 5 s; a leader frozen past its
lease learns on waking that it lost, and what it then commits with its old epoch never lands.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from controlplane.replicated import kv
from controlplane.replicated.errors import Fenced, NotFound
from controlplane.replicated.lease import LeaderElector
from controlplane.replicated.lease_rules import LeaseConfig
from tests.support.fakehub import wait_for
from tests.support.natscluster import NatsCluster, open_record
from tests.support.waiting import until

ROOT = Path(__file__).resolve().parents[2]
FAST = LeaseConfig(lease_duration_s=1.5, renew_deadline_s=1.0, retry_period_s=0.2, holder_silent_s=0)


# A clean handover must beat a full lease by a margin that holds on a loaded 2-core machine (three
# JetStream R3 commits take a while there): a longer lease than FAST, the same retry period.
HANDOVER = LeaseConfig(lease_duration_s=3.0, renew_deadline_s=2.0, retry_period_s=0.2, holder_silent_s=1.5)


async def test_one_leader_then_a_clean_handover(cluster: NatsCluster) -> None:
    records = [await open_record(cluster.urls) for _ in range(2)]
    events: list[tuple[str, str, object]] = []

    def elector(i: int) -> LeaderElector:
        name = f"p{i}"
        return LeaderElector(records[i], "controller", name, HANDOVER,
                             on_started_leading=lambda epoch: events.append((name, "leading", epoch)),
                             on_stopped_leading=lambda reason: events.append((name, "stopped", reason)))

    a, b = elector(0), elector(1)
    try:
        a.start()
        await wait_for(a.is_leading, 5, "p0 to lead")
        b.start()

        async def renewals() -> int:
            return int(json.loads((await records[0].get("sys.lease.controller")).value)["renewals"])

        # p0 renews (at most once per retry period), so p1 never gets in: wait for enough renewals
        # to span more than a full lease, rather than a fixed while.
        first = await renewals()
        span = int(HANDOVER.lease_duration_s / HANDOVER.retry_period_s) + 1
        async def spanned() -> bool:
            return await renewals() >= first + span

        await until(spanned, 4 * HANDOVER.lease_duration_s, "p0 renewing past a lease", interval_s=0.1)
        assert a.is_leading() and not b.is_leading() and b.fence is None
        epoch_a = a.epoch
        assert epoch_a == (await records[0].get("sys.fence.controller")).revision
        lease = json.loads((await records[0].get("sys.lease.controller")).value)
        assert lease["holder"] == "p0" and lease["epoch"] == epoch_a and lease["renewals"] >= 3
        fence_a = a.fence
        assert fence_a is not None
        await records[0].commit([kv.Write("job.by-a", b"1", 0)], fence=fence_a)

        t0 = time.monotonic()
        await a.stop(release=True)  # a clean stop hands over without waiting out the lease
        await wait_for(b.is_leading, 5, "p1 to lead")
        assert time.monotonic() - t0 < HANDOVER.lease_duration_s
        assert b.epoch > epoch_a
        with pytest.raises(Fenced):
            await records[0].commit([kv.Write("job.by-a-late", b"1", 0)], fence=fence_a)
        with pytest.raises(NotFound):
            await records[0].get("job.by-a-late")
        assert [e[:2] for e in events] == [("p0", "leading"), ("p0", "stopped"), ("p1", "leading")]
    finally:
        await a.stop()
        await b.stop()
        for r in records:
            await r.close()


async def test_leader_that_cannot_reach_a_quorum_stops_by_its_deadline(cluster: NatsCluster) -> None:
    record = await open_record(cluster.urls, timeout_s=0.5)
    stopped: list[float] = []
    a = LeaderElector(record, "controller", "lonely", FAST, on_stopped_leading=lambda r: stopped.append(time.monotonic()))
    try:
        a.start()
        await wait_for(a.is_leading, 5, "lonely to lead")
        for node in cluster.nodes[1:]:
            await cluster.kill(node.name)
        await cluster.kill(cluster.nodes[0].name)
        t0 = time.monotonic()
        await wait_for(lambda: stopped, 5, "the leader to stop")
        # it stops within its renew deadline of the last renewal, well before anyone's lease ends
        assert stopped[0] - t0 <= FAST.renew_deadline_s + 0.3
        assert not a.is_leading() and a.fence is None
    finally:
        await a.stop(release=False)
        await record.close()


class Candidate:
    """One leasecandidate process and the JSON lines it printed."""

    def __init__(self, identity: str, proc: asyncio.subprocess.Process) -> None:
        self.identity = identity
        self.proc = proc
        self.lines: list[dict[str, Any]] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            try:
                self.lines.append(json.loads(raw))
            except ValueError:
                pass

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == kind]

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    async def end(self) -> None:
        if self.proc.returncode is None:
            try:
                self.proc.send_signal(signal.SIGCONT)
                self.proc.kill()
            except ProcessLookupError:
                pass
        await self.proc.wait()
        await self.reader
        transport = getattr(self.proc, "_transport", None)
        if transport is not None:
            transport.close()


async def spawn(cluster: NatsCluster, identity: str, config: LeaseConfig) -> Candidate:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.support.leasecandidate", "--servers", ",".join(cluster.urls),
        "--identity", identity, "--lease", str(config.lease_duration_s), "--renew", str(config.renew_deadline_s),
        "--retry", str(config.retry_period_s), "--silent", str(config.holder_silent_s), cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return Candidate(identity, proc)


def leaders(candidates: list[Candidate]) -> list[tuple[float, Candidate, int]]:
    return sorted((e["t"], c, e["epoch"]) for c in candidates for e in c.events("leading"))


@pytest.mark.timeout(90)
async def test_leader_sigkill_another_process_leads_within_5s(cluster: NatsCluster) -> None:
    config = LeaseConfig()  # the defaults: 15 / 12 / 0.4 s, a silent holder taken over after 2 s
    candidates = [await spawn(cluster, f"c{i}", config) for i in range(3)]
    try:
        await wait_for(lambda: all(c.events("ready") for c in candidates), 40, "candidates to connect")
        await wait_for(lambda: leaders(candidates), 10, "a first leader")
        takeovers = []
        for _ in range(2):
            _, old, old_epoch = leaders(candidates)[-1]
            await asyncio.sleep(1.0)  # the fault's timing, not a wait: the leader renews a while before its SIGKILL
            killed_at = time.time()
            old.signal(signal.SIGKILL)
            await wait_for(lambda: leaders(candidates)[-1][1] is not old, 10, "another leader")
            at, new, epoch = leaders(candidates)[-1]
            takeovers.append(at - killed_at)
            assert epoch > old_epoch
        print(f"takeover after leader SIGKILL: {[round(t, 2) for t in takeovers]} s")
        assert max(takeovers) <= 5.0
        # every leader's term had one epoch each, and epochs only grew
        epochs = [e for _, _, e in leaders(candidates)]
        assert epochs == sorted(set(epochs))
    finally:
        for c in candidates:
            await c.end()


@pytest.mark.timeout(90)
async def test_paused_leader_wakes_up_fenced(cluster: NatsCluster) -> None:
    """The defaults: the frozen leader is taken over early (it answers no probe), long before its
    own 12 s renew deadline, so it wakes believing it holds the lease: its renewal and its commits
    find out (Conflict, Fenced) and nothing it writes lands."""
    config = LeaseConfig()
    first = await spawn(cluster, "old", config)
    try:
        await wait_for(lambda: first.events("leading"), 20, "the first leader")
        second = await spawn(cluster, "new", config)
        try:
            await wait_for(lambda: second.events("ready"), 20, "the second candidate")
            await asyncio.sleep(0.5)  # the fault's timing: both campaign a while before the leader freezes
            first.signal(signal.SIGSTOP)  # frozen while leading: its own timer cannot run
            frozen_at = time.time()
            await wait_for(lambda: second.events("leading"), 10, "the second to take over")
            assert second.events("leading")[0]["t"] - frozen_at <= 5.0
            new_epoch = second.events("leading")[0]["epoch"]
            assert new_epoch > first.events("leading")[0]["epoch"]
            await asyncio.sleep(0.5)  # the fault's timing: the new leader works on a while before the old wakes
            first.signal(signal.SIGCONT)
            stopped = await wait_for(lambda: first.events("stopped"), 5, "the old leader to see it lost")
            assert stopped[0]["stale_write"] == "fenced", stopped
            record = await kv.Record.open(cluster.urls)
            try:
                with pytest.raises(NotFound):
                    await record.get("job.stale-old")
                # nothing the old leader committed landed after the new epoch began
                try:
                    assert (await record.get("job.tick-old")).revision < new_epoch
                except NotFound:
                    pass
                assert (await record.get("job.tick-new")).revision > new_epoch  # the new one works on
            finally:
                await record.close()
            assert not second.events("stopped")
        finally:
            await second.end()
    finally:
        await first.end()


@pytest.mark.serial
@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["kill", "pause"])
async def test_the_leader_rides_out_a_fault_of_the_node_leading_the_record_stream(cluster: NatsCluster,
                                                                                  fault: str) -> None:
    """The defaults, and the worst case: the leader's own connection is on the node that leads the
    record's stream, which is killed (or frozen) while a candidate campaigns from another node.
    Nothing can be written until the stream elects a new leader (nats-server: 4-9 s), so the
    leader's renewals wait; it keeps the lease (it answers the candidate's probes once reconnected)
    and decides again as soon as a renewal lands: same epoch, one term, nobody else acquired.
    Before: the leader stepped down at its 2 s renew deadline and a candidate took over."""
    probe = await open_record(cluster.urls)
    try:
        (stream_leader,) = [n.name for n in await probe.nodes() if n.leader]
        others = [n for n in cluster.nodes if n.name != stream_leader]
        record_a = await kv.Record.open([cluster.node(stream_leader).url] + [n.url for n in others],
                                        connect={"dont_randomize": True})
        record_b = await kv.Record.open([n.url for n in others], connect={"dont_randomize": True})
        watch = await kv.Record.open([others[-1].url, others[0].url], connect={"dont_randomize": True})
    finally:
        await probe.close()
    a = LeaderElector(record_a, "controller", "a", LeaseConfig())
    b = LeaderElector(record_b, "controller", "b", LeaseConfig())
    try:
        a.start()
        await wait_for(a.may_decide, 10, "a to lead")
        epoch = a.epoch
        b.start()
        await wait_for(lambda: b.probes >= 3 and b.probes_unanswered == 0, 10, "b to probe a (answered)")
        t0 = time.monotonic()
        if fault == "kill":
            await cluster.kill(stream_leader)
        else:
            await cluster.pause(stream_leader)
        undecided: list[float] = []

        async def decides_again() -> bool:
            if not a.may_decide():
                undecided.append(time.monotonic())
            assert a.is_leading() and not b.is_leading(), (a, b)  # sampled all along the fault
            return bool(undecided) and a.may_decide()

        await until(decides_again, 30, "a to decide again (a renewal landed)", interval_s=0.05)
        recovered_s = time.monotonic() - t0
        new_leaders = [n.name for n in await watch.nodes() if n.leader]
        if fault == "kill":
            await cluster.restart(stream_leader)
        else:
            await cluster.resume(stream_leader)
        await asyncio.sleep(1.0)  # the fault's aftermath: the node rejoins while a leads on
        print(f"{fault} of the stream's leader node: a held back its decisions {undecided[-1] - undecided[0]:.2f} s, "
              f"decided again {recovered_s:.2f} s after the fault (stream leader now {new_leaders}); {b!r}")
        assert a.may_decide() and a.epoch == epoch and a.terms == 1
        assert b.terms == 0 and b.early_takeovers == 0 and not b.is_leading()
        assert (await watch.get("sys.fence.controller")).revision == epoch  # nobody acquired
        assert new_leaders and new_leaders != [stream_leader]  # the fault did move the stream
    finally:
        await a.stop(release=False)
        await b.stop(release=False)
        for r in (record_a, record_b, watch):
            await r.close()
