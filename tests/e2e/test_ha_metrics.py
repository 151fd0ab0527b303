"""What an operator of several hub processes sees in ``/metrics`` when the leader freezes.

Real parts: a 3-node nats-server cluster on loopback and two ``cpn hub --record nats``
subprocesses; the leading process is SIGSTOPped, the other takes over early (the frozen one
answers no liveness probe), then the frozen one is resumed and finds its lease taken. Scraped from
the processes' real ``/metrics``:

- the new leader counts one early takeover and one acquisition for reason ``early``;
- the old leader, resumed, counts one term lost for reason ``taken`` (or, if its renew deadline
  had passed first, ``deadline``) and reports ``cpn_leader 0``;
- both expose the ride-out and renewal-resend counters (0 here), and the record's no-quorum count.

Before, none of these families existed: a takeover was visible only in the logs
(``lease_acquired ... early=True``, ``lease_rode_out``, ``leadership_lost reason=...``).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support.hubprocs import HubArgs, cluster_view, scrape
from tests.support.natscluster import NatsCluster
from tests.support.waiting import until


@pytest.mark.serial
@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # HubProc's log file
async def test_an_early_takeover_and_the_lost_term_are_counted_in_metrics(
        tmp_path: Path, cluster: NatsCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.submissions import HubProc

    args = HubArgs(tmp_path, ",".join(cluster.urls), monkeypatch)

    hubs = {"p1": await HubProc.start(args("p1", "--create-admin-key"))}
    hubs["p2"] = await HubProc.start(args("p2"))
    admin = hubs["p1"].admin_key
    paused: HubProc | None = None
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async def leader_named_at(port: int) -> str:
                view = await cluster_view(session, port, admin)
                leader = (view or {}).get("leader") or {}
                return str(leader.get("hub_id", ""))

            await until(lambda: leader_named_at(hubs["p2"].port), 30, "a leader", interval_s=0.1)
            first = await leader_named_at(hubs["p2"].port)
            (second,) = [h for h in hubs if h != first]
            old, new = hubs[first], hubs[second]
            before = await scrape(session, new.port)
            assert before[("cpn_leader", ())] == 0 and (await scrape(session, old.port))[("cpn_leader", ())] == 1
            assert before[("cpn_leader_early_takeovers_total", ())] == 0
            assert before[("cpn_leadership_changes_total", (("change", "acquired"), ("reason", "early")))] == 0

            os.kill(old.proc.pid, signal.SIGSTOP)  # frozen while leading: it answers no probe
            paused = old
            frozen_at = time.monotonic()
            await until(lambda: _leads(session, new.port), 15, "the other process to take over", interval_s=0.1)
            took_s = time.monotonic() - frozen_at
            after = await scrape(session, new.port)
            assert after[("cpn_leader", ())] == 1
            assert after[("cpn_leader_early_takeovers_total", ())] == 1
            assert after[("cpn_leadership_changes_total", (("change", "acquired"), ("reason", "early")))] == 1
            assert after[("cpn_leader_rideouts_total", ())] == 0
            assert ("cpn_leader_renewals_resent_total", ()) in after
            assert ("cpn_record_no_quorum_total", ()) in after

            os.kill(old.proc.pid, signal.SIGCONT)  # wakes believing it leads: its renewal finds out
            paused = None

            async def lost_counted() -> bool:
                got = await scrape(session, old.port)
                lost = sum(v for (name, labels), v in got.items() if name == "cpn_leadership_changes_total"
                           and ("change", "lost") in labels and dict(labels)["reason"] in ("taken", "deadline"))
                return lost == 1 and got[("cpn_leader", ())] == 0

            await until(lost_counted, 20, "the resumed process to count its lost term", interval_s=0.2)
            gone = await scrape(session, old.port)
            assert gone[("cpn_leadership_changes_total", (("change", "acquired"), ("reason", "vacant")))] == 1
            assert gone[("cpn_leader_early_takeovers_total", ())] == 0
            print(f"takeover {took_s:.2f} s after the leader froze; the old leader's term ended as "
                  f"{[dict(k[1])['reason'] for k, v in gone.items() if k[0] == 'cpn_leadership_changes_total' and v and ('change', 'lost') in k[1]]}")
    finally:
        if paused is not None:
            os.kill(paused.proc.pid, signal.SIGCONT)
        for hub in hubs.values():
            await hub.stop()


async def _leads(session: aiohttp.ClientSession, port: int) -> bool:
    samples = await scrape(session, port)
    return samples.get(("cpn_leader", ()), 0) == 1
