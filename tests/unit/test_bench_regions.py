"""`cpn bench regions` measures in-region figures only over origins that have an in-region site
within the budget on the full path through their region's gateway."""

from __future__ import annotations

from bench import regions
from topology import latency, loader


def test_origins_whose_leg_to_their_gateway_exceeds_the_budget_are_measured_apart() -> None:
    layout = loader.load_default()
    index = latency.RttIndex.build(layout)
    inside, outside = regions.choose_origins(layout, index, "wuhan", "central", ("wh-edge", "hb-regional"), 3)
    # The region's heaviest origins reach Wuhan's gateway along the Beijing-Wuhan-Guangzhou trunk
    # (Zhengzhou ~8.2 ms, Changsha ~5.5 ms; ~31 and ~22 ms before the layout had those links);
    # Nanyang and Luoyang do not make it within 10 ms, and were mixed into the in-region p99 before.
    assert [o.id for o in inside] == ["zhengzhou", "wuhan", "changsha"]
    assert {"nanyang", "luoyang"} <= {o.id for o in outside}
    assert all(o.path_ms <= regions.BUDGET_MS for o in inside)
    assert all(o.path_ms > regions.BUDGET_MS for o in outside)
    # Without an in-region site in the run, no origin is in budget.
    inside, _ = regions.choose_origins(layout, index, "wuhan", "central", ("bj-edge",), 3)
    assert inside == []


def test_a_requests_parts_are_what_its_stamps_leave_beyond_the_layouts_delays_and_the_service_time() -> None:
    # client sends at 0, the gateway's handler takes it at 3 ms, the agent at 6 to 6.5 ms, the
    # handler ends at 9.5 ms, the client reads it at 12.5 ms; 2 ms each way on the tenant's leg and
    # on the relay; 0.3 ms of service
    parts = regions.parts_of(0.0, 0.0125, (0.003, 0.0095), (0.006, 0.0065), 0.3, 2.0, 2.0)
    assert set(parts) == set(regions.PARTS)
    assert {k: round(v, 6) for k, v in parts.items()} == {
        "tenant_in": 1.0, "to_agent": 1.0, "agent": 0.2, "from_agent": 1.0, "tenant_out": 1.0}
    assert round(sum(parts.values()), 6) == round(12.5 - 0.3 - 4 * 2.0, 6)  # the whole, less what is subtracted
