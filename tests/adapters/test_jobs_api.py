"""The jobs API over a real hub (SQLite file, aiohttp on port 0, real nats-server), no agents:
validation, idempotency, tenancy and cancellation. Jobs stay queued (no site can take them)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from controlplane.core.lifecycle import JobState
from controlplane.hub import Hub
from controlplane.nats.natsserver import NatsServer
from controlplane.services import training
from controlplane.store import jobs as store_jobs
from tests.support.hubrig import Client, hub_config, running_hub, services_of
from tests.support.waiting import until

JOB = {"name": "llm-7b", "cards": 4, "accelerators": ["A800", "910B"], "est_hours": 2.0, "checkpoint_cost_s": 60,
       "priority": 3, "regions": ["shanghai"]}


@pytest.fixture
async def api(tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[tuple[Hub, Client, Client]]:
    async with running_hub(hub_config(tmp_path, nats_server.url)) as hub:
        acme = hub.create_tenant("acme")
        other = hub.create_tenant("other")
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{hub.http_port}"
            yield hub, Client(session, base, acme), Client(session, base, other)


@pytest.mark.parametrize("field", ["tenant_id", "site", "attempt", "pool"])
async def test_forbidden_fields_are_a_422_naming_the_field(api, field: str) -> None:  # type: ignore[no-untyped-def]
    hub, acme, _ = api
    status, body, _ = await acme.call("POST", "/v1/jobs", {**JOB, field: "x"})
    assert status == 422, body
    assert body["error"]["param"] == field and field in body["error"]["message"]
    assert store_jobs.list_jobs(hub.db, "acme") == []


@pytest.mark.parametrize(("patch", "status", "param"), [
    ({"cards": "four"}, 400, "cards"),
    ({"cards": 0}, 400, "cards"),
    ({"est_hours": -1}, 400, "est_hours"),
    ({"accelerators": []}, 400, "accelerators"),
    ({"accelerators": ["H100"]}, 400, "accelerators[0]"),
    ({"accelerators": ["A800", "A800"]}, 400, "accelerators[1]"),
    ({"priority": 42}, 400, "priority"),
    ({"regions": ["atlantis"]}, 400, "regions[0]"),
    ({"deadline": "next tuesday"}, 400, "deadline"),
    ({"deadline": "2001-01-01T00:00:00Z"}, 400, "deadline"),
    ({"checkpoint_interval_min": 0}, 400, "checkpoint_interval_min"),
    ({"command": "python -c pass"}, 400, "command"),
])
async def test_bad_values_name_the_field(api, patch: dict, status: int, param: str) -> None:  # type: ignore[no-untyped-def,type-arg]
    hub, acme, _ = api
    got, body, _ = await acme.call("POST", "/v1/jobs", {**JOB, **patch})
    assert (got, body["error"]["param"]) == (status, param), body
    assert store_jobs.list_jobs(hub.db, "acme") == []


async def test_malformed_json_and_missing_fields(api) -> None:  # type: ignore[no-untyped-def]
    _, acme, _ = api
    status, body, _ = await acme.call("POST", "/v1/jobs", raw=b'{"cards": 4,')
    assert status == 400 and body["error"]["code"] == "malformed_json"
    status, body, _ = await acme.call("POST", "/v1/jobs", {"cards": 4, "accelerators": ["A800"]})
    assert status == 400 and "est_hours" in body["error"]["message"]


async def test_submit_is_committed_and_shown(api) -> None:  # type: ignore[no-untyped-def]
    hub, acme, _ = api
    status, body, headers = await acme.call("POST", "/v1/jobs", {**JOB, "deadline": "2099-01-01T08:00:00+08:00"})
    assert status == 201, body
    assert headers["Location"] == f"/v1/jobs/{body['id']}"
    assert body["state"] == "queued" and body["cards"] == 4 and body["attempts"] == []
    row = store_jobs.get_job(hub.db, body["id"])  # committed before the answer
    assert row is not None and row.tenant == "acme" and row.priority == 3
    assert row.spec.deadline == 4070908800.0  # ISO 8601 with an offset, stored as epoch seconds
    # No site is up: the scheduler says why the job waits.
    await until(lambda: store_jobs.get_job(hub.db, body["id"]).reason != "", 5, "wait reason")  # type: ignore[union-attr]
    status, view, _ = await acme.call("GET", f"/v1/jobs/{body['id']}")
    assert status == 200 and view["state"] == "queued"
    assert view["wait_reason"].startswith("infeasible") and "A800" in view["wait_reason"], view["wait_reason"]
    status, listing, _ = await acme.call("GET", "/v1/jobs")
    assert [j["id"] for j in listing["data"]] == [body["id"]]
    status, events, _ = await acme.call("GET", f"/v1/jobs/{body['id']}/events")
    assert status == 200 and events["data"] == []


async def test_idempotent_replay_and_conflict(api) -> None:  # type: ignore[no-untyped-def]
    hub, acme, other = api
    key = {"Idempotency-Key": "run-2024-06-01"}
    s1, first, h1 = await acme.call("POST", "/v1/jobs", JOB, headers=key)
    assert s1 == 201 and "Idempotent-Replayed" not in h1
    # Same body, keys in another order and other spacing: the first answer, byte for byte.
    reordered = b'{ "est_hours": 2.0, "cards": 4, "name": "llm-7b", "accelerators": ["A800", "910B"], ' \
                b'"regions": ["shanghai"], "priority": 3, "checkpoint_cost_s": 60 }'
    s2, second, h2 = await acme.call("POST", "/v1/jobs", raw=reordered, headers=key)
    assert (s2, second) == (s1, first) and h2["Idempotent-Replayed"] == "true"
    # Same key, another body: 422 naming the header; nothing created.
    s3, body3, _ = await acme.call("POST", "/v1/jobs", {**JOB, "cards": 8}, headers=key)
    assert s3 == 422 and body3["error"]["param"] == "Idempotency-Key"
    assert len(store_jobs.list_jobs(hub.db, "acme")) == 1
    # Keys are per tenant: the other tenant's use of the same key is a new job.
    s4, body4, _ = await other.call("POST", "/v1/jobs", JOB, headers=key)
    assert s4 == 201 and body4["id"] != first["id"]
    # The replay survives the job moving on (it is the *first* answer).
    s5, _, _ = await acme.call("DELETE", f"/v1/jobs/{first['id']}")
    assert s5 == 200
    s6, again, _ = await acme.call("POST", "/v1/jobs", JOB, headers=key)
    assert (s6, again["state"], again["id"]) == (201, "queued", first["id"])


async def test_other_tenants_job_is_a_404_everywhere(api) -> None:  # type: ignore[no-untyped-def]
    hub, acme, other = api
    _, job, _ = await acme.call("POST", "/v1/jobs", JOB)
    for method, path in [("GET", f"/v1/jobs/{job['id']}"), ("GET", f"/v1/jobs/{job['id']}/events"),
                         ("DELETE", f"/v1/jobs/{job['id']}")]:
        status, body, _ = await other.call(method, path)
        assert status == 404 and body["error"]["code"] == "not_found", (method, path, body)
    status, listing, _ = await other.call("GET", "/v1/jobs")
    assert listing["data"] == []
    assert store_jobs.get_job(hub.db, job["id"]).state == "queued"  # type: ignore[union-attr]
    status, _, _ = await acme.call("GET", "/v1/jobs/job-does-not-exist")
    assert status == 404


async def test_cancel(api) -> None:  # type: ignore[no-untyped-def]
    hub, acme, _ = api
    _, job, _ = await acme.call("POST", "/v1/jobs", JOB)
    status, view, _ = await acme.call("DELETE", f"/v1/jobs/{job['id']}")
    assert status == 200 and view["state"] == "cancelled" and view["finished_at"] is not None
    assert view["reason"] == "cancelled by tenant"
    status, body, _ = await acme.call("DELETE", f"/v1/jobs/{job['id']}")
    assert status == 409 and "cancelled" in body["error"]["message"]
    status, listing, _ = await acme.call("GET", "/v1/jobs?state=cancelled")
    assert [j["id"] for j in listing["data"]] == [job["id"]]
    status, body, _ = await acme.call("GET", "/v1/jobs?state=sleeping")
    assert status == 400 and body["error"]["param"] == "state"
    # The scheduler never places a cancelled job.
    service = services_of(hub).training
    ticks = service.counters["ticks"]
    await until(lambda: service.counters["ticks"] >= ticks + 2, 5, "two ticks")
    assert store_jobs.attempts(hub.db, job["id"]) == []


async def test_usage_has_a_training_section_and_openapi_lists_jobs(api) -> None:  # type: ignore[no-untyped-def]
    _, acme, _ = api
    _, job, _ = await acme.call("POST", "/v1/jobs", JOB)
    status, usage, _ = await acme.call("GET", "/v1/usage")
    assert status == 200
    training = usage["training"]
    assert training["jobs"] == 1 and training["card_hours"] == 0.0
    assert [j["id"] for j in training["by_job"]] == [job["id"]]
    status, doc, _ = await acme.call("GET", "/openapi.json")
    assert {"post", "get"} <= set(doc["paths"]["/v1/jobs"]) and "delete" in doc["paths"]["/v1/jobs/{job}"]
    assert "tenant_id" not in doc["components"]["schemas"]["JobBody"]["properties"]


def test_every_body_field_reaches_the_typed_spec_and_hashes_as_the_body_did() -> None:
    """normalise() lists the body's fields by hand: none may be dropped (quote_id was, once: a
    submission against a quote then ran unpinned and unbilled), and the spec straight from the body
    shows exactly the body's fields, so the body hash of a key stored before specs were typed
    (the sorted JSON of the body, None left out) still matches."""
    import hashlib
    from types import SimpleNamespace

    import msgspec

    from controlplane.gateway.app import SERVICES
    from controlplane.gateway.jobs import JobBody, body_hash, normalise
    from topology import loader

    layout = loader.load_default()
    request = SimpleNamespace(app={SERVICES: SimpleNamespace(sites=SimpleNamespace(layout=layout))})
    acc = sorted(layout.accelerators)[0]
    region = layout.sites[0].region
    body = JobBody(name="n", cards=2, accelerators=[acc], est_hours=1.5, checkpoint_cost_s=10.0,
                   checkpoint_interval_min=5.0, priority=1, deadline=2.0e9, max_price_cny=9.0, regions=[region],
                   providers=["p"], tee=True, command=["python"], image="img", max_retries=1, quote_id="q-1",
                   quote_pool="pool-1", prefer="cost")
    spec = normalise(body, request, 1.0e9)  # type: ignore[arg-type]
    as_sent = {k: v for k, v in msgspec.to_builtins(body).items() if v is not None}
    assert set(as_sent) == set(JobBody.__struct_fields__)  # every field set (none left at None)

    def shown(d: dict) -> object:  # type: ignore[type-arg]
        return msgspec.json.decode(msgspec.json.encode(d))  # as the API shows it (JSON)

    assert shown(spec.public()) == shown(as_sent)  # every body field, the same values
    assert body_hash(spec) == hashlib.sha256(msgspec.json.encode(as_sent, order="sorted")).hexdigest()
    # What the market adds when it binds a quote shows too, and only then.
    bound = msgspec.structs.replace(spec, pools=("pool-1",), quote_accelerator=acc)
    assert shown(bound.public()) == shown({**as_sent, "pools": ["pool-1"], "quote_accelerator": acc})


async def test_a_burst_of_submissions_shares_ticks_and_each_job_is_still_planned(
        tmp_path: Path, nats_server: NatsServer) -> None:
    """Each submission pokes the scheduler, but a poked tick comes at least ``scheduler_poke_gap_s``
    after the last one: 20 submissions back to back cost a few plan runs, not 20 (each re-plans the
    whole queue), and every job is still planned at once, long before the 30 s period."""
    gap_s = 0.25
    config = hub_config(tmp_path, nats_server.url, scheduler_tick_s=30.0, scheduler_poke_gap_s=gap_s)
    async with running_hub(config) as hub, aiohttp.ClientSession() as session:
        acme = Client(session, f"http://127.0.0.1:{hub.http_port}", hub.create_tenant("acme"))
        service = services_of(hub).training
        loop = asyncio.get_running_loop()
        ticks, started = service.counters["ticks"], loop.time()
        ids = []
        for _ in range(20):
            status, job, _ = await acme.call("POST", "/v1/jobs", JOB)
            assert status == 201, job
            ids.append(job["id"])
        await until(lambda: all(r.reason for r in store_jobs.jobs_in_states(hub.db, [JobState.QUEUED])
                                if r.id in ids), 5, "every job planned")
        elapsed_s = loop.time() - started
        ran = service.counters["ticks"] - ticks
        assert 1 <= ran <= 2 + elapsed_s / gap_s, (ran, elapsed_s)
        assert service.counters["pokes_coalesced"] >= 1
