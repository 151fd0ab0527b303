"""NATS identities, permissions and nats-server configuration text, as pure functions.

What this module promises:

- Rule 1: every site has its own identity. ``site-<site>`` connects as a client (agent straight to
  the hub's NATS), ``leaf-<site>`` connects as a leaf node (a nats-server at the site). Both may
  publish only ``cpn.v1.site.<site>.{register,hb,evt}`` and subscribe only to
  ``cpn.v1.site.<site>.{infer,cmd}`` and the site's own inbox ``_INBOX.<site>.>``. The hub is
  ``cpn-hub``. All live in one account, ``CPN``, with JetStream enabled.
- Rule 2: replies. A client site answers requests through ``allow_responses {max, expires}``: a
  streamed inference answer publishes many chunks to one reply subject, so ``max`` is large
  (plain ``allow_responses: true`` allows one). nats-server does not track response permissions
  across a leaf connection (measured with 2.15.1: every reply is dropped), so the leaf identity
  instead may publish on the hub's inbox ``_INBOX.hub.>``; the hub's inboxes carry unguessable tokens
  (random, or a keyed hash of a counter), and the hub checks that a reply names the site it asked.
- Rule 3: no secrets in a server config that does not need them: user passwords appear there
  only as bcrypt hashes. Passwords are 256-bit random (or HMAC-derived) tokens, so a low bcrypt
  cost is enough and keeps connection storms cheap for the server.
- Rule 4: nothing here does I/O, reads the clock or draws random numbers: randomness comes in as
  ``random_bytes`` (the caller passes ``secrets.token_bytes``) or is derived from a secret.
- Rule 5: every generated text is accepted by ``nats-server -t -c`` (2.15; checked in
  tests/adapters/test_deploy_cli.py).
- Rule 6: with :class:`TlsFiles`, every link is TLS: clients (server verified by its CA and host
  name), routes, gateways and leaf connections (both ends verified: mutual TLS), and leaf remotes
  dial ``tls://``. Only the embedded server of ``cpn up`` (loopback) stays plain.
- Rule 7: the ``CPN`` account's JetStream storage is bounded (:func:`account_jetstream`).

:func:`parse_violation` reads the server's log lines about permission violations and
:class:`ViolationCounter` counts them for the hub (plug it into ``NatsServer(on_line=...)``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import bcrypt
import msgspec

from edge_agent import wire

ACCOUNT = "CPN"
"""The one account every cpn identity lives in (JetStream enabled for it)."""
HUB_USER = "cpn-hub"
ROUTE_USER = "cpn-route"
SITE_USER_PREFIX = "site-"
LEAF_USER_PREFIX = "leaf-"

BCRYPT_COST = 6
"""bcrypt work factor for server-side hashes. Passwords are 256-bit random, so brute force is out
of reach at any cost; the factor only slows every connection the server authenticates
(cost 11, the natscli default, is ~0.1 s of CPU per connect: a 5,000-site reconnect storm)."""
PASSWORD_BYTES = 32

RESPONSE_MAX = 100_000
"""Responses a site may publish to one reply subject (streamed chunks plus the final result)."""
RESPONSE_EXPIRES_S = 300
"""How long after a request the site may still answer it (longest stream we allow)."""

ACCOUNT_MAX_FILE_BYTES = 4 << 30
"""JetStream disk the ``CPN`` account may use (every stream together; ``CPN_EVENTS`` is capped
lower by the hub). Whatever sites publish, the hub's disk holds at most this much of it."""
ACCOUNT_MAX_MEMORY_BYTES = 256 << 20
"""JetStream memory the ``CPN`` account may use (cpn keeps no memory streams; a bound all the same)."""

DEFAULT_CLIENT_PORT = 4222
DEFAULT_CLUSTER_PORT = 6222
DEFAULT_LEAFNODE_PORT = 7422
DEFAULT_GATEWAY_PORT = 7222
DEFAULT_STORE_DIR = "/var/lib/cpn/nats"
DEFAULT_MONITOR = "127.0.0.1:8222"
DEFAULT_SITE_LISTEN = f"127.0.0.1:{DEFAULT_CLIENT_PORT}"


class Credentials(msgspec.Struct, frozen=True, kw_only=True):
    """One identity: what a client sends (``user``, ``password``) and what a server stores."""

    user: str
    password: str
    password_bcrypt: str = ""
    site: str = ""
    """The site this identity belongs to ("" for the hub and the cluster routes)."""

    def __repr__(self) -> str:  # never print a password by accident
        return f"Credentials(user={self.user!r}, site={self.site!r})"

    @property
    def leaf_user(self) -> str:
        """User name the site's leaf node connects with (same password)."""
        return leaf_user(self.site) if self.site else ""


class TlsFiles(msgspec.Struct, frozen=True, kw_only=True):
    """Where a server (or a leaf node) finds its CA, certificate and key (paths on that host)."""

    ca: str
    cert: str
    key: str

    def block(self, *, verify: bool, timeout_s: int = 2) -> dict[str, Any]:
        """A nats-server ``tls {}`` block; ``verify`` makes the peer present a certificate of the CA."""
        doc: dict[str, Any] = {"cert_file": self.cert, "key_file": self.key, "ca_file": self.ca}
        if verify:
            doc["verify"] = True
        doc["timeout"] = timeout_s
        return doc


def tls_files(tls_dir: str, name: str) -> TlsFiles:
    """The file names ``cpn deploy nats-config`` uses under ``tls_dir`` for identity ``name``."""
    base = tls_dir.rstrip("/")
    return TlsFiles(ca=f"{base}/ca.pem", cert=f"{base}/{name}.pem", key=f"{base}/{name}-key.pem")


class CredentialSet(msgspec.Struct, frozen=True, kw_only=True):
    """Every identity of one deployment."""

    hub: Credentials
    route: Credentials
    """Shared by the cluster nodes to authenticate routes to each other."""
    sites: dict[str, Credentials]

    def __repr__(self) -> str:
        return f"<CredentialSet hub={self.hub.user} sites={len(self.sites)}>"


# --------------------------------------------------------------------------- identities


def site_user(site: str) -> str:
    """User name of a site's agent when it connects straight to the hub's NATS."""
    return SITE_USER_PREFIX + wire.check_id(site, "site")


def leaf_user(site: str) -> str:
    """User name of a site's leaf node."""
    return LEAF_USER_PREFIX + wire.check_id(site, "site")


def site_of_user(user: str) -> str | None:
    """The site id behind a ``site-``/``leaf-`` user name, or None (hub, routes, unknown)."""
    for prefix in (SITE_USER_PREFIX, LEAF_USER_PREFIX):
        if user.startswith(prefix) and wire.is_valid_id(user[len(prefix):]):
            return user[len(prefix):]
    return None


def _check_sites(site_ids: Iterable[str]) -> list[str]:
    sites = list(site_ids)
    seen: set[str] = set()
    for i, site in enumerate(sites):
        if not wire.is_valid_id(site):
            raise ValueError(f"sites[{i}]: {site!r} is not a valid site id (want {wire.ID_PATTERN})")
        if site in seen:
            raise ValueError(f"sites[{i}]: site {site!r} appears twice")
        seen.add(site)
    return sites


_STD_B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_BCRYPT_B64 = b"./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_TO_BCRYPT_B64 = bytes.maketrans(_STD_B64, _BCRYPT_B64)


def bcrypt_hash(password: str, salt16: bytes, cost: int = BCRYPT_COST) -> str:
    """bcrypt hash (``$2b$``) of ``password`` with the given 16 salt bytes (deterministic).

    nats-server recognises ``$2a$``/``$2b$`` passwords in its config as bcrypt hashes.
    """
    if len(salt16) != 16:
        raise ValueError("salt16 must be 16 bytes")
    if not 4 <= cost <= 31:
        raise ValueError(f"bcrypt cost {cost} out of range 4..31")
    salt = base64.b64encode(salt16).rstrip(b"=").translate(_TO_BCRYPT_B64)
    return bcrypt.hashpw(password.encode(), b"$2b$%02d$" % cost + salt).decode()


def _identity(user: str, site: str, pw_bytes: bytes, salt16: bytes, cost: int) -> Credentials:
    # URL-safe alphabet without padding: the password goes into leaf and route URLs unescaped.
    password = base64.urlsafe_b64encode(pw_bytes).rstrip(b"=").decode()
    return Credentials(user=user, password=password, password_bcrypt=bcrypt_hash(password, salt16, cost), site=site)


def _credential_set(
    site_ids: Iterable[str], draw: Callable[[str, str], bytes], cost: int
) -> CredentialSet:
    sites = _check_sites(site_ids)

    def make(user: str, site: str = "") -> Credentials:
        return _identity(user, site, draw("password", user)[:PASSWORD_BYTES], draw("salt", user)[:16], cost)

    return CredentialSet(
        hub=make(HUB_USER),
        route=make(ROUTE_USER),
        sites={site: make(site_user(site), site) for site in sites},
    )


def generate_credentials(
    site_ids: Iterable[str], random_bytes: Callable[[int], bytes], *, bcrypt_cost: int = BCRYPT_COST
) -> CredentialSet:
    """Fresh credentials for the hub, the cluster routes and every site.

    Args:
        site_ids: the sites (each a valid id, no duplicates).
        random_bytes: a source of unguessable bytes, e.g. ``secrets.token_bytes``.
        bcrypt_cost: work factor of the hashes stored in server configs.

    Raises:
        ValueError: a site id is invalid or repeated (the message names ``sites[i]``).
    """

    def draw(kind: str, user: str) -> bytes:
        data = random_bytes(PASSWORD_BYTES if kind == "password" else 16)
        if len(data) < (PASSWORD_BYTES if kind == "password" else 16):
            raise ValueError("random_bytes returned too few bytes")
        return data

    return _credential_set(site_ids, draw, bcrypt_cost)


def derive_credentials(
    site_ids: Iterable[str], secret: bytes, *, bcrypt_cost: int = BCRYPT_COST
) -> CredentialSet:
    """Credentials derived from one secret (HMAC-SHA256): the same secret gives the same set.

    Lets ``cpn up`` keep its identities across restarts by storing only the secret, and an
    operator regenerate configs reproducibly from a secret kept in a vault.

    Raises:
        ValueError: the secret is shorter than 16 bytes, or a site id is invalid or repeated.
    """
    if len(secret) < 16:
        raise ValueError("secret must be at least 16 bytes")

    def draw(kind: str, user: str) -> bytes:
        return hmac.new(secret, f"cpn/nats/{kind}/{user}".encode(), hashlib.sha256).digest()

    return _credential_set(site_ids, draw, bcrypt_cost)


# --------------------------------------------------------------------------- permissions


def site_permissions(
    site: str,
    *,
    leaf: bool = False,
    response_max: int = RESPONSE_MAX,
    response_expires_s: int = RESPONSE_EXPIRES_S,
) -> dict[str, Any]:
    """nats-server ``permissions`` of one site (client identity, or leaf identity if ``leaf``)."""
    publish = [wire.register_subject(site), wire.heartbeat_subject(site), wire.event_subject(site)]
    subscribe = [wire.infer_subject(site), wire.cmd_subject(site), wire.inbox_prefix(site) + ".>"]
    perms: dict[str, Any] = {"publish": {"allow": publish}, "subscribe": {"allow": subscribe}}
    if leaf:
        # Response permissions are not carried over leaf connections (see module docstring).
        publish.append(wire.HUB_INBOX_PREFIX + ".>")
    else:
        perms["allow_responses"] = {"max": response_max, "expires": f"{response_expires_s}s"}
    return perms


def hub_permissions() -> dict[str, Any]:
    """nats-server ``permissions`` of the hub: requests to sites, replies, JetStream, its inbox."""
    return {
        "publish": {"allow": ["cpn.>", "$JS.>", "$KV.>", "_INBOX.>"]},
        "subscribe": {"allow": ["cpn.>", wire.HUB_INBOX_PREFIX + ".>", "$JS.EVENT.>"]},
    }


def account_users(creds: CredentialSet, **site_perm_opts: Any) -> list[dict[str, Any]]:
    """The ``users`` list of the ``CPN`` account: hub, and per site a client and a leaf user."""
    users: list[dict[str, Any]] = [
        {"user": creds.hub.user, "password": creds.hub.password_bcrypt, "permissions": hub_permissions()}
    ]
    for site, c in creds.sites.items():
        users.append({
            "user": c.user, "password": c.password_bcrypt,
            "permissions": site_permissions(site, **site_perm_opts),
            "allowed_connection_types": ["STANDARD", "WEBSOCKET"],
        })
        users.append({
            "user": leaf_user(site), "password": c.password_bcrypt,
            "permissions": site_permissions(site, leaf=True, **site_perm_opts),
            "allowed_connection_types": ["LEAFNODE"],
        })
    return users


# --------------------------------------------------------------------------- config text

_BARE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _value(value: Any, indent: str) -> str:
    inner = indent + "  "
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        # Always quoted: a bare value starting with "$" would be read as a variable (bcrypt hashes).
        return json.dumps(value)
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        return "{\n" + "".join(f"{inner}{_key(k)}: {_value(v, inner)}\n" for k, v in value.items()) + indent + "}"
    if isinstance(value, Sequence):
        if not value:
            return "[]"
        if all(isinstance(v, str) for v in value) and sum(len(v) for v in value) < 80:
            return "[" + ", ".join(_value(v, inner) for v in value) + "]"
        return "[\n" + "".join(f"{inner}{_value(v, inner)}\n" for v in value) + indent + "]"
    raise TypeError(f"cannot render {type(value).__name__} in a nats-server config")


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def render(doc: Mapping[str, Any], header: str = "") -> str:
    """nats-server configuration text for a document of dicts, lists, strings, ints and bools."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    lines += [f"{_key(k)}: {_value(v, '')}" for k, v in doc.items()]
    return "\n".join(lines) + "\n"


_HEADER = "Generated by cpn (controlplane/nats/natsconf.py). Regenerate rather than edit; see docs/security.md."


def account_jetstream(max_file_bytes: int = ACCOUNT_MAX_FILE_BYTES,
                      max_memory_bytes: int = ACCOUNT_MAX_MEMORY_BYTES) -> dict[str, Any]:
    """The ``CPN`` account's JetStream limits (storage bounded, not just "enabled")."""
    return {"max_file": max_file_bytes, "max_mem": max_memory_bytes}


def _accounts(creds: CredentialSet) -> dict[str, Any]:
    return {ACCOUNT: {"jetstream": account_jetstream(), "users": account_users(creds)}}


def single_server_config(
    creds: CredentialSet,
    *,
    host: str = "0.0.0.0",
    port: int = DEFAULT_CLIENT_PORT,
    store_dir: str | None = DEFAULT_STORE_DIR,
    leafnode_port: int | None = DEFAULT_LEAFNODE_PORT,
    monitor: str | None = "127.0.0.1:8222",
    server_name: str = "cpn-nats",
    tls: TlsFiles | None = None,
) -> str:
    """Config of one nats-server with JetStream, the cpn identities and a leaf-node listener.

    Holds bcrypt hashes only, no plain passwords. ``store_dir=None`` leaves the JetStream store
    to the ``-sd`` flag (nats-server refuses a store dir given both ways, even the same one).
    With ``tls``, clients must speak TLS (the server's certificate proves it to them) and leaf
    nodes must also present a certificate of the CA.
    """
    doc: dict[str, Any] = {"server_name": server_name, "listen": f"{host}:{port}"}
    if tls is not None:
        doc["tls"] = tls.block(verify=False)
    if monitor:
        doc["http"] = monitor
    # sync_interval always: JetStream otherwise acknowledges before fsync (REFERENCE.md). With
    # store_dir=None the -sd flag gives the store, and nats-server then refuses a jetstream block.
    doc["jetstream"] = {"store_dir": store_dir, "sync_interval": "always"} if store_dir is not None else "enabled"
    if leafnode_port is not None:
        doc["leafnodes"] = {"listen": f"{host}:{leafnode_port}"}
        if tls is not None:
            doc["leafnodes"]["tls"] = tls.block(verify=True)
    doc["accounts"] = _accounts(creds)
    return render(doc, _HEADER + "\nSingle server: clients and leaf nodes of every site, JetStream (R1).")


def cluster_configs(
    creds: CredentialSet,
    *,
    n: int = 3,
    hosts: Sequence[str] | None = None,
    client_port: int = DEFAULT_CLIENT_PORT,
    cluster_port: int = DEFAULT_CLUSTER_PORT,
    leafnode_port: int = DEFAULT_LEAFNODE_PORT,
    store_dir: str = DEFAULT_STORE_DIR,
    cluster_name: str = "cpn",
    monitor: str | None = "127.0.0.1:8222",
    tls: Mapping[str, TlsFiles] | None = None,
    gateway_port: int = DEFAULT_GATEWAY_PORT,
    gateways: Mapping[str, Sequence[str]] | None = None,
    listen_host: str = "0.0.0.0",
) -> dict[str, str]:
    """Configs of an ``n``-node JetStream cluster, by node name (``node-1`` ...).

    Routes between the nodes are authenticated with ``creds.route``, whose password therefore
    appears in plain text in every node's config (keep them mode 0600). JetStream replication is
    per stream: the hub creates ``CPN_EVENTS`` with ``num_replicas=3`` on a cluster.

    With ``tls`` (by node name), clients, routes, leaf nodes and gateways speak TLS; routes,
    leaf nodes and gateways must present a certificate of the CA. ``gateways`` (other clusters'
    names and gateway URLs) adds a ``gateway`` block named ``cluster_name``.

    Raises:
        ValueError: fewer than 3 nodes (JetStream needs a quorum), ``hosts`` of the wrong length,
            or ``tls`` missing a node.
    """
    if n < 3:
        raise ValueError(f"n={n}: a JetStream cluster needs at least 3 nodes")
    names = [f"node-{i}" for i in range(1, n + 1)]
    hosts = list(hosts) if hosts is not None else names
    if len(hosts) != n:
        raise ValueError(f"hosts: {len(hosts)} given for {n} nodes")
    if tls is not None and set(names) - set(tls):
        raise ValueError(f"tls: no files for {sorted(set(names) - set(tls))}")
    route = creds.route
    out: dict[str, str] = {}
    for name, host in zip(names, hosts):
        files = tls[name] if tls is not None else None
        doc: dict[str, Any] = {"server_name": name, "listen": f"{listen_host}:{client_port}"}
        if files is not None:
            doc["tls"] = files.block(verify=False)
        if monitor:
            doc["http"] = monitor
        doc["jetstream"] = {"store_dir": store_dir, "sync_interval": "always"}
        doc["cluster"] = {
            "name": cluster_name,
            "listen": f"{listen_host}:{cluster_port}",
            "authorization": {"user": route.user, "password": route.password},
            "routes": [
                f"nats-route://{route.user}:{route.password}@{other}:{cluster_port}"
                for other in hosts if other != host
            ],
        }
        doc["leafnodes"] = {"listen": f"{listen_host}:{leafnode_port}"}
        if files is not None:
            doc["cluster"]["tls"] = files.block(verify=True)
            doc["leafnodes"]["tls"] = files.block(verify=True)
        if gateways:
            doc["gateway"] = {
                "name": cluster_name,
                "listen": f"{listen_host}:{gateway_port}",
                "gateways": [{"name": gw, "urls": list(urls)} for gw, urls in gateways.items()],
            }
            if files is not None:
                doc["gateway"]["tls"] = files.block(verify=True)
        doc["accounts"] = _accounts(creds)
        if gateways:  # nats-server refuses leaf nodes and gateways together without a system account
            doc["accounts"]["SYS"] = {}
            doc["system_account"] = "SYS"
        out[name] = render(doc, _HEADER + f"\nCluster {cluster_name!r}, {name} of {n} (host {host}).")
    return out


def _with_userinfo(url: str, user: str, password: str, scheme: str | None = None) -> str:
    parts = urlsplit(url if "://" in url else f"nats-leaf://{url}")
    if not parts.hostname:
        raise ValueError(f"hub url {url!r} has no host")
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    port = parts.port or DEFAULT_LEAFNODE_PORT
    return urlunsplit((scheme or parts.scheme, f"{user}:{password}@{host}:{port}", parts.path, "", ""))


def leaf_urls(hub_urls: Sequence[str], creds: Credentials, *, tls: bool = False) -> list[str]:
    """Leaf-node remote URLs with the site's leaf identity in them (``tls://`` with ``tls``: the
    password then only travels inside TLS, to a server whose certificate the CA signed)."""
    return [_with_userinfo(u, leaf_user(creds.site), creds.password, "tls" if tls else None) for u in hub_urls]


def leaf_config(
    site: str,
    hub_urls: Sequence[str],
    creds: Credentials,
    *,
    listen: str = f"127.0.0.1:{DEFAULT_CLIENT_PORT}",
    tls: TlsFiles | None = None,
) -> str:
    """Config of the nats-server at one site, a leaf node of the hub's NATS.

    With ``tls`` the leaf dials ``tls://``, verifies the hub's certificate (CA and host name) and
    presents its own (``leaf-<site>``).

    The site's agent connects to ``listen`` (loopback, no auth: the box is the site's own). What
    crosses to the hub is bound by ``leaf-<site>``'s permissions, enforced by the hub's servers.
    No JetStream here: events go to the hub's ``CPN_EVENTS``. The file holds the site's password.

    Raises:
        ValueError: no hub URL, a URL without a host, or credentials of another site.
    """
    wire.check_id(site, "site")
    if creds.site != site:
        raise ValueError(f"credentials are for site {creds.site!r}, not {site!r}")
    if not hub_urls:
        raise ValueError("hub_urls: at least one leaf-node URL of the hub is needed")
    remote: dict[str, Any] = {"urls": leaf_urls(hub_urls, creds, tls=tls is not None)}
    if tls is not None:
        remote["tls"] = tls.block(verify=False)
    doc = {
        "server_name": f"cpn-leaf-{site}",
        "listen": listen,
        "leafnodes": {"remotes": [remote]},
    }
    return render(doc, _HEADER + f"\nLeaf node of site {site!r}: the agent connects here, the hub's permissions apply.")


def embedded_config(
    site_ids: Iterable[str],
    *,
    secret: bytes | None = None,
    random_bytes: Callable[[int], bytes] | None = None,
    jetstream_dir: str | None = None,
) -> tuple[str, Credentials, dict[str, Credentials]]:
    """Config of the embedded server of ``cpn up`` (same scheme as :func:`single_server_config`).

    Listen address, port and JetStream store are left to the command line: ``NatsServer``
    passes ``-a``/``-p``/``-js``/``-sd``, and nats-server refuses to start ("Duplicate
    'store_dir' configuration") when the config names a store dir too, even the same one. So
    ``jetstream_dir`` is only recorded in a comment.

    Args:
        site_ids: the sites of the layout.
        secret: derive credentials from it (same secret -> same identities across restarts), or
        random_bytes: draw fresh ones.

    Returns:
        (config text, hub credentials, credentials by site id).
    """
    if secret is not None:
        creds = derive_credentials(site_ids, secret)
    elif random_bytes is not None:
        creds = generate_credentials(site_ids, random_bytes)
    else:
        raise ValueError("embedded_config needs secret= or random_bytes=")
    doc: dict[str, Any] = {"server_name": "cpn-embedded", "jetstream": "enabled", "accounts": _accounts(creds)}
    header = _HEADER + "\nEmbedded server of `cpn up` (loopback; address, port and store dir come from flags)."
    if jetstream_dir is not None:
        header += f"\nJetStream store (-sd): {jetstream_dir}"
    return render(doc, header), creds.hub, dict(creds.sites)


class CredentialsFile(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """What ``cpn deploy nats-config`` writes to ``creds/<name>.json`` (mode 0600)."""

    user: str
    password: str
    site: str = ""
    leaf_user: str = ""
    inbox_prefix: str = ""
    nats: list[str] = []
    """Server URLs to connect to (a site behind a leaf node uses its local server instead)."""
    tls_ca: str = ""
    """CA file to verify the server with (``tls_ca`` of the agent's config, ``nats_tls_ca`` of the hub's)."""
    tls_cert: str = ""
    tls_key: str = ""


def credentials_file(creds: Credentials, nats_urls: Sequence[str], *, tls: TlsFiles | None = None) -> bytes:
    """JSON text of one identity's credentials file."""
    prefix = wire.inbox_prefix(creds.site) if creds.site else wire.HUB_INBOX_PREFIX
    doc = CredentialsFile(
        user=creds.user, password=creds.password, site=creds.site, leaf_user=creds.leaf_user,
        inbox_prefix=prefix, nats=list(nats_urls),
        tls_ca=tls.ca if tls else "", tls_cert=tls.cert if tls else "", tls_key=tls.key if tls else "",
    )
    return msgspec.json.format(msgspec.json.encode(doc), indent=2) + b"\n"


def read_credentials_file(data: bytes | str) -> CredentialsFile:
    """Decode a credentials file; raises ``msgspec.ValidationError`` naming the bad field."""
    return msgspec.json.decode(data, type=CredentialsFile)


# --------------------------------------------------------------------------- violations

ViolationKind = Literal["publish", "subscribe"]


class Violation(msgspec.Struct, frozen=True, kw_only=True):
    """One permission violation the server logged."""

    kind: ViolationKind
    subject: str
    user: str = ""
    """"" when the server did not say (violations on a leaf connection name no user)."""
    account: str = ""
    connection: str = ""
    """Server's connection id: ``cid:N`` for a client, ``lid:N`` for a leaf node."""
    reply: bool = False
    """A forbidden reply subject rather than a forbidden subject."""

    @property
    def site(self) -> str | None:
        return site_of_user(self.user)

    @property
    def via_leaf(self) -> bool:
        return self.connection.startswith("lid:")


_Q = r'"(?:[^"\\]|\\.)*"'
# nats-server 2.15: "[pid] date time [ERR] addr - cid:N - "name" - "ACC/user:U" - Publish Violation - Subject "s""
# and for a leaf: "... [ERR] addr - lid:N - Publish Violation on "s" - Check other side configuration".
# Quoted fields (client name, user) are consumed whole, so a client cannot forge a violation
# by naming itself "Publish Violation ...".
_VIOLATION_RE = re.compile(
    r"^(?:\[\d+\] )?(?:\d{4}/\d\d/\d\d \d\d:\d\d:\d\d\.\d+ )?\[ERR\] \S+ - (?P<conn>[a-z]+:\d+) - "
    rf"(?P<quoted>(?:{_Q} - )*)(?P<what>Publish|Subscription) Violation(?P<rest>.*)$"
)
_ACCOUNT_USER_RE = re.compile(r'^"(?P<account>[^"/]+)/(?:user|nkey):(?P<user>[^"]+)"')
_OLD_USER_RE = re.compile(r'User "(?P<user>[^"]*)"')
_SUBJECT_RE = re.compile(r'\b(?P<field>Subject|Reply|on) (?P<subject>"(?:[^"\\]|\\.)*")')


def parse_violation(line: str) -> Violation | None:
    """The permission violation a nats-server log line reports, or None if it reports none."""
    m = _VIOLATION_RE.match(line.rstrip())
    if m is None:
        return None
    rest = m.group("rest")
    sm = _SUBJECT_RE.search(rest)
    if sm is None:
        return None
    try:
        subject = json.loads(sm.group("subject"))
    except ValueError:
        subject = sm.group("subject").strip('"')
    user = account = ""
    for field in m.group("quoted").split(" - "):
        um = _ACCOUNT_USER_RE.match(field)
        if um:
            account, user = um.group("account"), um.group("user")
    if not user:
        om = _OLD_USER_RE.search(rest)
        if om:
            user = om.group("user")
    return Violation(
        kind="publish" if m.group("what") == "Publish" else "subscribe",
        subject=subject, user=user, account=account, connection=m.group("conn"),
        reply=sm.group("field") == "Reply",
    )


class ViolationCounter:
    """Counts permission violations from nats-server log lines, by user and by kind.

    Pass ``counter.feed`` (or the counter itself) as ``NatsServer(on_line=...)``. Memory is
    bounded: at most ``max_users`` distinct users are counted by name, the rest under ``"other"``;
    the last ``keep`` violations are kept for display.
    """

    def __init__(self, *, max_users: int = 10_000, keep: int = 100) -> None:
        self.total = 0
        self.by_user: Counter[str] = Counter()
        self.by_kind: Counter[str] = Counter()
        self.recent: deque[Violation] = deque(maxlen=keep)
        self._max_users = max_users

    def __repr__(self) -> str:
        return f"<ViolationCounter total={self.total} users={len(self.by_user)}>"

    def feed(self, line: str) -> Violation | None:
        """Count the violation ``line`` reports, if any, and return it."""
        v = parse_violation(line)
        if v is None:
            return None
        self.total += 1
        who = v.user or (f"leaf {v.connection}" if v.via_leaf else "unknown")
        if who not in self.by_user and len(self.by_user) >= self._max_users:
            who = "other"
        self.by_user[who] += 1
        self.by_kind[v.kind] += 1
        self.recent.append(v)
        return v

    __call__ = feed

    def snapshot(self) -> dict[str, Any]:
        """Plain-data view for metrics and admin endpoints."""
        return {
            "total": self.total,
            "by_user": dict(self.by_user),
            "by_kind": dict(self.by_kind),
            "recent": [msgspec.structs.asdict(v) for v in self.recent],
        }
