"""The in-memory usage accumulator (controlplane/core/usage.py)."""

from __future__ import annotations

import pytest

from controlplane.core.usage import UsageBuffer, UsageRow


def test_adds_accumulate_per_key_and_drain_empties() -> None:
    buf = UsageBuffer()
    buf.add("acme", "qwen", "hz-edge", 10, 5)
    buf.add("acme", "qwen", "hz-edge", 3, 2)
    buf.add("acme", "qwen", "sh-edge", 1, 1)
    buf.add("beta", "qwen", "hz-edge", 7, 0, requests=2, card_hours=0.5, energy_cny=0.25)
    assert repr(buf) == "<UsageBuffer keys=3 requests=5 tokens=29 added=4>"
    rows = buf.drain()
    assert rows == [
        UsageRow(tenant="acme", model="qwen", site="hz-edge", requests=2, prompt_tokens=13, completion_tokens=7),
        UsageRow(tenant="acme", model="qwen", site="sh-edge", requests=1, prompt_tokens=1, completion_tokens=1),
        UsageRow(tenant="beta", model="qwen", site="hz-edge", requests=2, prompt_tokens=7, completion_tokens=0,
                 card_hours=0.5, energy_cny=0.25),
    ]
    assert len(buf) == 0 and buf.drain() == []
    assert repr(buf) == "<UsageBuffer keys=0 requests=0 tokens=0 added=4>"


def test_restore_merges_a_failed_flush_back_without_double_counting() -> None:
    buf = UsageBuffer()
    buf.add("acme", "qwen", "hz-edge", 10, 5)
    rows = buf.drain()
    buf.add("acme", "qwen", "hz-edge", 1, 1)  # traffic during the failed write
    buf.restore(rows)
    assert buf.drain() == [
        UsageRow(tenant="acme", model="qwen", site="hz-edge", requests=2, prompt_tokens=11, completion_tokens=6)
    ]
    assert buf.added == 2


def test_peek_shows_one_tenants_pending_rows_without_draining() -> None:
    buf = UsageBuffer()
    buf.add("acme", "qwen", "hz-edge", 1, 2)
    buf.add("beta", "qwen", "hz-edge", 3, 4)
    assert [r.tenant for r in buf.peek("acme")] == ["acme"]
    assert len(buf) == 2


@pytest.mark.parametrize(
    "args",
    [(-1, 0, 1), (0, -5, 1), (0, 0, -1), (1.5, 0, 1), (True, 0, 1)],
)
def test_bad_counts_raise_naming_the_count(args: tuple[object, object, object]) -> None:
    buf = UsageBuffer()
    with pytest.raises(ValueError, match="usage (prompt_tokens|completion_tokens|requests) must be"):
        buf.add("acme", "qwen", "s", *args)  # type: ignore[arg-type]
    assert len(buf) == 0
