"""`cpn bench regions` measures in-region figures only over origins that have an in-region site
within the budget on the full path through their region's gateway."""

from __future__ import annotations

from bench import regions
from topology import latency, loader


def test_origins_whose_leg_to_their_gateway_exceeds_the_budget_are_measured_apart() -> None:
    layout = loader.load_default()
    index = latency.RttIndex.build(layout)
    inside, outside = regions.choose_origins(layout, index, "wuhan", "central", ("wh-edge", "hb-regional"), 3)
    # Zhengzhou and Changsha are the region's heavy origins, but the layout's backbone puts ~31 and
    # ~22 ms between them and Wuhan's gateway: they were mixed into the in-region p99 before.
    assert [o.id for o in inside] == ["wuhan", "yichang"]
    assert {"zhengzhou", "changsha"} <= {o.id for o in outside}
    assert all(o.path_ms <= regions.BUDGET_MS for o in inside)
    assert all(o.path_ms > regions.BUDGET_MS for o in outside)
    # Without an in-region site in the run, no origin is in budget.
    inside, _ = regions.choose_origins(layout, index, "wuhan", "central", ("bj-edge",), 3)
    assert inside == []
