"""Key lifecycle against a real hub: real SQLite file, real NATS, real HTTP, and ``cpn key`` run as
a subprocess on the same database file.

Closes the row "keys: no way to revoke, rotate or expire an API key": each test below failed on
the code before (no endpoints, no ``cpn key``, revoked keys kept working from the hub's memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controlplane import cli
from controlplane.core import auth
from controlplane.nats.natsserver import NatsServer
from controlplane.store import db as store_db
from tests.support.hubrig import Client, hub_config, running_hub
from tests.support.olddb import migrated_before
from tests.support.waiting import until

CHECK = ("GET", "/v1/usage")  # any tenant endpoint that needs no site
ADMIN_CHECK = ("GET", "/v1/sites")


@pytest.fixture
async def rig(tmp_path: Path, nats_server: NatsServer):  # type: ignore[no-untyped-def]
    async with running_hub(hub_config(tmp_path, nats_server.url)) as hub:
        admin = hub.create_admin_key("test")
        acme = hub.create_tenant("acme")
        other = hub.create_tenant("other")
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{hub.http_port}"
            yield hub, Client(session, base, admin), Client(session, base, acme), Client(session, base, other), tmp_path


def as_key(client: Client, key: str) -> Client:
    return Client(client.session, client.base, key)


async def works(client: Client) -> tuple[int, Any]:
    status, body, _ = await client.call(*(ADMIN_CHECK if (client.key or "").startswith("cpn_admin_") else CHECK))
    return status, body


async def until_refused(client: Client, *, deadline_s: float) -> tuple[float, Any]:
    """Seconds until ``client``'s key gets a 401 (polling every 10 ms), and the 401's body."""
    seen: list[Any] = [None]

    async def refused() -> bool:
        status, seen[0] = await works(client)
        assert status in (200, 401), seen[0]
        return status == 401

    took_s = await until(refused, deadline_s, "the key to be refused", interval_s=0.01)
    return took_s, seen[0]


def cpn(*args: str) -> subprocess.CompletedProcess[str]:
    """``cpn`` as an operator runs it: a process of its own."""
    return subprocess.run([sys.executable, "-m", "controlplane.cli", *args], capture_output=True, text=True, timeout=60)


def cpn_here(*args: str) -> subprocess.CompletedProcess[str]:
    """``cpn`` run in this process (``cli.main``, what the process runs), its exit status and output
    captured as :func:`cpn` gives them, without a Python start-up for every call."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as exc:  # argparse's usage errors
            code = int(exc.code or 0)
    return subprocess.CompletedProcess(["cpn", *args], code, out.getvalue(), err.getvalue())


async def key_id_of(admin: Client, path: str, key: str) -> str:
    status, body, _ = await admin.call("GET", path)
    assert status == 200, body
    [row] = [r for r in body["data"] if key.startswith(r["prefix"]) and r["state"] == "active"]
    return str(row["id"])


async def test_revoked_key_refused_on_the_next_request(rig) -> None:  # type: ignore[no-untyped-def]
    hub, admin, acme, _, _ = rig
    assert (await works(acme))[0] == 200
    key_id = await key_id_of(admin, "/v1/tenants/acme/keys", acme.key)
    status, body, _ = await admin.call("DELETE", f"/v1/tenants/acme/keys/{key_id}")
    assert status == 200 and body["state"] == "revoked" and body["revoked_at"] > 0, body
    took, refused = await until_refused(acme, deadline_s=1.0)
    assert took < 0.1, took  # the hub that revoked it dropped it from memory: the very next request
    assert refused["error"]["message"] == "API key revoked" and refused["error"]["code"] == "api_key_revoked"
    # The listing shows it revoked, and never a key or a digest.
    status, body, _ = await admin.call("GET", "/v1/tenants/acme/keys")
    [row] = body["data"]
    assert row["state"] == "revoked" and set(row) == {"id", "prefix", "role", "tenant_id", "label", "created_at",
                                                        "expires_at", "revoked_at", "state"}
    assert auth.hash_key(acme.key) not in str(body) and acme.key not in str(body)
    assert acme.key.startswith(row["prefix"]) and len(row["prefix"]) == len("cpn_acme_") + 4
    status, metrics, _ = await as_key(admin, "").call("GET", "/metrics")
    assert 'cpn_refused_api_keys_total{reason="revoked"} 1.0' in metrics, metrics  # counted, for the operator
    # Revoking again changes nothing.
    status, again, _ = await admin.call("DELETE", f"/v1/tenants/acme/keys/{key_id}")
    assert status == 200 and again["revoked_at"] == body["data"][0]["revoked_at"]


@pytest.mark.parametrize("how", [("revoke",), ("rotate", "--grace-s", "0")])
async def test_key_revoked_by_cli_refused_by_running_hub_within_a_second(rig, how: tuple[str, ...]) -> None:  # type: ignore[no-untyped-def]
    hub, admin, acme, _, tmp = rig
    assert (await works(acme))[0] == 200  # the hub now holds the key in memory
    key_id = await key_id_of(admin, "/v1/tenants/acme/keys", acme.key)
    result = await asyncio.to_thread(cpn, "key", how[0], key_id, *how[1:], "--tenant", "acme", "--db", str(tmp / "hub.db"))
    assert result.returncode == 0, result.stderr
    took, refused = await until_refused(acme, deadline_s=3.0)
    print(f"{how[0]} by another process: refused after {took:.3f} s")
    assert took <= auth.RECHECK_S + 0.1, took
    assert refused["error"]["message"] == "API key revoked"
    if how[0] == "rotate":
        assert (await works(as_key(acme, result.stdout.strip())))[0] == 200


async def test_rotate_keeps_both_keys_during_grace_then_only_the_new(rig) -> None:  # type: ignore[no-untyped-def]
    hub, admin, acme, _, _ = rig
    key_id = await key_id_of(admin, "/v1/tenants/acme/keys", acme.key)
    status, body, _ = await admin.call("POST", f"/v1/tenants/acme/keys/{key_id}/rotate", {"grace_s": 1.5})
    assert status == 201, body
    new = as_key(acme, body["new"]["api_key"])
    assert body["old"]["id"] == key_id and body["old"]["state"] == "active" and body["old"]["expires_at"] > time.time()
    assert (await works(acme))[0] == 200 and (await works(new))[0] == 200
    took, refused = await until_refused(acme, deadline_s=5.0)
    assert 0.5 < took < 2.5, took
    assert refused["error"]["message"] == "API key expired"
    assert (await works(new))[0] == 200
    # A key that stopped working cannot be rotated.
    status, body, _ = await admin.call("POST", f"/v1/tenants/acme/keys/{key_id}/rotate", {})
    assert status == 409 and body["error"]["code"] == "key_expired", body


async def test_rotate_with_no_grace_revokes_at_once(rig) -> None:  # type: ignore[no-untyped-def]
    hub, admin, acme, _, _ = rig
    key_id = await key_id_of(admin, "/v1/tenants/acme/keys", acme.key)
    status, body, _ = await admin.call("POST", f"/v1/tenants/acme/keys/{key_id}/rotate", {"grace_s": 0, "label": "v2"})
    assert status == 201 and body["old"]["state"] == "revoked" and body["new"]["label"] == "v2", body
    status, refused = await works(acme)
    assert status == 401 and refused["error"]["message"] == "API key revoked"
    assert (await works(as_key(acme, body["new"]["api_key"])))[0] == 200


async def test_default_rotation_grace_is_a_day(rig) -> None:  # type: ignore[no-untyped-def]
    hub, admin, acme, _, _ = rig
    key_id = await key_id_of(admin, "/v1/tenants/acme/keys", acme.key)
    before = time.time()
    status, body, _ = await admin.call("POST", f"/v1/tenants/acme/keys/{key_id}/rotate")
    assert status == 201, body
    assert before + 86_400 <= body["old"]["expires_at"] <= time.time() + 86_400
    assert (await works(acme))[0] == 200


async def test_expiring_key(rig) -> None:  # type: ignore[no-untyped-def]
    hub, admin, acme, _, _ = rig
    status, body, _ = await admin.call("POST", "/v1/tenants/acme/keys", {"ttl_s": 1.0, "label": "short"})
    assert status == 201 and body["expires_at"] is not None and body["api_key"].startswith("cpn_acme_"), body
    short = as_key(acme, body["api_key"])
    assert (await works(short))[0] == 200
    took, refused = await until_refused(short, deadline_s=4.0)
    assert refused["error"]["message"] == "API key expired" and refused["error"]["code"] == "api_key_expired"
    assert (await works(acme))[0] == 200  # the tenant's other key is untouched
    status, body, _ = await admin.call("GET", "/v1/tenants/acme/keys")
    assert sorted(r["state"] for r in body["data"]) == ["active", "expired"]


@pytest.mark.parametrize(("body", "field"), [
    ({"expires_at": 1000.0}, "expires_at"),
    ({"ttl_s": 10, "expires_at": 4_000_000_000}, "ttl_s"),
    ({"ttl_s": -1}, "ttl_s"),
    ({"ttl_s": 1e300}, "ttl_s"),
    ({"expires_at": 1e300}, "expires_at"),
    ({"label": "x" * 201}, "label"),
])
async def test_bad_expiry_is_a_400_naming_the_field(rig, body: dict[str, Any], field: str) -> None:  # type: ignore[no-untyped-def]
    hub, admin, _, _, _ = rig
    status, answer, _ = await admin.call("POST", "/v1/tenants/acme/keys", body)
    assert status == 400 and field in (answer["error"]["param"] or ""), answer


async def test_unknown_key_is_just_invalid(rig) -> None:  # type: ignore[no-untyped-def]
    # Nothing about revocation or expiry is said for a key no one was ever given.
    hub, _, acme, _, _ = rig
    status, body = await works(as_key(acme, auth.new_key("acme")))
    assert status == 401 and body["error"]["message"] == "invalid API key"


async def test_last_working_admin_key_cannot_be_revoked(rig) -> None:  # type: ignore[no-untyped-def]
    hub, admin, _, _, _ = rig
    first = await key_id_of(admin, "/v1/admin/keys", admin.key)
    status, body, _ = await admin.call("DELETE", f"/v1/admin/keys/{first}")
    assert status == 409 and body["error"]["code"] == "last_admin_key" and "last working admin key" in body["error"]["message"]
    # An expiring second key does not count once it has expired.
    status, body, _ = await admin.call("POST", "/v1/admin/keys", {"ttl_s": 0.3})
    assert status == 201 and body["role"] == "admin" and body["api_key"].startswith("cpn_admin_"), body
    await until_refused(as_key(admin, body["api_key"]), deadline_s=3.0)
    status, body, _ = await admin.call("DELETE", f"/v1/admin/keys/{first}")
    assert status == 409, body
    # With a second working key, the first can go; then the second is the last.
    status, body, _ = await admin.call("POST", "/v1/admin/keys", {"label": "second"})
    second = as_key(admin, body["api_key"])
    status, body, _ = await second.call("DELETE", f"/v1/admin/keys/{first}")
    assert status == 200 and body["state"] == "revoked", body
    status, _, _ = await admin.call("GET", "/v1/sites")
    assert status == 401
    second_id = await key_id_of(second, "/v1/admin/keys", second.key)
    status, body, _ = await second.call("DELETE", f"/v1/admin/keys/{second_id}")
    assert status == 409, body
    # Rotating the last admin key is fine: the new one exists before the old one stops.
    status, body, _ = await second.call("POST", f"/v1/admin/keys/{second_id}/rotate", {"grace_s": 0})
    assert status == 201, body
    third = as_key(admin, body["new"]["api_key"])
    assert (await third.call("GET", "/v1/sites"))[0] == 200 and (await second.call("GET", "/v1/sites"))[0] == 401


KEY_ENDPOINTS = [
    ("GET", "/v1/tenants/acme/keys"), ("POST", "/v1/tenants/acme/keys"),
    ("DELETE", "/v1/tenants/acme/keys/key_0000000000000000"), ("POST", "/v1/tenants/acme/keys/key_0000000000000000/rotate"),
    ("GET", "/v1/admin/keys"), ("POST", "/v1/admin/keys"),
    ("DELETE", "/v1/admin/keys/key_0000000000000000"), ("POST", "/v1/admin/keys/key_0000000000000000/rotate"),
]


async def test_tenant_keys_cannot_manage_keys(rig) -> None:  # type: ignore[no-untyped-def]
    hub, _, acme, _, _ = rig
    for method, path in KEY_ENDPOINTS:
        status, body, _ = await acme.call(method, path, {} if method == "POST" else None)
        assert status == 403, (method, path, body)
    status, body, _ = await as_key(acme, "").call("GET", "/v1/admin/keys")
    assert status == 401


async def test_another_tenants_key_is_not_found(rig) -> None:  # type: ignore[no-untyped-def]
    hub, admin, acme, other, _ = rig
    other_id = await key_id_of(admin, "/v1/tenants/other/keys", other.key)
    admin_id = await key_id_of(admin, "/v1/admin/keys", admin.key)
    for path in (f"/v1/tenants/acme/keys/{other_id}", f"/v1/tenants/acme/keys/{admin_id}",
                 f"/v1/admin/keys/{other_id}"):
        status, body, _ = await admin.call("DELETE", path)
        assert status == 404 and body["error"]["message"].startswith("key "), (path, body)
        status, body, _ = await admin.call("POST", path + "/rotate", {})
        assert status == 404, (path, body)
    assert (await works(other))[0] == 200
    status, body, _ = await admin.call("GET", "/v1/tenants/nobody/keys")
    assert status == 404 and "tenant" in body["error"]["message"]
    status, body, _ = await admin.call("POST", "/v1/tenants/nobody/keys", {})
    assert status == 404


async def test_openapi_lists_the_key_endpoints(rig) -> None:  # type: ignore[no-untyped-def]
    hub, admin, _, _, _ = rig
    status, doc, _ = await admin.call("GET", "/openapi.json")
    assert status == 200
    for method, path in [("get", "/v1/tenants/{tenant}/keys"), ("delete", "/v1/admin/keys/{key_id}"),
                         ("post", "/v1/tenants/{tenant}/keys/{key_id}/rotate")]:
        assert method in doc["paths"][path], path


# ------------------------------------------------------------------ cpn key, on a real SQLite file


def test_cli_lifecycle_on_a_database_file(tmp_path: Path) -> None:
    db = str(tmp_path / "hub.db")
    made = cpn_here("tenant", "create", "acme", "--db", db)
    assert made.returncode == 0, made.stderr
    first_key = made.stdout.strip()
    assert cpn_here("key", "create", "--admin", "--db", db).returncode == 0
    created = cpn_here("key", "create", "--tenant", "acme", "--ttl-s", "3600", "--label", "ci", "--db", db)
    assert created.returncode == 0 and created.stdout.startswith("cpn_acme_"), created.stderr
    listed = cpn_here("key", "list", "--tenant", "acme", "--db", db)
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 2
    assert first_key not in listed.stdout and auth.hash_key(first_key) not in listed.stdout
    import json

    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    first_id = next(r["id"] for r in rows if first_key.startswith(r["prefix"]) and r["expires_at"] is None)
    rotated = cpn_here("key", "rotate", first_id, "--tenant", "acme", "--grace-s", "60", "--db", db)
    assert rotated.returncode == 0 and rotated.stdout.startswith("cpn_acme_"), rotated.stderr
    assert "replaces" in rotated.stderr and "works until" in rotated.stderr
    revoked = cpn_here("key", "revoke", first_id, "--tenant", "acme", "--db", db)
    assert revoked.returncode == 0 and json.loads(revoked.stdout)["state"] == "revoked"
    conn = sqlite3.connect(db)
    states = conn.execute("SELECT count(*) FROM api_keys WHERE tenant_id = 'acme' AND revoked_at IS NULL").fetchone()[0]
    assert states == 2  # the ttl key and the rotated-in key
    conn.close()


def test_cli_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "hub.db"
    result = cpn("key", "list", "--admin", "--db", str(missing))  # the real process: exit 2, one line, no traceback
    assert result.returncode == 2 and "no database at" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not missing.exists() and not missing.parent.exists()
    db = str(tmp_path / "hub.db")
    assert cpn_here("tenant", "create", "acme", "--db", db).returncode == 0
    for args, needle in [
        (("key", "revoke", "key_0000000000000000", "--tenant", "acme"), "not found"),
        (("key", "list", "--tenant", "nobody"), "tenant 'nobody' not found"),
        (("key", "create", "--tenant", "acme", "--ttl-s", "-5"), "ttl_s must be positive"),
    ]:
        result = cpn_here(*args, "--db", db)
        assert result.returncode == 2 and needle in result.stderr and len(result.stderr.splitlines()) == 1, (args, result.stderr)
    assert cpn_here("key", "create", "--admin", "--db", db).returncode == 0
    [row] = [line for line in cpn_here("key", "list", "--admin", "--db", db).stdout.splitlines()]
    import json

    admin_id = json.loads(row)["id"]
    result = cpn_here("key", "revoke", admin_id, "--admin", "--db", db)
    assert result.returncode == 2 and "last working admin key" in result.stderr
    result = cpn_here("tenant", "list", "--db", str(missing))
    assert result.returncode == 2 and not missing.exists()


def test_migration_gives_old_keys_an_id_and_keeps_them_working(tmp_path: Path) -> None:
    """A database made before 0031_keys: its keys get ids, no expiry, and still authenticate."""
    path = tmp_path / "old.db"
    conn = migrated_before(path, "0031")
    key = auth.new_key("admin")
    conn.execute("INSERT INTO api_keys (key_hash, tenant_id, role, label, created_at) VALUES (?, NULL, 'admin', '', 1)",
                 (auth.hash_key(key),))
    conn.close()
    db = store_db.open_db(path)
    from controlplane.store import tenants

    [p] = tenants.load_keys(db, now=time.time())
    assert p.key_id == "key_" + auth.hash_key(key)[:16] and p.expires_at is None
    [row] = tenants.list_keys(db, role="admin", tenant_id=None, now=time.time())
    assert row["state"] == "active" and row["prefix"] == ""


def test_provider_keys_from_the_cli_and_the_rebuilt_table_keeps_old_keys(tmp_path: Path) -> None:
    """0034_provider_keys rebuilds api_keys to admit role 'provider': keys made before it keep
    their ids, expiry and revocation; ``cpn key --provider`` then manages a provider's keys."""
    path = tmp_path / "old.db"
    conn = migrated_before(path, "0034")
    with pytest.raises(sqlite3.IntegrityError):  # the old CHECK refuses a provider key
        conn.execute("INSERT INTO api_keys (key_hash, role, created_at, id) VALUES ('h', 'provider', 1, 'key_p')")
    old = auth.new_key("acme")
    conn.execute("INSERT INTO api_keys (key_hash, tenant_id, role, label, created_at, id, prefix, expires_at, revoked_at) "
                 "VALUES (?, 'acme', 'tenant', 'old', 1, 'key_old', 'cpn_acme_x', 9e9, 5)", (auth.hash_key(old),))
    conn.close()
    store_db.open_db(path).conn.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT id, tenant_id, role, label, expires_at, revoked_at FROM api_keys").fetchall() == [
        ("key_old", "acme", "tenant", "old", 9e9, 5)]
    assert {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'api_keys'")
            } >= {"api_keys_tenant", "api_keys_id"}
    conn.close()

    db = str(path)
    made = cpn_here("key", "create", "--provider", "xirang-7", "--label", "ops", "--db", db)
    assert made.returncode == 0 and made.stdout.startswith("cpn_prov-xirang-7_"), made.stderr
    import json

    [row] = [json.loads(line) for line in cpn_here("key", "list", "--provider", "xirang-7", "--db", db).stdout.splitlines()]
    assert row["role"] == "provider" and row["state"] == "active"
    assert row["provider_id"] == "xirang-7" and row["tenant_id"] is None
    assert cpn_here("key", "list", "--provider", "westgrid", "--db", db).stdout == ""
    from controlplane.store import tenants

    found = tenants.find_key(store_db.open_db(path), auth.hash_key(made.stdout.strip()))
    assert found is not None and found[0].provider_id == "xirang-7" and found[0].tenant_id is None
    bad = cpn_here("key", "create", "--provider", "cpn-operator", "--db", db)
    assert bad.returncode == 2 and "managed with admin keys" in bad.stderr and len(bad.stderr.splitlines()) == 1
    revoked = cpn_here("key", "revoke", row["id"], "--provider", "xirang-7", "--db", db)
    assert revoked.returncode == 0 and json.loads(revoked.stdout)["state"] == "revoked"
