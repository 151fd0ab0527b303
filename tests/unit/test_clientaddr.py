"""X-Forwarded-For read only as far as the chain of trusted proxies goes (pure)."""

from __future__ import annotations

import pytest

from controlplane.gateway.clientaddr import TrustedProxies

TRUSTED = TrustedProxies.parse(["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"])


@pytest.mark.parametrize(("peer", "xff", "client"), [
    ("203.0.113.9", "198.51.100.1", "203.0.113.9"),              # untrusted peer: header ignored
    ("10.1.2.3", "", "10.1.2.3"),                                 # trusted, no header: the peer
    ("10.1.2.3", "198.51.100.1", "198.51.100.1"),                 # trusted: the hop it saw
    ("10.1.2.3", "1.1.1.1, 198.51.100.1", "198.51.100.1"),        # the client's own entries are not read
    ("10.1.2.3", "198.51.100.1, 10.9.9.9, 192.0.2.7", "198.51.100.1"),  # a chain of trusted proxies
    ("10.1.2.3", "10.4.4.4", "10.4.4.4"),                         # every hop trusted: the leftmost
    ("10.1.2.3", "1.1.1.1, junk", "10.1.2.3"),                    # junk written right of us: the peer
    ("10.1.2.3", "junk, 198.51.100.1", "198.51.100.1"),
    ("::ffff:10.1.2.3", "198.51.100.1", "198.51.100.1"),          # IPv4-mapped peers
    ("2001:db8::5", " 2001:db8::6 , 2400:cb00::1 ", "2400:cb00::1"),
])
def test_the_client_is_the_rightmost_untrusted_hop_behind_trusted_proxies(peer: str, xff: str, client: str) -> None:
    assert TRUSTED.client(peer, xff) == client


def test_no_trusted_proxies_means_the_peer_always() -> None:
    assert TrustedProxies.parse([]).client("10.1.2.3", "198.51.100.1") == "10.1.2.3"
    assert not TrustedProxies.parse([]).trusts_peer("10.1.2.3")


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "not-a-net", ""])
def test_a_bad_cidr_is_named(bad: str) -> None:
    with pytest.raises(ValueError, match="trusted_proxies"):
        TrustedProxies.parse([bad])
