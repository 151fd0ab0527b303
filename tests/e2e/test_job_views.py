"""End to end (a real hub, real agents, a real nats-server with JetStream): what a tenant sees of a
training job agrees everywhere, and its events can be followed as they happen.

- The job list, the job itself and ``/v1/usage`` show the same progress and cost; a running job's
  card-hours count while it runs (they are not 0 until it ends).
- ``/v1/jobs/{id}/events`` streams (Server-Sent Events) the attempt, its progress and its
  checkpoints as they happen, ends with the job, resumes from ``Last-Event-ID`` without losing or
  repeating an event, and long-polls with ``after`` + ``wait_s``.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from controlplane.nats.natsserver import NatsServer
from tests.e2e.test_training import job, network, sim_job
from tests.support.hubrig import Client


async def sse(client: Client, path: str, last_event_id: int | None = None,
              timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Read a Server-Sent Events stream to its end: one dict per event (``id``, ``event``, ``data``)."""
    headers = client.headers({"Accept": "text/event-stream"})
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout_s):
        async with client.session.get(client.base + path, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            current: dict[str, Any] = {}
            async for raw in resp.content:
                line = raw.decode().rstrip("\n")
                if not line:
                    if "data" in current:
                        out.append(current)
                    current = {}
                    continue
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(": ")
                current[name] = json.loads(value) if name == "data" else (int(value) if name == "id" else value)
    return out


async def test_list_detail_and_usage_agree_and_a_running_job_counts(tmp_path: Path, nats_server: NatsServer) -> None:
    # 1 h of work at 240 simulated seconds per second: 15 s of wall time, no checkpoint before the end,
    # so any progress or cost seen while it runs comes from the running attempt itself.
    async with network(tmp_path, nats_server.url, scale=240) as (hub, _agents, tenant):
        status, sub, _ = await tenant.call("POST", "/v1/jobs", sim_job(checkpoint_interval_min=600))
        assert status == 201, sub
        jid = sub["id"]

        async def listed() -> dict[str, Any]:
            status, body, _ = await tenant.call("GET", "/v1/jobs")
            assert status == 200
            (line,) = [j for j in body["data"] if j["id"] == jid]
            return line  # type: ignore[no-any-return]

        deadline = time.monotonic() + 20
        while not ((first := await listed())["state"] == "running" and first["progress"] > 0):
            assert time.monotonic() < deadline, f"no progress reported: {first}"
            await asyncio.sleep(0.2)
        _, detail, _ = await tenant.call("GET", f"/v1/jobs/{jid}")
        _, usage, _ = await tenant.call("GET", "/v1/usage")
        second = await listed()
        assert detail["state"] == "running" and job(hub, jid).progress == 0.0  # no checkpoint yet
        assert [a["card_hours"] for a in detail["attempts"]] == [detail["card_hours"]]  # the attempts add up
        # Read in this order, each figure is at least the one read before it (they all grow).
        training = usage["training"]
        (by_job,) = [j for j in training["by_job"] if j["id"] == jid]
        assert 0 < first["card_hours"] <= detail["card_hours"] <= by_job["card_hours"] <= second["card_hours"]
        assert first["card_hours"] <= training["card_hours"] <= second["card_hours"]
        assert 0 < first["progress"] <= detail["progress"] <= by_job["progress"] <= second["progress"] < 1
        assert 0 < first["energy_cny"] <= detail["energy_cny"] <= second["energy_cny"]
        assert training["accruing"]["jobs"] == 1 and training["billed"]["card_hours"] == 0
        assert usage["totals"]["card_hours"] == training["card_hours"]  # no inference: training is the bill

        status, cancelled, _ = await tenant.call("DELETE", f"/v1/jobs/{jid}")
        assert status == 200 and cancelled["state"] == "cancelled"
        # Finished: nothing accrues, and the three views show the very same figures.
        _, detail, _ = await tenant.call("GET", f"/v1/jobs/{jid}")
        _, usage, _ = await tenant.call("GET", "/v1/usage")
        line = await listed()
        assert detail["card_hours"] > 0
        assert line["card_hours"] == detail["card_hours"] == usage["training"]["card_hours"] \
            == usage["totals"]["card_hours"] == detail["billed"]["card_hours"]
        assert line["energy_cny"] == detail["energy_cny"] == usage["training"]["energy_cny"]
        assert line["progress"] == detail["progress"]
        assert usage["training"]["accruing"] == {"jobs": 0, "card_hours": 0, "energy_cny": 0}


async def test_job_events_stream_as_they_happen_and_resume_from_the_last_event_id(
        tmp_path: Path, nats_server: NatsServer) -> None:
    # 1 h at 360x: 10 s of wall time, a checkpoint every 15 simulated minutes (3 before the end).
    async with network(tmp_path, nats_server.url, scale=360) as (hub, _agents, tenant):
        status, sub, _ = await tenant.call("POST", "/v1/jobs", sim_job(checkpoint_interval_min=15))
        assert status == 201, sub
        jid = sub["id"]
        streamed = await sse(tenant, f"/v1/jobs/{jid}/events")
        # Followed from submission to the end, while it ran.
        assert streamed[-1]["event"] == "end" and streamed[-1]["data"]["state"] == "succeeded", streamed[-3:]
        events = streamed[:-1]
        kinds = [e["event"] for e in events]
        assert kinds[0] == "attempt_started" and kinds[-1] == "attempt_exited", kinds
        assert kinds.count("checkpointed") == 3 and kinds.count("progress") >= 2, kinds
        ids = [e["id"] for e in events]
        assert ids == sorted(set(ids)) and all(e["data"]["id"] == e["id"] for e in events)
        marks = [e["data"]["body"]["progress"] for e in events if e["event"] == "progress"]
        assert marks == sorted(marks) and all(0 < m < 1 for m in marks), marks
        assert all(e["data"]["site"] == "(hub)" for e in events if e["event"] == "progress")
        # A checkpoint tells its progress; progress marks come between the checkpoints.
        first_cp = kinds.index("checkpointed")
        assert 0 < events[first_cp]["data"]["body"]["progress"] < 1

        # The JSON page says the same, and that nothing more will come.
        status, page, _ = await tenant.call("GET", f"/v1/jobs/{jid}/events")
        assert status == 200 and page["done"] is True and page["state"] == "succeeded"
        assert [e["id"] for e in page["data"]] == ids and page["cursor"] == ids[-1]
        assert [e["kind"] for e in page["data"]] == kinds
        # Reconnecting with Last-Event-ID gives exactly the rest, then the end.
        rest = await sse(tenant, f"/v1/jobs/{jid}/events", last_event_id=ids[2])
        assert [e.get("id") for e in rest[:-1]] == ids[3:] and rest[-1]["event"] == "end"
        # ... and with after= (a cursor) the same.
        status, tail, _ = await tenant.call("GET", f"/v1/jobs/{jid}/events?after={ids[2]}&limit=2")
        assert [e["id"] for e in tail["data"]] == ids[3:5] and tail["cursor"] == ids[4] and tail["done"] is False
        status, bad, _ = await tenant.call("GET", f"/v1/jobs/{jid}/events?after=-1")
        assert (status, bad["error"]["param"]) == (400, "after")


async def test_job_events_long_poll_returns_when_the_next_event_arrives(tmp_path: Path, nats_server: NatsServer) -> None:
    async with network(tmp_path, nats_server.url, scale=360) as (hub, _agents, tenant):
        status, sub, _ = await tenant.call("POST", "/v1/jobs", sim_job(checkpoint_interval_min=15))
        assert status == 201, sub
        jid = sub["id"]
        cursor, seen, polls = 0, [], 0
        started = time.monotonic()
        while True:
            status, page, _ = await tenant.call("GET", f"/v1/jobs/{jid}/events?after={cursor}&wait_s=30")
            assert status == 200, page
            polls += 1
            seen.extend(page["data"])
            cursor = page["cursor"]
            if page["done"]:
                break
            # An answer without events before its 30 s are up would be a busy loop, not a long-poll.
            assert page["data"], page
            assert time.monotonic() - started < 60
        assert job(hub, jid).state == "succeeded"
        kinds = [e["kind"] for e in seen]
        assert kinds[0] == "attempt_started" and "attempt_exited" in kinds and kinds.count("checkpointed") == 3
        assert polls < len(seen) + 2  # each poll brought news
        status, page, _ = await tenant.call("GET", f"/v1/jobs/{jid}/events")
        assert [e["id"] for e in page["data"]] == [e["id"] for e in seen]  # nothing lost, nothing twice
        # A finished job's long-poll answers at once.
        t0 = time.monotonic()
        status, page, _ = await tenant.call("GET", f"/v1/jobs/{jid}/events?after={cursor}&wait_s=30")
        assert page["data"] == [] and page["done"] is True and time.monotonic() - t0 < 5
