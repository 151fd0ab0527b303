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
