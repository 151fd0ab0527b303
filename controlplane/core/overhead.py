"""cpn's own time on a relayed request: what a gateway adds beyond the network and the site's work.

The RTT a gateway reports (``X-CPN-RTT-Ms``) is the layout's network figure, origin -> gateway ->
site. A tenant also waits for cpn itself: the gateway's routing and encoding, the NATS servers'
hops, the agent. A gateway measures that on every whole answer it relays, as the time from its
handler taking the request to the answer encoded, less the site's own ``service_ms`` and less the
network's share of the leg gateway -> site (the layout's figure: on a real WAN the wire time is
already in the RTT). :class:`RelayOverhead` keeps the recent samples per site and answers their median: the figure the
gateway states next to the RTT (``X-CPN-Overhead-Ms``). The budget is not checked against it (the
router budgets the network's RTT): it is nearly the same whichever site serves, so no routing choice
removes it, and a figure that grows with load would turn a busy gateway into one refusing every
strict request, and, measured only on answers, one that never learns it could serve again.

Pure: samples are passed in; no clock, no I/O.
"""

from __future__ import annotations

from collections import deque

WINDOW = 64
"""Recent samples kept per site (and 4x that over all sites): a median over the last minute of a
lightly used site, the last fraction of a second of a busy one."""


class RelayOverhead:
    """Recent overhead samples (ms) per site; :meth:`ms` is their median.

    A site without samples yet takes the median over every site's recent samples; a gateway that has
    relayed nothing yet states 0 (it has measured nothing to promise).
    """

    def __init__(self, window: int = WINDOW) -> None:
        if window < 1:
            raise ValueError(f"window: {window}: at least 1")
        self.window = window
        self._by_site: dict[str, deque[float]] = {}
        self._all: deque[float] = deque(maxlen=4 * window)
        self._median: dict[str, float] = {}
        self._all_median: float | None = None
        self.samples = 0

    def observe(self, site: str, ms: float) -> None:
        """One relayed answer's overhead (negative figures, a network faster than the layout's, count as 0)."""
        ms = max(0.0, ms)
        ring = self._by_site.get(site)
        if ring is None:
            ring = self._by_site[site] = deque(maxlen=self.window)
        ring.append(ms)
        self._all.append(ms)
        self._median.pop(site, None)
        self._all_median = None
        self.samples += 1

    def ms(self, site: str) -> float:
        """The overhead a request relayed to ``site`` can expect: the median of its recent samples."""
        got = self._median.get(site)
        if got is not None:
            return got
        ring = self._by_site.get(site)
        if not ring:
            if self._all_median is None:
                self._all_median = _median(self._all)
            return self._all_median
        got = self._median[site] = _median(ring)
        return got


def _median(values: deque[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
