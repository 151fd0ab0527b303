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
from bisect import bisect_left, insort
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
        # The same samples kept sorted beside each ring (a sample in, one out, by bisection): the
        # quantile is then one index per request, not a sort of the window after every answer.
        self._sorted: dict[str, list[float]] = {}
        self._all_sorted: list[float] = []
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
            self._sorted[site] = []
        ordered = self._sorted[site]
        if len(ring) == self.window:  # _discard, inlined here (once per relayed answer)
            del ordered[bisect_left(ordered, ring[0][1])]
        ring.append((now, ms))
        insort(ordered, ms)
        every = self._all
        if len(every) == every.maxlen:
            every_sorted = self._all_sorted
            del every_sorted[bisect_left(every_sorted, every[0][1])]
        every.append((now, ms))
        insort(self._all_sorted, ms)
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
        every = self._all
        while every and every[0][0] < oldest:
            _discard(self._all_sorted, every.popleft()[1])
        for site, ring in list(self._by_site.items()):
            if ring[0][0] >= oldest:
                continue
            ordered = self._sorted[site]
            while ring and ring[0][0] < oldest:
                _discard(ordered, ring.popleft()[1])
            if not ring:
                del self._by_site[site], self._sorted[site]

    def ms(self, site: str) -> float:
        """The overhead a request relayed to ``site`` can expect: the :data:`QUANTILE` of its recent
        samples (else of every site's, else :attr:`floor_ms`)."""
        ordered = self._sorted.get(site)
        if not ordered:
            ordered = self._all_sorted
            if not ordered:
                return self.floor_ms
        n = len(ordered)  # _rank(n, QUANTILE), inlined (once per answer)
        i = math.ceil(QUANTILE * n) - 1
        return ordered[i if 0 <= i < n else (0 if i < 0 else n - 1)]


def _rank(n: int, q: float) -> int:
    """The index of the ``q`` quantile (nearest rank) among ``n`` sorted values (n >= 1)."""
    return min(n - 1, max(0, math.ceil(q * n) - 1))


def _discard(ordered: list[float], value: float) -> None:
    """Take one ``value`` out of the sorted list ``ordered`` (it is there)."""
    del ordered[bisect_left(ordered, value)]


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nearest rank: a figure that was measured); 0 for none."""
    if not values:
        return 0.0
    return sorted(values)[_rank(len(values), q)]
