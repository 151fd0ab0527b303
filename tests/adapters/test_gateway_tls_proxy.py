"""Gateway TLS (``--tls-cert/--tls-key``) and X-Forwarded-For from trusted proxies only.

Real hub, real nats-server, real HTTP(S); a self-signed certificate made in the test.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import ssl
import sys
import warnings
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controlplane.nats.natsserver import NatsServer
from tests.adapters.test_gateway_hardening import LOOPS, hub_here, run_on
from tests.support.rawsite import raw_agent
from tests.support.waiting import until
from tests.support.hubrig import DEMO3, hub_config, running_hub


def self_signed(tmp: Path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and localhost, and its key (PEM files); the certificate is its own CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cpn test gateway")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "gateway.crt", tmp / "gateway.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return str(cert_path), str(key_path)


async def hub_closed_all(hub: Any) -> None:
    await until(lambda: hub.gateway.guard.open == 0, 5, "every connection closed", last=lambda: hub.gateway.guard.open)


def client_context(ca: str | None, *, max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    if max_version is not None:  # from the oldest version this OpenSSL has, up to max_version
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            ctx.maximum_version = max_version
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


@pytest.mark.parametrize("loop", LOOPS)
def test_the_gateway_serves_https_only_with_tls_12_or_newer(tmp_path: Path, loop: str) -> None:
    cert, key = self_signed(tmp_path)

    async def main() -> None:
        async with hub_here(tmp_path, tls_cert=cert, tls_key=key, max_connections=3) as hub:
            port = hub.http_port
            assert hub.gateway.scheme == "https"
            async with aiohttp.ClientSession() as session:
                async with session.get(f"https://127.0.0.1:{port}/healthz", ssl=client_context(cert)) as resp:
                    assert resp.status == 200
                with pytest.raises(aiohttp.ClientError):  # plain HTTP to the TLS port
                    async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                        await resp.read()
                with pytest.raises(aiohttp.ClientConnectorCertificateError):  # a client that does not trust it
                    async with session.get(f"https://127.0.0.1:{port}/healthz", ssl=client_context(None)) as resp:
                        await resp.read()
            # A client offering TLS 1.0-1.1 only (security level 0, so it can) is refused; the same client
            # allowed TLS 1.2 is served.
            with pytest.raises((ssl.SSLError, ConnectionResetError)):
                await asyncio.open_connection("127.0.0.1", port, ssl=client_context(cert, max_version=ssl.TLSVersion.TLSv1_1))
            _, writer = await asyncio.open_connection("127.0.0.1", port,
                                                      ssl=client_context(cert, max_version=ssl.TLSVersion.TLSv1_2))
            assert writer.get_extra_info("ssl_object").version() == "TLSv1.2"
            writer.close()
            _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(cert))
            assert writer.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
            writer.close()
            await hub_closed_all(hub)
            # The connection cap answers over TLS too (the TLS transport cannot half-close).
            held = [await asyncio.open_connection("127.0.0.1", port, ssl=client_context(cert)) for _ in range(3)]
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(cert))
            data = await asyncio.wait_for(reader.read(), 5)
            assert data.startswith(b"HTTP/1.1 503") and b"too_many_connections" in data
            for _, w in [*held, (reader, writer)]:
                w.close()

    run_on(loop, main)


async def test_cpn_hub_takes_tls_and_trusted_proxy_flags(tmp_path: Path, nats_server: NatsServer) -> None:
    """``cpn hub --tls-cert --tls-key --trusted-proxy`` as a real process (on uvloop, as shipped)."""
    cert, key = self_signed(tmp_path)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controlplane.cli", "hub", "--nats", nats_server.url, "--db", str(tmp_path / "hub.db"),
        "--listen", "127.0.0.1:0", "--layout", str(DEMO3), "--tls-cert", cert, "--tls-key", key,
        "--trusted-proxy", "10.0.0.0/8", "--trusted-proxy", "127.0.0.1/32",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert "listening on https://127.0.0.1:" in line, line
        port = int(line.rsplit(":", 1)[1])
        async with aiohttp.ClientSession() as session:
            async with session.get(f"https://127.0.0.1:{port}/healthz", ssl=client_context(cert)) as resp:
                assert resp.status == 200
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 15)
    # A bad CIDR or a certificate without its key is refused with the flag's name.
    for bad in (["--trusted-proxy", "10.0.0.0/33"], ["--tls-cert", cert]):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controlplane.cli", "hub", "--nats", nats_server.url, "--db", str(tmp_path / "b.db"),
            "--listen", "127.0.0.1:0", "--layout", str(DEMO3), *bad,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 2, (out, err)
        assert (b"trusted_proxies" in err and b"10.0.0.0/33" in err) or b"tls_key" in err, err


async def origin_seen(port: int, *, source: str, forwarded_for: str | None, key: str) -> tuple[int, Any]:
    """POST /v1/infer from ``source`` (a loopback address) without an origin: the origin the hub
    derived from the client address, or its error."""
    headers = {"Authorization": f"Bearer {key}", "X-CPN-Budget-Policy": "nearest"}
    if forwarded_for is not None:
        headers["X-Forwarded-For"] = forwarded_for
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(f"http://127.0.0.1:{port}/v1/infer", json={"model": "m", "input": "x"},
                                headers=headers) as resp:
            body = await resp.json()
            return resp.status, body.get("origin") if resp.status == 200 else body["error"]["code"]


@pytest.mark.parametrize(("source", "forwarded_for", "expected"), [
    ("127.0.0.2", "198.51.100.7", "origin_required"),         # untrusted peer: its header is ignored
    ("127.0.0.1", "198.51.100.7", "hangzhou"),                # trusted proxy: the client it saw
    ("127.0.0.1", "203.0.113.5, 198.51.100.7", "hangzhou"),   # the client's own entries (left) are not read
    ("127.0.0.1", "198.51.100.7, 127.0.0.1", "hangzhou"),     # a chain of trusted proxies is walked
    ("127.0.0.1", "not-an-address", "origin_required"),        # junk: the proxy's own address is the client
    ("127.0.0.1", None, "origin_required"),
])
async def test_x_forwarded_for_is_believed_only_from_trusted_proxies(
        tmp_path: Path, nats_server: NatsServer, source: str, forwarded_for: str | None, expected: str) -> None:
    async with running_hub(hub_config(tmp_path, nats_server.url, trusted_proxies=("127.0.0.1/32",))) as hub:
        key = hub.create_tenant("acme")  # no default origin: the CIDR map decides
        nc, beat = await raw_agent(nats_server.url, "hz-edge", "hangzhou")
        try:
            await until(lambda: "m" in hub.known_models())
            assert await origin_seen(hub.http_port, source=source, forwarded_for=forwarded_for, key=key) == \
                (200 if expected == "hangzhou" else 400, expected)
        finally:
            beat.cancel()
            await nc.close()  # type: ignore[attr-defined]


async def test_without_trusted_proxies_x_forwarded_for_is_ignored(tmp_path: Path, nats_server: NatsServer) -> None:
    async with running_hub(hub_config(tmp_path, nats_server.url)) as hub:
        key = hub.create_tenant("acme")
        assert await origin_seen(hub.http_port, source="127.0.0.1", forwarded_for="198.51.100.7", key=key) == \
            (400, "origin_required")


async def test_a_trusted_proxy_is_exempt_from_the_per_client_connection_cap(tmp_path: Path, nats_server: NatsServer) -> None:
    config = hub_config(tmp_path, nats_server.url, trusted_proxies=("127.0.0.1/32",), max_connections_per_client=2)
    async with running_hub(config) as hub:
        port = hub.http_port
        via_proxy = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
        direct = [await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0)) for _ in range(3)]
        data = await asyncio.wait_for(direct[2][0].read(), 5)
        assert data.startswith(b"HTTP/1.1 503") and b"too_many_connections_from_client" in data
        for reader, writer in via_proxy:  # all five from the proxy are served
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 200")
        assert hub.gateway.guard.refused == 1
        for _, w in [*via_proxy, *direct]:
            w.close()
