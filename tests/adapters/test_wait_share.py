"""Wait reasons from the leader to another hub process over a real nats-server, each process with
its own SQLite file (services/waits.py): applied in step, a deposed leader's news dropped, a gap
repaired by the full set, a reason that comes before its job applied once the job's row arrives,
a malformed news counted and dropped."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controlplane.core import jobspec
from controlplane.nats.bus import HubBus
from controlplane.nats.natsserver import NatsServer
from controlplane.runtime import WallClock
from controlplane.services import waits as waits_mod
from controlplane.services.waits import SUBJECT, WaitShare, encode
from controlplane.store import db as store_db
from controlplane.store import jobs as store_jobs
from edge_agent import wire
from tests.support.waiting import until

SPEC = jobspec.JobSpec(name="ft", cards=4, accelerators=("A800",), est_hours=1.0)


@pytest.fixture
async def buses(nats_server: NatsServer) -> AsyncIterator[tuple[HubBus, HubBus, HubBus]]:
    made = [HubBus(nats_server.url, name=n, on_register=lambda r: wire.RegisterAck(hub="t"), on_heartbeat=lambda hb: None)
            for n in ("lead", "gw", "raw")]
    for b in made:
        await b.connect()
    try:
        yield made[0], made[1], made[2]
    finally:
        for b in made:
            await b.close()


def jobs_in(db: store_db.Database, ids: list[str]) -> None:
    with store_db.transaction(db):
        for i in ids:
            store_jobs.create_job(db, "acme", SPEC, None, "h", time.time(), job_id=i)


def reasons(db: store_db.Database) -> dict[str, str]:
    return {j: r for j, _, r in store_jobs.waiting_reasons(db)}


async def test_the_leaders_reasons_reach_another_process_and_gaps_are_repaired(
        tmp_path: Path, buses: tuple[HubBus, HubBus, HubBus], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(waits_mod, "ASK_GAP_S", 0.0)
    monkeypatch.setattr(waits_mod, "CHUNK", 2)  # the full set and a round's reasons go as several messages
    lead_bus, gw_bus, raw = buses
    lead_db, gw_db = store_db.open_db(tmp_path / "lead.db"), store_db.open_db(tmp_path / "gw.db")
    ids = [f"job-{i}" for i in range(5)]
    jobs_in(lead_db, ids)
    jobs_in(gw_db, ids[:4])  # job-4 is not at the gateway yet (the record's watch is another path)
    epoch = {"lead": 3}
    lead = WaitShare(hub_id="lead", bus=lead_bus, db=lambda: lead_db, epoch=lambda: epoch["lead"],
                     leading=lambda: True, clock=WallClock())
    gw = WaitShare(hub_id="gw", bus=gw_bus, db=lambda: gw_db, epoch=lambda: 0, leading=lambda: False,
                   clock=WallClock())
    await lead.start()
    await gw.start()
    try:
        # the leader says its reasons (in its own SQLite, as the training service does), then publishes them
        said = [(i, 0, "infeasible: no pool") for i in ids]
        with store_db.derived(lead_db):
            store_jobs.apply_waits(lead_db, said)
        lead.publish(said)
        await until(lambda: reasons(gw_db) == {i: "infeasible: no pool" for i in ids[:4]}, 5, "the reasons at gw")
        # the job that was not there yet gets its reason once its row arrives
        jobs_in(gw_db, ids[4:])
        gw.record_changed("jobs", {"id": "job-4"})
        await until(lambda: reasons(gw_db).get("job-4") == "infeasible: no pool", 5, "job-4's reason")
        # a deposed leader's news (a lower epoch) changes nothing
        await raw.publish_hub(SUBJECT, encode("old", 2, 99, [("job-0", 0, "quota")]))
        await until(lambda: gw.counters["stale"] == 1, 5, "the stale news counted")
        assert reasons(gw_db)["job-0"] == "infeasible: no pool"
        # a news lost: the next one is out of step, so gw asks and the leader publishes the full set
        with store_db.derived(lead_db):
            store_jobs.apply_waits(lead_db, [("job-1", 0, "waits for cards")])
        lead._seq += 1  # (its news never sent)
        with store_db.derived(lead_db):
            store_jobs.apply_waits(lead_db, [("job-2", 0, "quota")])
        full, seq = lead.counters["full_sent"], lead._seq
        lead.publish([("job-2", 0, "quota")])
        assert lead._seq == seq + 1
        await until(lambda: lead.counters["full_sent"] == full + 1, 5, "the full set on gw's ask")
        await until(lambda: reasons(gw_db) == reasons(lead_db), 5, "gw as the leader")
        assert reasons(gw_db)["job-1"] == "waits for cards"
        # in step again: the next news is applied without another full set
        lead.publish([("job-3", 0, "quota")])
        await until(lambda: reasons(gw_db)["job-3"] == "quota", 5, "the next news")
        assert lead.counters["full_sent"] == full + 1
        # a reason for an attempt the job is not waiting after is not applied
        received = gw.counters["received"]
        lead.publish([("job-3", 2, "tariff")])
        await until(lambda: gw.counters["received"] == received + 1, 5, "the news received")
        assert reasons(gw_db)["job-3"] == "quota"
        # malformed: counted and dropped
        await raw.publish_hub(SUBJECT, b'{"hub": "x"')
        await until(lambda: gw.counters["malformed"] == 1, 5, "the malformed news counted")
    finally:
        await gw.stop()
        await lead.stop()
        lead_db.conn.close()
        gw_db.conn.close()
