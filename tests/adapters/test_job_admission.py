"""Submission against what the operator declared, over a real hub (SQLite file, aiohttp on port 0,
real nats-server), no agents: a job no declared site could ever run is a 422 naming the field, not
a job queued for ever; ``accelerators`` may be omitted.

demo-3: sh-hub (shanghai, TEE, A800 64 + 910B 32), sh-edge (H20 4), hz-edge (zhejiang, 910B 4),
nj-edge (jiangsu, L20 4).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controlplane.hub import Hub
from controlplane.nats.natsserver import NatsServer
from controlplane.store import jobs as store_jobs
from tests.support.hubrig import Client, hub_config, running_hub

JOB = {"name": "j", "cards": 4, "accelerators": ["910B"], "est_hours": 1.0}


@pytest.fixture
async def api(tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[tuple[Hub, Client, Client]]:
    async with running_hub(hub_config(tmp_path, nats_server.url)) as hub:
        acme = hub.create_tenant("acme")
        admin = hub.create_admin_key()
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{hub.http_port}"
            yield hub, Client(session, base, acme), Client(session, base, admin)


@pytest.mark.parametrize(("patch", "field", "words"), [
    ({"cards": 100}, "cards", "sh-hub: 32 910B cards in all, job needs 100 in one pool"),
    ({"cards": 65, "accelerators": ["A800", "910B"]}, "cards", "64 A800 cards in all"),
    ({"accelerators": ["L20"], "regions": ["shanghai"]}, "regions", "nj-edge: region jiangsu not allowed"),
    ({"regions": ["zhejiang"], "tee": True}, "tee", "hz-edge: no TEE"),
    ({"providers": ["someone-else"]}, "providers", "provider cpn-operator not allowed"),
])
async def test_a_job_no_declared_site_could_ever_run_is_a_422_naming_the_field(
        api, patch: dict[str, Any], field: str, words: str) -> None:  # type: ignore[no-untyped-def]
    hub, acme, _ = api
    status, body, _ = await acme.call("POST", "/v1/jobs", {**JOB, **patch})
    assert (status, body["error"]["param"]) == (422, field), body
    assert words in body["error"]["message"], body["error"]["message"]
    assert store_jobs.list_jobs(hub.db, "acme") == []  # nothing queued for ever


async def test_accelerators_may_be_omitted_any_that_fits(api) -> None:  # type: ignore[no-untyped-def]
    hub, acme, _ = api
    body = {k: v for k, v in JOB.items() if k != "accelerators"}
    status, small, _ = await acme.call("POST", "/v1/jobs", body)
    assert status == 201, small
    assert small["accelerators"] == ["A800", "H20", "910B", "L20"]  # every one some site could run it on
    status, big, _ = await acme.call("POST", "/v1/jobs", {**body, "cards": 16})
    assert status == 201 and big["accelerators"] == ["A800", "910B"], big  # only sh-hub holds 16
    status, tee, _ = await acme.call("POST", "/v1/jobs", {**body, "tee": True, "regions": ["shanghai"]})
    assert status == 201 and tee["accelerators"] == ["A800", "910B"], tee
    status, none, _ = await acme.call("POST", "/v1/jobs", {**body, "cards": 1000})
    assert (status, none["error"]["param"]) == (422, "cards"), none
    # The same body with the same Idempotency-Key replays the first answer.
    key = {"Idempotency-Key": "k1"}
    first = await acme.call("POST", "/v1/jobs", body, headers=key)
    again = await acme.call("POST", "/v1/jobs", body, headers=key)
    assert first[1]["id"] == again[1]["id"] and again[2].get("Idempotent-Replayed") == "true"


async def test_admission_follows_the_operators_declarations(api) -> None:  # type: ignore[no-untyped-def]
    hub, acme, admin = api
    status, body, _ = await acme.call("POST", "/v1/jobs", {**JOB, "cards": 20})
    assert status == 201, body
    # The operator narrows sh-hub to 16 910B cards: 20 in one pool is now more than any site has.
    status, decl, _ = await admin.call("PUT", "/v1/sites/sh-hub/declaration", {"accelerators": {"A800": 64, "910B": 16}})
    assert status == 200, decl
    status, body, _ = await acme.call("POST", "/v1/jobs", {**JOB, "cards": 20})
    assert (status, body["error"]["param"]) == (422, "cards"), body
    assert "sh-hub: 16 910B cards in all" in body["error"]["message"]
    # A site declared outside the layout cannot be priced by the scheduler: it does not count.
    status, decl, _ = await admin.call("PUT", "/v1/sites/hz-big/declaration", {
        "tier": "regional", "city": "hangzhou", "region": "zhejiang", "accelerators": {"910B": 128}})
    assert status in (200, 201), decl
    status, body, _ = await acme.call("POST", "/v1/jobs", {**JOB, "cards": 20})
    assert status == 422, body
    status, decl, _ = await admin.call("PUT", "/v1/sites/sh-hub/declaration", {"accelerators": {"A800": 64, "910B": 32}})
    status, body, _ = await acme.call("POST", "/v1/jobs", {**JOB, "cards": 20})
    assert status == 201, body
