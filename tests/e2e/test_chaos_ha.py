"""``cpn chaos --ha``, short: every HA fault kind (leader kill, gateway kill, NATS node kill, NATS node
pause) runs once under load on the rig of ``cpn up --ha`` (three hub processes, three NATS nodes),
and the invariants hold: nothing acknowledged is lost at any gateway, nothing duplicated, no stale
result accepted, no job's attempt started twice; the leader's kill is taken over; clients that
fail over to another gateway see no inference error outside the fault windows."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.tools import chaosha


@pytest.mark.serial
@pytest.mark.timeout(240)
async def test_a_short_ha_chaos_run_runs_every_kind_and_keeps_the_invariants(tmp_path: Path) -> None:
    report = await chaosha.run(chaosha.HaChaosOptions(seconds=5, seed=3, jobs=4, data_dir=tmp_path / "rig"))
    print(chaosha.render(report, 0))
    data = report.as_dict()
    assert {f["kind"] for f in report.faults} == set(chaosha.KINDS), report.faults
    assert data["invariants"] == {"accepted_then_lost": 0, "duplicate_side_effects": 0, "stale_results_accepted": 0,
                                  "attempts_started_twice": 0}, data
    assert report.accepted == 4 and set(report.lost_at_gateways) == {"hub-1", "hub-2", "hub-3"}
    (kill,) = [f for f in report.faults if f["kind"] == "leader_kill"]
    assert kill["takeover_s"] is not None and kill["leader_after"][0] != kill["target"], kill
    assert kill["leader_after"][1] > kill["leader_before"][1], kill
    assert report.infer_outside[0] > 0 and report.infer_outside[1] == 0, data["inference"]
    assert report.infer_in_fault[0] > 0
