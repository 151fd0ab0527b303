"""A separate ``cpn gateway`` process's request counts reach the ``cpn controller`` that decides
(real 3-node nats-server cluster, the replicated record, two processes built by the composition
root). Before, a controller's autoscaler saw only the requests it served itself: none."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.config import AutoscaleConfig
from controlplane.services.demand_share import DemandShare
from tests.adapters.test_leadership import started
from tests.support.natscluster import NatsCluster
from tests.support.waiting import until


async def test_the_gateways_demand_reaches_the_controller(tmp_path: Path, cluster: NatsCluster) -> None:
    fast = AutoscaleConfig(interval_s=0.2)
    gw = await started(tmp_path, cluster, "gw-1", role="gateway", autoscale=fast)
    ctl = await started(tmp_path, cluster, "ctl-1", role="controller", autoscale=fast)
    try:
        await until(lambda: ctl.services.leadership.leading, 10, "the controller leads")
        share = next(s for s in ctl.hub.services if isinstance(s, DemandShare))
        # What the gateway's inference path counts when it serves (tenant, model, origin, budget).
        gw.services.inference.demand[("acme", "qwen", "hangzhou", 10.0)] = 7
        await until(lambda: share.counters["received"] >= 1, 5, "the gateway's report at the controller")
        # (the controller's autoscaler drains the share on its own ticks: read the report itself)
        assert share.last is not None and share.last.hub == "gw-1"
        assert [(c.tenant, c.model, c.origin, c.budget_ms, c.requests)
                for c in share.last.counts] == [("acme", "qwen", "hangzhou", 10.0, 7)]
        assert gw.services.inference.demand == {}  # drained at the gateway, sent once
    finally:
        await ctl.hub.stop()
        await gw.hub.stop()
