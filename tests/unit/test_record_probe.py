"""The replicated record's bridge without quorum (Rule 5): writes refused at once but for one probe a
second, and each failed probe waits twice as long as the last, up to the write deadline, so a path
that works again but answers slower than the first probe's deadline (a super-cluster link just
healed, on a loaded host) is found again instead of refused for ever. The state machine only: no
NATS is touched before a write is admitted."""

from __future__ import annotations

import time

import pytest

from controlplane.replicated.bridge import RecordBridge
from controlplane.replicated.errors import NoQuorum


def test_each_failed_probe_waits_longer_and_an_acknowledged_write_resets_it() -> None:
    b = RecordBridge([], write_deadline_s=4.0, probe_every_s=0.0, probe_deadline_s=0.5)
    now, deadline = b._admit()
    assert deadline == 4.0  # healthy: the whole write deadline
    b._settled(NoQuorum("first write"), now)
    seen = []
    for _ in range(5):
        now, deadline = b._admit()
        seen.append(deadline)
        b._settled(NoQuorum("probe"), now)
    assert seen == [0.5, 1.0, 2.0, 4.0, 4.0]
    b._settled(None, time.monotonic())
    assert b._admit()[1] == 4.0 and b.degraded_since is None
    b._settled(NoQuorum("again"), time.monotonic())
    assert b._admit()[1] == 0.5  # a new outage starts from the short probe


def test_writes_between_probes_are_refused_at_once() -> None:
    b = RecordBridge([], write_deadline_s=4.0, probe_every_s=60.0, probe_deadline_s=0.5)
    b._settled(NoQuorum("first write"), time.monotonic())
    with pytest.raises(NoQuorum, match="next try in"):
        b._admit()
