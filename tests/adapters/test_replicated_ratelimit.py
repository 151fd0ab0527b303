"""A tenant's rate limit across gateways: two hub processes on one replicated record (a real 3-node
nats-server cluster, loopback). Each enforces 1/N of the tenant's plan, N being the gateways heard
from in the record's presence keys; before, each enforced all of it, so N gateways gave N times it.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from tests.support.hubrig import Client
from tests.support.natscluster import NatsCluster
from tests.support.recordrig import record_hub
from tests.support.waiting import until

pytestmark = pytest.mark.serial  # several hubs on a fresh 3-node cluster


async def burst_allowed(c: Client, n: int) -> int:
    statuses = [(await c.call("GET", "/v1/usage"))[0] for _ in range(n)]
    assert set(statuses) <= {200, 429}, statuses
    return statuses.count(200)


async def test_two_gateways_each_enforce_half_of_a_tenants_burst(tmp_path: Path, cluster: NatsCluster) -> None:
    a = await record_hub(tmp_path, ",".join(cluster.urls), "hub-a")
    b = await record_hub(tmp_path, ",".join(cluster.urls), "hub-b")
    try:
        # a burst of 10, refilled so slowly that nothing comes back during the test
        key = a.create_tenant("acme", rate_per_s=0.001, burst=10)
        await until(lambda: a.tenancy.gateways() == 2 and b.tenancy.gateways() == 2, 10, "both gateways counted")
        async with aiohttp.ClientSession() as session:
            at_a = Client(session, f"http://127.0.0.1:{a.http_port}", key)
            at_b = Client(session, f"http://127.0.0.1:{b.http_port}", key)
            await until(lambda: b.tenancy.tenant("acme") is not None, 5, "the tenant at B")
            allowed = await burst_allowed(at_a, 10) + await burst_allowed(at_b, 10)
        assert allowed == 10, allowed  # the tenant's burst in all, 5 at each (each alone allowed 10 before)
    finally:
        await b.stop()
        await a.stop()
