"""``cpn bench gateway --peers`` end to end at toy scale: the mock, wrk, the streaming client and the
CPU accounting against the direct path and a real cpn (nats-server + hub + openai-http agent)."""

from __future__ import annotations

import math
from pathlib import Path

from bench import peers
from tests.support.engines import needs

pytestmark = needs("wrk", package="wrk")


async def test_peers_harness_measures_direct_and_cpn() -> None:
    lines: list[str] = []
    res = await peers.run(seconds=1, rounds=1, names=["direct", "cpn"], cells_run=("c32", "ttfc8"), log=lines.append)
    assert res["skipped"] == {}
    direct, cpn = res["systems"]["direct"], res["systems"]["cpn"]
    for system in (direct, cpn):
        assert system["c32"]["errors"] == 0 and system["ttfc8"]["errors"] == 0
        assert system["c32"]["rps"] > 100
        assert 0 < system["ttfc8"]["ttfc_p50_ms"] < 1000
    # The mock alone is the ceiling; cpn's three processes are all charged.
    assert direct["c32"]["rps"] > cpn["c32"]["rps"]
    assert "cpu_per_1000" not in direct["c32"]
    by_process = cpn["c32"]["cpu_per_1000_by_process"]
    assert set(by_process) == {"hub", "agent", "nats-server"} and by_process["hub"] > 0 and by_process["agent"] > 0
    assert math.isclose(cpn["c32"]["cpu_per_1000"], sum(by_process.values()), rel_tol=0.2)
    table = peers.render(res)
    assert "| cpn |" in table and "| direct |" in table and "nan" not in table
    assert any("cpn" in line and "req/s" in line for line in lines)


async def test_a_base_checkout_runs_beside_and_plain_answers_at_8_connections() -> None:
    # --base DIR: cpn from another source tree (here this one, unpacked elsewhere would do the same)
    # as system cpn-base; --cells c8: plain answers through the streaming client.
    root = Path(peers.__file__).resolve().parents[1]
    res = await peers.run(seconds=1, rounds=1, names=["cpn-base"], cells_run=("c8",), base=root, log=lambda _: None)
    c8 = res["systems"]["cpn-base"]["c8"]
    assert c8["errors"] == 0 and c8["rps"] > 10 and 0 < c8["ttfc_p50_ms"] < 1000
    assert set(c8["cpu_per_1000_by_process"]) == {"hub", "agent", "nats-server"}
    assert res["base_src"] == str(root) and res["verdicts"] == {}
