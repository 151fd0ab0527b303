"""cpn's own time on a relayed request: what a gateway adds beyond the network and the site's work.

The RTT a gateway reports (``X-CPN-RTT-Ms``) is the layout's network figure, origin -> gateway ->
site. A tenant also waits for cpn itself: the gateway's routing and encoding, the NATS servers'
hops, the agent. A gateway measures that on every whole answer it relays, as the time from its
handler taking the request to the answer encoded (a stream: to its first chunk), less the site's
own time (``service_ms``; a stream's first chunk's ``site_ms``) and less the network's share of the
leg gateway -> site (the layout's figure: on a real WAN the wire time is already in the RTT).

:class:`RelayOverhead` keeps the recent samples per site and answers a high quantile of them
(:data:`QUANTILE`, the 90th percentile): the figure the gateway states next to the RTT
(``X-CPN-Overhead-Ms``; ``X-CPN-Promise-Ms`` is RTT + it). The budget check does not use it: it
adds the declared :data:`FLOOR_MS` (as ``cpn sim`` and replica placement do), because the measured
figure grows with the gateway's own queue, and a check on it turned load into refusals in waves
(docs/topology.md, "The latency a tenant gets"). The promise is about what the user gets, so it is a figure most requests meet, not the median half of
them exceed; the 90th and not the 99th because over a window of 64 the 99th is the largest sample,
and one collection pause would set it.

Rule 1 (before any sample): :data:`FLOOR_MS`, a declared figure, not 0: nothing measured is not
nothing spent.
Rule 2 (forgetting): samples older than :data:`HORIZON_S` are dropped: a site not answered lately
states the other sites' recent figure, then the floor, until its answers measure it anew.

Pure: samples and ``now`` are passed in; no clock, no I/O.
"""

from __future__ import annotations

import math
from collections import deque

WINDOW = 64
"""Recent samples kept per site (and 4x that over all sites): the last minute of a lightly used
site, the last fraction of a second of a busy one."""
QUANTILE = 0.9
"""The share of recent relays the stated overhead covers."""
FLOOR_MS = 1.0
"""The overhead assumed before anything is measured: about what a gateway, two NATS hops and an
agent cost a request on a quiet 2-core machine (``cpn bench regions``: 1.2-2 ms beyond the RTT at
p50, of which the gateway's handler saw under 1 ms). ``cpn sim`` charges it on every request."""
HORIZON_S = 10.0
"""Samples older than this are forgotten (Rule 2)."""
_EXPIRE_EVERY_S = 1.0


class RelayOverhead:
    """Recent overhead samples (ms) per site; :meth:`ms` is their :data:`QUANTILE`.

    A site without recent samples takes the quantile over every site's recent samples; a gateway
    that has relayed nothing recently states :attr:`floor_ms`.
    """

    def __init__(self, window: int = WINDOW, *, floor_ms: float = FLOOR_MS, horizon_s: float = HORIZON_S) -> None:
        if window < 1:
            raise ValueError(f"window: {window}: at least 1")
        if not (math.isfinite(floor_ms) and floor_ms >= 0):
            raise ValueError(f"floor_ms: {floor_ms}: a finite figure >= 0")
        self.window = window
        self.floor_ms = floor_ms
        self.horizon_s = horizon_s
        self._by_site: dict[str, deque[tuple[float, float]]] = {}
        self._all: deque[tuple[float, float]] = deque(maxlen=4 * window)
        self._cached: dict[str, float] = {}
        self._all_cached: float | None = None
        self._expired_at = -math.inf
        self.samples = 0
        self.dropped = 0
        """Samples refused (:meth:`drop`): a site's claimed time the hub does not believe."""

    def __repr__(self) -> str:
        return f"<RelayOverhead samples={self.samples} dropped={self.dropped} sites={len(self._by_site)}>"

    def observe(self, site: str, ms: float, now: float = 0.0) -> None:
        """One relayed answer's overhead at ``now`` (s, monotonic); a figure below 0 (a network
        faster than the layout's) counts as 0, never as a credit."""
        ms = max(0.0, ms)
        ring = self._by_site.get(site)
        if ring is None:
            ring = self._by_site[site] = deque(maxlen=self.window)
        ring.append((now, ms))
        self._all.append((now, ms))
        self._cached.pop(site, None)
        self._all_cached = None
        self.samples += 1

    def drop(self) -> None:
        """Count a sample that was not believed (it is not observed)."""
        self.dropped += 1

    def expire(self, now: float) -> None:
        """Forget samples older than :attr:`horizon_s` (Rule 2); does the work at most once a second."""
        if now - self._expired_at < _EXPIRE_EVERY_S:
            return
        self._expired_at = now
        oldest = now - self.horizon_s
        if self._all and self._all[0][0] < oldest:
            while self._all and self._all[0][0] < oldest:
                self._all.popleft()
            self._all_cached = None
        for site, ring in list(self._by_site.items()):
            if ring[0][0] >= oldest:
                continue
            while ring and ring[0][0] < oldest:
                ring.popleft()
            self._cached.pop(site, None)
            if not ring:
                del self._by_site[site]

    def ms(self, site: str) -> float:
        """The overhead a request relayed to ``site`` can expect: the :data:`QUANTILE` of its recent
        samples (else of every site's, else :attr:`floor_ms`)."""
        got = self._cached.get(site)
        if got is not None:
            return got
        ring = self._by_site.get(site)
        if not ring:
            if self._all_cached is None:
                self._all_cached = quantile([ms for _, ms in self._all], QUANTILE) if self._all else self.floor_ms
            return self._all_cached
        got = self._cached[site] = quantile([ms for _, ms in ring], QUANTILE)
        return got


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nearest rank: a figure that was measured); 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
