"""A private CA and the certificates of a cpn NATS deployment (the ``cryptography`` package).

What this module promises:

- Rule 1: one CA per deployment signs everything; clients trust only it (not the system store).
- Rule 2: a server certificate names every host name and IP address clients dial (SANs), and
  serves for both ends of server-to-server links (routes, gateways, leaf connections), so it
  carries the serverAuth and clientAuth extended key usages.
- Rule 3: a client certificate (hub, a site's agent, a site's leaf server) names its identity as
  common name and DNS SAN, for servers that verify clients (mutual TLS).
- Rule 4: keys are EC P-256, fresh from the OS's randomness; ``now`` is an argument (validity
  starts an hour before it, so clocks a little behind still accept the certificate).

Files are PEM text; the caller writes them (keys mode 0600).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
CERT_DAYS = 825
"""Longest validity browsers and most TLS stacks accept for a leaf certificate."""


class Pem:
    """A key and its certificate as PEM bytes."""

    __slots__ = ("key", "cert")

    def __init__(self, key: bytes, cert: bytes) -> None:
        self.key = key
        self.cert = cert

    def __repr__(self) -> str:  # never print a key
        return f"<Pem {x509.load_pem_x509_certificate(self.cert).subject.rfc4514_string()}>"


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cpn"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(now: dt.datetime, common_name: str = "cpn NATS CA", days: int = CA_DAYS) -> Pem:
    """A self-signed CA allowed to sign end certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Pem(_key_pem(key), cert.public_bytes(serialization.Encoding.PEM))


def _sans(names: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):  # keep order, drop repeats
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def make_cert(ca: Pem, now: dt.datetime, common_name: str, names: Iterable[str] = (), *,
              server: bool = True, days: int = CERT_DAYS) -> Pem:
    """A certificate signed by ``ca`` for ``common_name`` with SANs ``names`` (host names or IPs).

    ``server`` certificates may serve TLS and dial other servers (routes, gateways, leaf links);
    client ones (``server=False``) only authenticate a client.

    Raises:
        ValueError: no name at all.
    """
    sans = _sans([*names] or [common_name])
    if not sans:
        raise ValueError("a certificate needs at least one name")
    ca_key = serialization.load_pem_private_key(ca.key, password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an EC key made by cpn")
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if server else [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                     crl_sign=False, content_commitment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return Pem(_key_pem(key), cert.public_bytes(serialization.Encoding.PEM))
