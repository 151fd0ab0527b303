"""TLS for NATS client connections (hub and agents): verify the server against a CA, host name included.

``client_context(ca)`` is what ``nats.connect(tls=...)`` gets; with ``cert`` and ``key`` the client
also presents a certificate (servers configured to verify clients, mutual TLS). Without a CA the
connection stays plain (``cpn up``'s loopback server).
"""

from __future__ import annotations

import ssl


def client_context(ca: str, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """An SSL context trusting only ``ca``, checking the server's host name, TLS 1.2 at least.

    Raises:
        ValueError: only one of ``cert`` and ``key`` given.
        OSError / ssl.SSLError: a file is missing or not PEM (the message names it).
    """
    if (cert is None) != (key is None):
        raise ValueError("tls_cert and tls_key go together (mutual TLS needs both)")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if cert is not None and key is not None:
        ctx.load_cert_chain(cert, key)
    return ctx
