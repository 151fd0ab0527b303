"""natsconf: identities, permissions, config text and violation parsing (pure; no server here —
tests/adapters/test_nats_permissions.py and test_deploy_cli.py run the real one)."""

from __future__ import annotations

import itertools
import random
import re

import bcrypt
import msgspec
import pytest

from controlplane.nats import natsconf
from edge_agent import wire

SITES = ["bj-hub", "sh-edge", "gz_1"]


def seeded_bytes(seed: int = 1):  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    return lambda n: rng.randbytes(n)


@pytest.fixture(scope="module")
def creds() -> natsconf.CredentialSet:
    return natsconf.generate_credentials(SITES, seeded_bytes(), bcrypt_cost=4)


# --------------------------------------------------------------------------- credentials


def test_every_identity_is_distinct_and_long(creds: natsconf.CredentialSet) -> None:
    everyone = [creds.hub, creds.route, *creds.sites.values()]
    assert [c.user for c in everyone] == ["cpn-hub", "cpn-route", "site-bj-hub", "site-sh-edge", "site-gz_1"]
    passwords = [c.password for c in everyone]
    assert len(set(passwords)) == len(passwords)
    for pw in passwords:
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", pw)  # 32 bytes, URL-safe (goes into leaf URLs)


def test_server_side_hash_is_bcrypt_of_the_password(creds: natsconf.CredentialSet) -> None:
    c = creds.sites["sh-edge"]
    assert c.password_bcrypt.startswith("$2b$04$")
    assert bcrypt.checkpw(c.password.encode(), c.password_bcrypt.encode())
    assert not bcrypt.checkpw(creds.sites["gz_1"].password.encode(), c.password_bcrypt.encode())


def test_repr_never_shows_a_password(creds: natsconf.CredentialSet) -> None:
    c = creds.sites["bj-hub"]
    assert c.password not in repr(c) and c.password not in repr(creds)


def test_derived_credentials_are_stable_per_secret_and_differ_between_secrets() -> None:
    a1 = natsconf.derive_credentials(["x", "y"], b"s" * 32, bcrypt_cost=4)
    a2 = natsconf.derive_credentials(["y", "x"], b"s" * 32, bcrypt_cost=4)
    b = natsconf.derive_credentials(["x", "y"], b"t" * 32, bcrypt_cost=4)
    assert a1.sites["x"] == a2.sites["x"] and a1.hub == a2.hub
    assert a1.sites["x"].password != b.sites["x"].password
    assert a1.sites["x"].password != a1.sites["y"].password


def test_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        natsconf.derive_credentials(["x"], b"short")


@pytest.mark.parametrize(
    "sites, message",
    [(["ok", "Bad.Id"], r"sites\[1\]: 'Bad.Id' is not a valid site id"), (["a", "b", "a"], r"sites\[2\]: .* twice")],
)
def test_bad_site_ids_are_named(sites: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        natsconf.generate_credentials(sites, seeded_bytes())


def test_credentials_file_round_trip(creds: natsconf.CredentialSet) -> None:
    data = natsconf.credentials_file(creds.sites["gz_1"], ["nats://node-1:4222"])
    f = natsconf.read_credentials_file(data)
    assert (f.user, f.site, f.leaf_user, f.inbox_prefix) == ("site-gz_1", "gz_1", "leaf-gz_1", "_INBOX.gz_1")
    assert f.password == creds.sites["gz_1"].password and f.nats == ["nats://node-1:4222"]
    hub = natsconf.read_credentials_file(natsconf.credentials_file(creds.hub, []))
    assert hub.inbox_prefix == wire.HUB_INBOX_PREFIX and hub.site == ""
    with pytest.raises(msgspec.ValidationError, match="password"):
        natsconf.read_credentials_file(b'{"user": "x"}')


# --------------------------------------------------------------------------- permissions


def test_site_may_publish_only_its_own_subjects_and_answer_streams() -> None:
    p = natsconf.site_permissions("sh-edge")
    assert p["publish"]["allow"] == [
        "cpn.v1.site.sh-edge.register", "cpn.v1.site.sh-edge.hb", "cpn.v1.site.sh-edge.evt"]
    assert p["subscribe"]["allow"] == ["cpn.v1.site.sh-edge.infer", "cpn.v1.site.sh-edge.cmd", "_INBOX.sh-edge.>"]
    # Many responses per request (streaming), not the single one `allow_responses: true` gives.
    assert p["allow_responses"]["max"] >= 1000
    assert not any(s.endswith((".>", ".*")) and s.startswith("cpn") for s in p["publish"]["allow"])


def test_leaf_identity_answers_through_the_hub_inbox_instead() -> None:
    p = natsconf.site_permissions("sh-edge", leaf=True)
    assert "allow_responses" not in p
    assert p["publish"]["allow"][-1] == "_INBOX.hub.>"
    assert p["subscribe"] == natsconf.site_permissions("sh-edge")["subscribe"]


def test_no_site_can_touch_another_sites_subjects(creds: natsconf.CredentialSet) -> None:
    users = natsconf.account_users(creds)
    for u in users:
        site = natsconf.site_of_user(u["user"])
        if site is None:
            continue
        allowed = u["permissions"]["publish"]["allow"] + u["permissions"]["subscribe"]["allow"]
        for other in SITES:
            if other != site:
                assert not any(f".{other}." in s for s in allowed), (u["user"], other)


def test_connection_types_bind_each_identity_to_its_role(creds: natsconf.CredentialSet) -> None:
    by_user = {u["user"]: u for u in natsconf.account_users(creds)}
    assert by_user["leaf-gz_1"]["allowed_connection_types"] == ["LEAFNODE"]
    assert "LEAFNODE" not in by_user["site-gz_1"]["allowed_connection_types"]
    assert "allowed_connection_types" not in by_user["cpn-hub"]


def test_hub_permissions_cover_what_the_hub_does() -> None:
    p = natsconf.hub_permissions()
    assert {"cpn.>", "$JS.>", "_INBOX.>"} <= set(p["publish"]["allow"])
    assert "cpn.>" in p["subscribe"]["allow"]  # register, hb, evt wildcards
    assert wire.HUB_INBOX_PREFIX + ".>" in p["subscribe"]["allow"]
    assert "_INBOX.>" not in p["subscribe"]["allow"]  # the hub does not read sites' inboxes


# --------------------------------------------------------------------------- config text


def test_server_configs_hold_hashes_not_passwords(creds: natsconf.CredentialSet) -> None:
    single = natsconf.single_server_config(creds)
    for c in [creds.hub, *creds.sites.values()]:
        assert c.password not in single
        assert f'"{c.password_bcrypt}"' in single  # quoted: a bare "$2b$..." is a variable reference
    assert 'max_file: ' in single and "leafnodes" in single


def test_cluster_routes_point_at_the_other_nodes(creds: natsconf.CredentialSet) -> None:
    confs = natsconf.cluster_configs(creds, hosts=["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    assert list(confs) == ["node-1", "node-2", "node-3"]
    routes = re.findall(r'"nats-route://[^@]+@([0-9.]+):6222"', confs["node-2"])
    assert routes == ["10.0.0.1", "10.0.0.3"]
    assert 'server_name: "node-2"' in confs["node-2"] and 'name: "cpn"' in confs["node-2"]


@pytest.mark.parametrize("kwargs, message", [({"n": 2}, "at least 3"), ({"hosts": ["a", "b"]}, "hosts")])
def test_cluster_refuses_bad_shapes(creds: natsconf.CredentialSet, kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=message):
        natsconf.cluster_configs(creds, **kwargs)


def test_leaf_config_uses_the_leaf_identity_on_every_hub_url(creds: natsconf.CredentialSet) -> None:
    c = creds.sites["gz_1"]
    text = natsconf.leaf_config("gz_1", ["node-1", "nats-leaf://node-2:7000", "tls://[::1]:7422"], c)
    urls = re.findall(r'"((?:nats-leaf|tls)://[^"]+)"', text)
    assert urls == [
        f"nats-leaf://leaf-gz_1:{c.password}@node-1:7422",
        f"nats-leaf://leaf-gz_1:{c.password}@node-2:7000",
        f"tls://leaf-gz_1:{c.password}@[::1]:7422",
    ]
    assert 'listen: "127.0.0.1:4222"' in text and "jetstream" not in text


@pytest.mark.parametrize(
    "site, urls, message",
    [("sh-edge", ["node-1"], "credentials are for site 'gz_1'"), ("gz_1", [], "hub_urls"), ("gz_1", ["nats-leaf://"], "no host")],
)
def test_leaf_config_errors(creds: natsconf.CredentialSet, site: str, urls: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        natsconf.leaf_config(site, urls, creds.sites["gz_1"])


def test_embedded_config_is_stable_for_cpn_up_restarts() -> None:
    t1, hub1, sites1 = natsconf.embedded_config(["a", "b"], secret=b"k" * 32, jetstream_dir="/d/js")
    t2, hub2, sites2 = natsconf.embedded_config(["a", "b"], secret=b"k" * 32, jetstream_dir="/d/js")
    assert t1 == t2 and hub1 == hub2 and sites1 == sites2
    assert hub1.user == "cpn-hub" and sites1["a"].user == "site-a"
    # Address, port and store dir come from NatsServer's flags; naming the store twice is fatal.
    assert "store_dir" not in t1 and "listen" not in t1 and "/d/js" in t1


def test_render_quotes_keys_and_values_that_need_it() -> None:
    text = natsconf.render({"a": {"b-c": ["$x", 'q"'], "n": 3, "t": True, "e": []}})
    assert text == 'a: {\n  "b-c": ["$x", "q\\""]\n  n: 3\n  t: true\n  e: []\n}\n'
    with pytest.raises(TypeError, match="float"):
        natsconf.render({"x": 1.5})


# --------------------------------------------------------------------------- violations

# Captured from nats-server 2.15.1 (tests/adapters/test_nats_permissions.py produces them live).
PUB_LINE = ('[4601] 2026/11/21 12:49:54.078332 [ERR] 127.0.0.1:57276 - cid:6 - "v2.16.0:python3" - '
            '"CPN/user:site-a" - Publish Violation - Subject "cpn.v1.site.b.hb"')
SUB_LINE = ('[4601] 2026/11/21 12:49:54.078321 [ERR] 127.0.0.1:57276 - cid:6 - "v2.16.0:python3:agent-a" - '
            '"CPN/user:site-a" - Subscription Violation - Subject "cpn.>", SID 1')
LEAF_LINE = ('[7190] 2026/11/21 12:53:51.427309 [ERR] 127.0.0.1:37470 - lid:7 - Publish Violation on '
             '"cpn.v1.site.b.hb" - Check other side configuration')
OLD_LINE = '[1] 2020/01/01 00:00:00.000000 [ERR] 1.2.3.4:5 - cid:9 - Publish Violation - User "site-x", Subject "foo"'


def test_parse_client_publish_and_subscribe_violations() -> None:
    pub = natsconf.parse_violation(PUB_LINE)
    assert pub == natsconf.Violation(kind="publish", subject="cpn.v1.site.b.hb", user="site-a", account="CPN", connection="cid:6")
    assert pub is not None and pub.site == "a" and not pub.via_leaf
    sub = natsconf.parse_violation(SUB_LINE)
    assert sub is not None and (sub.kind, sub.subject, sub.user) == ("subscribe", "cpn.>", "site-a")


def test_parse_leaf_and_older_formats() -> None:
    leaf = natsconf.parse_violation(LEAF_LINE)
    assert leaf is not None and leaf.via_leaf and leaf.user == "" and leaf.subject == "cpn.v1.site.b.hb"
    old = natsconf.parse_violation(OLD_LINE)
    assert old is not None and old.user == "site-x" and old.subject == "foo"


@pytest.mark.parametrize("line", [
    "[1] 2026/11/21 12:00:00.000000 [INF] Server is ready",
    "",
    # A client naming itself like a violation must not forge one (its name is one quoted field).
    '[1] 2026/11/21 12:00:00.000000 [ERR] 1.2.3.4:5 - cid:3 - "x - Publish Violation - Subject \\"cpn.x\\"" - '
    '"CPN/user:site-a" - Slow Consumer Detected',
    '[1] 2026/11/21 12:00:00.000000 [INF] 1.2.3.4:5 - cid:3 - Publish Violation - Subject "cpn.x"',
])
def test_lines_without_a_violation(line: str) -> None:
    assert natsconf.parse_violation(line) is None


def test_counter_counts_by_user_and_kind_with_bounded_memory() -> None:
    counter = natsconf.ViolationCounter(max_users=2, keep=3)
    for line in [PUB_LINE, SUB_LINE, LEAF_LINE, OLD_LINE, "[INF] nothing", PUB_LINE]:
        counter(line)
    assert counter.total == 5
    assert counter.by_kind == {"publish": 4, "subscribe": 1}
    assert counter.by_user == {"site-a": 3, "leaf lid:7": 1, "other": 1}
    assert len(counter.recent) == 3 and "total=5" in repr(counter)
    snap = counter.snapshot()
    assert snap["total"] == 5 and snap["recent"][-1]["user"] == "site-a"


def test_parse_never_raises_on_garbage() -> None:
    rng = random.Random(7)
    alphabet = '[]ERR "-:cid lid Publish Subscription Violation Subject on\\'
    for _ in range(2000):
        line = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 120)))
        natsconf.parse_violation("[1] 2026/11/21 12:00:00.000000 [ERR] a - cid:1 - " + line)
    for parts in itertools.product(["Publish", "Subscription"], ['Subject "x\\"', 'on ""', "Reply"]):
        natsconf.parse_violation(f"[ERR] a - cid:1 - {parts[0]} Violation - {parts[1]}")


def test_cluster_with_gateways_has_a_system_account_and_fsyncs(creds: natsconf.CredentialSet) -> None:
    # nats-server (2.15) passes `-t` without it but refuses to start: leaf nodes + gateways need one.
    plain = natsconf.cluster_configs(creds)["node-1"]
    joined = natsconf.cluster_configs(creds, gateways={"other": ["nats://x:7222"]})["node-1"]
    assert "system_account" not in plain and 'system_account: "SYS"' in joined
    assert 'sync_interval: "always"' in plain and 'sync_interval: "always"' in joined
