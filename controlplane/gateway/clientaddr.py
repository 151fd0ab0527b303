"""Which address a request comes from: the peer, or ``X-Forwarded-For`` behind a trusted proxy.

``X-Forwarded-For`` is a list any client can write, so it is believed only when the peer is one of
the operator's ``trusted_proxies`` (CIDRs), and then only as far as the chain of trusted proxies
goes: walking the list from the right (the hop the nearest proxy added), the client is the first
address that is not itself a trusted proxy. Entries left of it are the client's own words and are
never read. With no trusted proxies configured, the header is ignored altogether.

Pure: ``ipaddress`` only.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Union

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

_CACHE_MAX = 10_000


def _address(text: str) -> Address | None:
    try:
        addr = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class TrustedProxies:
    """The operator's trusted proxies and what they say about a request's client address."""

    __slots__ = ("nets", "_peers")

    def __init__(self, nets: Iterable[Network] = ()) -> None:
        self.nets = tuple(nets)
        self._peers: dict[str, bool] = {}

    @classmethod
    def parse(cls, cidrs: Iterable[str]) -> TrustedProxies:
        """Raises ValueError naming a CIDR that is not one (``10.0.0.0/8``, ``::1/128``, ``192.0.2.7``)."""
        nets = []
        for cidr in cidrs:
            try:
                nets.append(ipaddress.ip_network(cidr.strip(), strict=False))
            except ValueError:
                raise ValueError(f"trusted_proxies: {cidr!r} is not an IP network (CIDR)") from None
        return cls(nets)

    def trusts(self, addr: Address) -> bool:
        return any(addr.version == net.version and addr in net for net in self.nets)

    def trusts_peer(self, host: str) -> bool:
        """True when the peer ``host`` (a socket's address text) is a trusted proxy."""
        if not self.nets:
            return False
        known = self._peers.get(host)
        if known is None:
            addr = _address(host)
            known = addr is not None and self.trusts(addr)
            if len(self._peers) >= _CACHE_MAX:
                self._peers.clear()
            self._peers[host] = known
        return known

    def client(self, peer: str, forwarded_for: str) -> str:
        """The client address of a request from ``peer`` carrying ``X-Forwarded-For: forwarded_for``
        (several headers joined with commas): ``peer`` unless it is a trusted proxy, else the rightmost
        hop that is not one (the leftmost hop if every one is; the last good hop if an entry is junk)."""
        if not forwarded_for or not self.trusts_peer(peer):
            return peer
        client = peer
        for hop in reversed(forwarded_for.split(",")):
            addr = _address(hop)
            if addr is None:
                return client  # not an address: written by the client, not by a proxy we trust
            client = str(addr)
            if not self.trusts(addr):
                return client
        return client
