"""The hub's per-site admission of inbound messages (pure: sizes, buckets, isolation between sites)."""

from __future__ import annotations

import datetime as dt
import ipaddress

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from controlplane.nats import natscerts
from controlplane.core.sitegate import SiteLimits
from controlplane.core.sitegate import SiteGate


def test_oversize_is_refused_by_size_alone_and_spends_no_token() -> None:
    gate = SiteGate(SiteLimits(max_heartbeat_bytes=100, heartbeat_burst=1, heartbeat_rate_per_s=1.0))
    assert gate.admit("heartbeat", "a", 101, now=0.0) == "oversize"
    assert gate.admit("heartbeat", "a", 100, now=0.0) is None  # the one token was still there


def test_one_sites_flood_spends_only_its_own_bucket() -> None:
    gate = SiteGate(SiteLimits(heartbeat_rate_per_s=2.0, heartbeat_burst=3))
    verdicts = [gate.admit("heartbeat", "a", 10, now=0.0) for _ in range(10)]
    assert verdicts.count(None) == 3 and verdicts.count("rate") == 7
    assert gate.admit("heartbeat", "b", 10, now=0.0) is None
    assert gate.admit("event", "a", 10, now=0.0) is None  # kinds have buckets of their own
    assert gate.admit("heartbeat", "a", 10, now=0.5) is None  # refilled at 2/s


def test_certificates_name_what_clients_dial_and_chain_to_the_ca() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    ca = natscerts.make_ca(now)
    server = natscerts.make_cert(ca, now, "node-1", ["nats1.example.net", "10.0.0.7"])
    client = natscerts.make_cert(ca, now, "site-a", server=False)
    ca_cert = x509.load_pem_x509_certificate(ca.cert)
    s = x509.load_pem_x509_certificate(server.cert)
    c = x509.load_pem_x509_certificate(client.cert)
    s.verify_directly_issued_by(ca_cert)
    c.verify_directly_issued_by(ca_cert)
    sans = s.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["nats1.example.net"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]
    usages = s.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert list(c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert s.not_valid_before_utc < now < s.not_valid_after_utc <= ca_cert.not_valid_after_utc
    assert "PRIVATE KEY" not in repr(server)
