"""Usage counted by a process on the replicated record survives its SIGKILL: a real process on a
real 3-node nats-server cluster (loopback) counts usage while the record has no quorum (two nodes
down), is SIGKILLed, and the record holds that usage once the process's file is opened again.

Before: the counters waited in the process's memory for the quorum (Rule 5 of store/replica.py),
and a restart rebuilt the file from the record, so they were lost.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import msgspec
import pytest

from controlplane.core.errors import RecordUnavailable
from controlplane.replicated import kv
from controlplane.replicated.bridge import RecordBridge
from controlplane.replicated.errors import RecordError
from controlplane.store import db as store_db
from controlplane.store import replica
from controlplane.store import usage as store_usage
from tests.support.natscluster import NatsCluster

pytestmark = pytest.mark.serial  # a fresh 3-node cluster, two of its nodes killed and restarted

VICTIM = """
import asyncio, sys, time
from controlplane.core.usage import UsageRow
from controlplane.replicated.bridge import RecordBridge
from controlplane.store import replica, tenants, usage

async def main():
    bridge = RecordBridge(sys.argv[2].split(","), write_deadline_s=1.0, name="victim")
    db = await replica.open_replicated(sys.argv[1], bridge, "victim")
    tenants.create_tenant(db, "acme", now=time.time())
    print("open", flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # meanwhile the test takes the quorum away
    usage.add_rows(db, [UsageRow(tenant="acme", model="m", site="s1", requests=7, prompt_tokens=70)])
    print("counted", len(db.write_hook.usage_unpublished), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def writable(urls: list[str], timeout_s: float = 60.0) -> None:
    """Until the record takes a write again (the restarted nodes caught up, a stream leader elected)."""
    async with asyncio.timeout(timeout_s):
        n = 0
        while True:
            n += 1
            try:
                record = await kv.Record.open(urls, write_deadline_s=5.0)
                try:
                    await record.create(f"probe.p{n}", b"1")
                    return
                finally:
                    await record.close()
            except RecordError:
                await asyncio.sleep(0.5)


async def test_usage_counted_without_quorum_survives_a_sigkill(tmp_path: Path, cluster: NatsCluster) -> None:
    path = tmp_path / "victim" / "hub.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", VICTIM, str(path), ",".join(cluster.urls),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        async with asyncio.timeout(60):
            assert (await proc.stdout.readline()).decode().strip() == "open"
        down = [n.name for n in cluster.nodes[1:]]
        for name in down:
            await cluster.kill(name)
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        async with asyncio.timeout(60):
            # committed locally, not acknowledged by the record (no quorum)
            assert (await proc.stdout.readline()).decode().strip() == "counted 1"
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    for name in down:
        await cluster.restart(name)
    await writable(cluster.urls)
    async with asyncio.timeout(60):
        while True:  # the restarted nodes may still be catching up the stream: try again
            try:
                db = await replica.open_replicated(str(path), RecordBridge(cluster.urls, name="again"), "victim")
                break
            except RecordUnavailable:
                await asyncio.sleep(0.5)
    try:
        assert store_usage.for_tenant(db, "acme")["totals"]["requests"] == 7
        record = await kv.Record.open(cluster.urls, create=False)
        try:
            entry = await record.get("usage.victim.acme.m.s1")
        finally:
            await record.close()
        row = msgspec.json.decode(entry.value)["row"]
        assert (row["requests"], row["prompt_tokens"]) == (7, 70)
    finally:
        store_db.close(db)
