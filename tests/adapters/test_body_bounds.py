"""No number from a request body reaches SQLite, the wire or a pure core out of range.

The issue: ``POST /v1/tenants`` with ``burst`` above 2^63-1 was a 500 (``OverflowError`` from
SQLite). Now every integer and number of every body is bounded both ways: huge, negative and
out-of-range values are a 4xx naming the field, never a 5xx. Against a real hub (SQLite file,
nats-server, HTTP), through every endpoint that takes a body.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controlplane.nats.natsserver import NatsServer
from tests.support.hubrig import Client, hub_config, running_hub

HUGE = [2**63, 2**64 + 1, -(2**63) - 1, 10**30, 1e308, -1e308]
"""Beyond every bound cpn has; 1e400 (out of a double's range) and NaN/Infinity literals are below."""

# (endpoint, key kind, a valid body, fields to break, values besides HUGE that are out of range)
TABLE: list[tuple[str, str, dict[str, Any], dict[str, list[Any]]]] = [
    ("/v1/tenants", "admin", {"id": "t1"},
     {"quota_cards": [-1], "rate_per_s": [0, -1.5], "burst": [0, -1]}),
    ("/v1/infer", "tenant", {"model": "m", "input": "x"},
     {"max_tokens": [0, 40_000], "budget_ms": [0, 10_001]}),
    ("/v1/chat/completions", "tenant", {"model": "m", "messages": [{"role": "user", "content": "x"}]},
     {"seed": [], "max_tokens": [0], "max_completion_tokens": [0], "n": [0, 129], "temperature": [-0.1, 2.5],
      "top_p": [1.5], "top_logprobs": [21], "frequency_penalty": [3], "presence_penalty": [-3],
      "logit_bias": [{"50256": 101}, {"1": -1e9}]}),
    ("/v1/completions", "tenant", {"model": "m", "prompt": "x"},
     {"seed": [], "max_tokens": [-1], "best_of": [0, 21], "logprobs": [6], "n": [0],
      "prompt": [[2**40], [[1, -5]]]}),
    ("/v1/jobs", "tenant", {"cards": 1, "accelerators": ["H20"], "est_hours": 1},
     {"cards": [0], "est_hours": [0], "checkpoint_cost_s": [-1], "checkpoint_interval_min": [0],
      "priority": [10, -1], "deadline": [-1], "max_price_cny": [0], "max_retries": [11]}),
    ("/v1/deployments", "tenant", {"model": "m", "origins": ["hangzhou"]},
     {"budget_ms": [0], "cards_per_replica": [0, 1025], "min_cities": [0, 17], "replicas": [0],
      "slots_per_replica": [0, 4097]}),
]


@pytest.fixture
async def clients(tmp_path: Path, nats_server: NatsServer):  # type: ignore[no-untyped-def]
    async with running_hub(hub_config(tmp_path, nats_server.url)) as hub:
        admin = hub.create_admin_key("test")
        key = hub.create_tenant("acme", default_origin="hangzhou")
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{hub.http_port}"
            yield {"admin": Client(session, base, admin), "tenant": Client(session, base, key)}


@pytest.mark.parametrize(("path", "who", "valid", "fields"), TABLE, ids=[row[0] for row in TABLE])
async def test_out_of_range_numbers_are_a_4xx_naming_the_field(clients, path: str, who: str, valid: dict[str, Any],
                                                               fields: dict[str, list[Any]]) -> None:  # type: ignore[no-untyped-def]
    client: Client = clients[who]
    wrong: list[str] = []
    for field, extra in fields.items():
        values = extra if field in ("logit_bias", "prompt") else [*HUGE, *extra]
        for i, value in enumerate(values):
            unique = {"id": f"{field.replace('_', '-')}-{i}"} if "id" in valid else {}  # no 409 for a second tenant
            status, body, _ = await client.call("POST", path, {**valid, **unique, field: value})
            error = body.get("error", {}) if isinstance(body, dict) else {}
            named = (error.get("param") or "").startswith(field) and field in error.get("message", "")
            if status not in (400, 422) or not named:
                wrong.append(f"{field}={value!r}: {status} {body}")
        # A double's range exceeded: msgspec refuses it, naming the field.
        status, body, _ = await client.call("POST", path, raw=f'{{"{field}": 1e400}}'.encode())
        if status not in (400, 422) or (body["error"]["param"] or "") != field:
            wrong.append(f"{field}=1e400: {status} {body}")
    for literal in ("NaN", "Infinity", "-Infinity"):  # not JSON: malformed, a 400
        status, body, _ = await client.call("POST", path, raw=f'{{"{next(iter(fields))}": {literal}}}'.encode())
        if status != 400 or body["error"]["code"] != "malformed_json":
            wrong.append(f"{literal}: {status} {body}")
    assert not wrong, "\n".join(wrong)


def _unbounded(node: Any, where: str, out: list[str]) -> None:
    if isinstance(node, dict):
        kinds = node.get("type")
        kinds = kinds if isinstance(kinds, list) else [kinds]
        if "integer" in kinds or "number" in kinds:
            low = "minimum" in node or "exclusiveMinimum" in node
            high = "maximum" in node or "exclusiveMaximum" in node
            if not (low and high):
                out.append(where)
        for key, value in node.items():
            _unbounded(value, f"{where}.{key}", out)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _unbounded(value, f"{where}[{i}]", out)


async def test_every_number_of_every_body_in_the_openapi_document_is_bounded(clients) -> None:  # type: ignore[no-untyped-def]
    """A sweep that also covers bodies added later: each one an endpoint decodes is in /openapi.json."""
    status, doc, _ = await clients["tenant"].call("GET", "/openapi.json")
    assert status == 200 and len(doc["components"]["schemas"]) >= 8
    bodies = {path: op["requestBody"] for path, item in doc["paths"].items() for op in item.values() if "requestBody" in op}
    assert {"/v1/tenants", "/v1/jobs", "/v1/deployments", "/v1/chat/completions"} <= set(bodies)
    missing: list[str] = []
    _unbounded(doc["components"]["schemas"], "components", missing)
    assert not missing, f"numbers without both bounds: {missing}"
