"""The backbone graph and :class:`RttIndex`: per origin, every reachable site in RTT order.

Latency model (DESIGN section 4, docs/topology.md):

- Sites are nodes of a networkx graph; ``Layout.links`` are its edges. A link's one-way latency is
  its fibre km (great-circle x route factor, or a measured ``fibre_km``) x 4.9 us/km plus one hop of
  forwarding (``hop_ms``), or a measured ``one_way_ms``.
- An origin reaches the backbone through access links to its points of presence
  (:func:`layout.attachments`): metro fibre of at least ``metro_km`` plus one hop. Origins are never
  transit points: a path starts at one origin and stays on the site graph.
- RTT(origin, site) = 2 x the one-way latency of the shortest path. Because every link is at least
  as slow as light along its great circle, RTT is never below the great-circle floor.

Promises:

- ``nearest``/``ranked``/``rtt_ms`` read precomputed arrays; they never touch networkx, so a routing
  decision does not grow with the graph.
- ``set_link_up``/``set_site_up``/``add_site`` repair distances incrementally: a loss recomputes only
  the part of each origin's shortest-path tree that hung below the lost link or site; a gain runs
  Dijkstra outward from the improved node only. The result equals a full recompute
  (:meth:`RttIndex.recompute_all`; the tests compare them).
- Pure: no clock, no I/O.
"""

from __future__ import annotations

import bisect
import heapq
import math
from array import array
from collections.abc import Callable, Iterator

import networkx as nx

from . import layout as lay
from .layout import Layout, Site

_INF = math.inf
# Float slack when deciding whether an edge is on a shortest path (sums of ~20 floats).
_EPS = 1e-9


class RttIndex:
    """Per-origin site rankings by round-trip time, kept current as links and sites go up and down."""

    def __init__(self, layout: Layout) -> None:
        """Use :meth:`build`."""
        self.layout = layout
        self.graph: nx.Graph[str] = nx.Graph()
        self.sites: list[str] = []
        self.origins: list[str] = [o.id for o in layout.origins]
        self._sidx: dict[str, int] = {}
        self._site_objs: list[Site] = []
        self._id_order: list[int] = []  # site indices sorted by id (ties in RTT rank by id)
        self._adj: list[dict[int, float]] = []  # links that are up, between sites that are up
        self._down_links: set[tuple[int, int]] = set()
        self._down_sites: set[int] = set()
        self._oidx: dict[str, int] = {o: i for i, o in enumerate(self.origins)}
        # per origin: access (site index, one-way ms); one-way distance by site index;
        # ranked site indices with their RTTs (parallel arrays, RTT ascending, ties by id)
        self._access: list[list[tuple[int, float]]] = [[] for _ in self.origins]
        self._dist: list[array[float]] = []
        self._rank_idx: list[array[int]] = []
        self._rank_rtt: list[array[float]] = []
        self._site_paths: dict[str, tuple[dict[str, float], dict[str, float]]] = {}
        self.repaired = 0  # (origin, change) pairs whose ranking an update touched (reports, tests)

    # ------------------------------------------------------------------ construction

    @classmethod
    def build(cls, layout: Layout) -> RttIndex:
        """Build the graph and rank every site for every origin of ``layout``."""
        self = cls(layout)
        for s in layout.sites:
            self._add_node(s)
        for link in layout.links:
            self._add_link(link)
        attached = lay.attachments(layout)
        for o in layout.origins:
            oi = self._oidx[o.id]
            for sid in attached[o.id]:
                s = layout.site(sid)
                self._access[oi].append((self._sidx[sid], lay.access_one_way_ms(o, s, layout)))
        for oi in range(len(self.origins)):
            dist = self._dijkstra(oi)
            self._dist.append(dist)
            self._rank_idx.append(array("l"))
            self._rank_rtt.append(array("d"))
            self._rerank(oi)
        return self

    def _add_node(self, s: Site) -> int:
        i = len(self.sites)
        self.sites.append(s.id)
        self._sidx[s.id] = i
        self._site_objs.append(s)
        self._adj.append({})
        bisect.insort(self._id_order, i, key=self.sites.__getitem__)
        self.graph.add_node(s.id, tier=s.tier, city=s.city, lat=s.lat, lon=s.lon, provider=s.provider)
        return i

    def _add_link(self, link: lay.Link) -> None:
        a, b = self._site_objs[self._sidx[link.a]], self._site_objs[self._sidx[link.b]]
        km = lay.link_fibre_km(link, a, b, self.layout.route_factor)
        ms = lay.link_one_way_ms(link, a, b, self.layout.route_factor, self.layout.hop_ms)
        self.graph.add_edge(link.a, link.b, ms=ms, km=km, kind=link.kind)
        ia, ib = self._sidx[link.a], self._sidx[link.b]
        if ia not in self._down_sites and ib not in self._down_sites:
            self._adj[ia][ib] = ms
            self._adj[ib][ia] = ms

    # ------------------------------------------------------------------ queries (hot path)

    def rtt_ms(self, origin: str, site: str) -> float:
        """RTT in ms from ``origin`` to ``site``; ``math.inf`` if unreachable. KeyError if unknown."""
        d = self._dist[self._oidx[origin]][self._sidx[site]]
        return 2.0 * d

    def ranked(self, origin: str) -> list[tuple[str, float]]:
        """Every reachable site for ``origin`` as ``(site, rtt_ms)``, RTT ascending, ties by id."""
        oi = self._oidx[origin]
        ids = self.sites
        return [(ids[i], r) for i, r in zip(self._rank_idx[oi], self._rank_rtt[oi])]

    def nearest(
        self,
        origin: str,
        budget_ms: float,
        accept: Callable[[str], bool] | None = None,
        *,
        limit: int | None = None,
    ) -> list[tuple[str, float]]:
        """Sites within ``budget_ms`` RTT of ``origin`` that ``accept`` (if given), nearest first.

        Args:
            origin: origin id (KeyError if unknown).
            budget_ms: RTT budget; a site exactly at the budget is included.
            accept: predicate on the site id (health, model loaded, ...), called in RTT order.
            limit: stop after this many sites.
        """
        out: list[tuple[str, float]] = []
        for pair in self.iter_nearest(origin, budget_ms):
            if accept is None or accept(pair[0]):
                out.append(pair)
                if limit is not None and len(out) >= limit:
                    break
        return out

    def iter_nearest(self, origin: str, budget_ms: float) -> Iterator[tuple[str, float]]:
        """Lazily yield ``(site, rtt_ms)`` within budget, nearest first (for routers that stop early)."""
        oi = self._oidx[origin]
        rtts = self._rank_rtt[oi]
        idx = self._rank_idx[oi]
        ids = self.sites
        end = bisect.bisect_right(rtts, budget_ms)
        for k in range(end):
            yield ids[idx[k]], rtts[k]

    def has_origin(self, origin: str) -> bool:
        """True if ``origin`` is indexed."""
        return origin in self._oidx

    def has_site(self, site: str) -> bool:
        """True if ``site`` is a node of the graph (up or down)."""
        return site in self._sidx

    def is_site_up(self, site: str) -> bool:
        """False if the site was set down."""
        return self._sidx[site] not in self._down_sites

    # ------------------------------------------------------------------ site-to-site

    def site_rtt_ms(self, a: str, b: str) -> float:
        """RTT in ms between two sites over links that are up; ``math.inf`` if cut off."""
        return 2.0 * self._from_site(a)[0].get(b, _INF)

    def site_km(self, a: str, b: str) -> float:
        """Fibre km along the lowest-latency path between two sites (checkpoint moves); inf if cut off."""
        return self._from_site(a)[1].get(b, _INF)

    def _from_site(self, a: str) -> tuple[dict[str, float], dict[str, float]]:
        cached = self._site_paths.get(a)
        if cached is not None:
            return cached
        src = self._sidx[a]  # KeyError if unknown
        ms: dict[str, float] = {}
        km: dict[str, float] = {}
        if src not in self._down_sites:
            dist = {src: 0.0}
            fibre = {src: 0.0}
            heap = [(0.0, src)]
            done: set[int] = set()
            while heap:
                d, u = heapq.heappop(heap)
                if u in done:
                    continue
                done.add(u)
                ms[self.sites[u]] = d
                km[self.sites[u]] = fibre[u]
                for v, w in self._adj[u].items():
                    nd = d + w
                    if nd < dist.get(v, _INF):
                        dist[v] = nd
                        fibre[v] = fibre[u] + self.graph.edges[self.sites[u], self.sites[v]]["km"]
                        heapq.heappush(heap, (nd, v))
        self._site_paths[a] = (ms, km)
        return ms, km

    # ------------------------------------------------------------------ changes

    def set_link_up(self, a: str, b: str, up: bool) -> None:
        """Mark the link between sites ``a`` and ``b`` up or down and update what it changes.

        Raises:
            KeyError: there is no such link.
        """
        if not self.graph.has_edge(a, b):
            raise KeyError(f"no link {a}--{b}")
        ia, ib = self._sidx[a], self._sidx[b]
        key = (min(ia, ib), max(ia, ib))
        w = self.graph.edges[a, b]["ms"]
        if not up:
            if key in self._down_links:
                return
            self._down_links.add(key)
            self._adj[ia].pop(ib, None)
            self._adj[ib].pop(ia, None)
            self._site_paths.clear()
            for oi, dist in enumerate(self._dist):
                da, db = dist[ia], dist[ib]
                # Only what hangs below the link in this origin's shortest-path tree can change.
                roots = set()
                if da != _INF and abs(da + w - db) <= _EPS:
                    roots.add(ib)
                if db != _INF and abs(db + w - da) <= _EPS:
                    roots.add(ia)
                if roots:
                    self._repair_increase(oi, roots, {})
            return
        if key not in self._down_links:
            return
        self._down_links.discard(key)
        if ia in self._down_sites or ib in self._down_sites:
            return
        self._adj[ia][ib] = w
        self._adj[ib][ia] = w
        self._site_paths.clear()
        for oi, dist in enumerate(self._dist):
            da, db = dist[ia], dist[ib]
            seeds = []
            if da + w < db - _EPS:
                seeds.append((da + w, ib))
            if db + w < da - _EPS:
                seeds.append((db + w, ia))
            if seeds:
                self._repair_decrease(oi, seeds)

    def set_site_up(self, site: str, up: bool) -> None:
        """Mark a site up or down. A down site is neither a destination nor a transit point."""
        s = self._sidx[site]
        if not up:
            if s in self._down_sites:
                return
            neighbours = dict(self._adj[s])
            self._down_sites.add(s)
            for v in neighbours:
                self._adj[v].pop(s, None)
            self._adj[s].clear()
            self._site_paths.clear()
            for oi, dist in enumerate(self._dist):
                if dist[s] != _INF:
                    self._repair_increase(oi, {s}, {s: neighbours})
            return
        if s not in self._down_sites:
            return
        self._down_sites.discard(s)
        self._reconnect(s)
        self._site_paths.clear()
        for oi in range(len(self._dist)):
            self._bring_in(oi, s)

    def add_site(self, site: Site) -> None:
        """Add a site that is not in the layout (e.g. it registered on its own).

        It is linked by the shape rules (hub mesh, regional to nearest hubs, edge to nearest
        regional/hub) and becomes a point of presence for the origin of its city. A site id already
        indexed is left as it is.
        """
        if site.id in self._sidx:
            return
        links = lay.links_for_new_site(site, self._site_objs)
        s = self._add_node(site)
        for link in links:
            self._add_link(link)
        for oi, o in enumerate(self.layout.origins):
            self._dist[oi].append(_INF)
            if o.id == site.city:
                self._access[oi].append((s, lay.access_one_way_ms(o, site, self.layout)))
        self._site_paths.clear()
        for oi in range(len(self._dist)):
            self._bring_in(oi, s)

    # ------------------------------------------------------------------ internals

    def _reconnect(self, s: int) -> None:
        sid = self.sites[s]
        for nb, data in self.graph.adj[sid].items():
            v = self._sidx[nb]
            if v in self._down_sites or (min(s, v), max(s, v)) in self._down_links:
                continue
            self._adj[s][v] = data["ms"]
            self._adj[v][s] = data["ms"]

    def _bring_in(self, oi: int, s: int) -> None:
        """Site ``s`` just became usable for origin ``oi``: give it a distance and let it improve others."""
        dist = self._dist[oi]
        cand = _INF
        for i, w in self._access[oi]:
            if i == s:
                cand = min(cand, w)
        for v, w in self._adj[s].items():
            cand = min(cand, dist[v] + w)
        if cand < dist[s] - _EPS:
            self._repair_decrease(oi, [(cand, s)])

    def _repair_decrease(self, oi: int, seeds: list[tuple[float, int]]) -> None:
        """Distances can only fall: run Dijkstra from the improved nodes, relaxing improvements only."""
        dist = self._dist[oi]
        changed: dict[int, float] = {}  # node -> its distance before the change
        heap = []
        for d, u in seeds:
            if d < dist[u] - _EPS:
                changed.setdefault(u, dist[u])
                dist[u] = d
                heap.append((d, u))
        self._settle(dist, heap, changed, eps=_EPS)
        self._update_ranks(oi, changed)

    def _repair_increase(self, oi: int, roots: set[int], removed: dict[int, dict[int, float]]) -> None:
        """Distances of ``roots`` (and what their shortest paths feed) became invalid; recompute them.

        ``removed`` holds the adjacency a down site had, so what it fed is still found.
        """
        dist = self._dist[oi]
        adj = self._adj
        # Everything fed through a root along a tight edge may have lost its path (ties included:
        # over-approximating only costs time).
        affected = set(roots)
        stack = list(roots)
        while stack:
            u = stack.pop()
            du = dist[u]
            for v, w in (removed.get(u) or adj[u]).items():
                if v not in affected and abs(du + w - dist[v]) <= _EPS:
                    affected.add(v)
                    stack.append(v)
        old = {v: dist[v] for v in affected}
        for v in affected:
            dist[v] = _INF
        # Re-enter the affected region from its unaffected border and from access links.
        heap = []
        access: dict[int, float] = {}
        for i, w in self._access[oi]:
            if i in affected and i not in self._down_sites:
                access[i] = min(w, access.get(i, _INF))
        for v in affected:
            if v in self._down_sites:
                continue
            best = access.get(v, _INF)
            for u, w in adj[v].items():
                if u not in affected and dist[u] + w < best:
                    best = dist[u] + w
            if best < _INF:
                dist[v] = best
                heap.append((best, v))
        self._settle(dist, heap, old, within=affected)  # ``old`` holds every node it may lower
        self._update_ranks(oi, old)

    def _settle(self, dist: array[float], heap: list[tuple[float, int]], changed: dict[int, float], *,
                eps: float = 0.0, within: set[int] | None = None) -> None:
        """Dijkstra from the seeded ``heap``: lower ``dist`` along edges where that gains more than
        ``eps`` (only at nodes ``within``, if given), keeping each lowered node's distance before
        its first change in ``changed``."""
        adj = self._adj
        heapq.heapify(heap)
        while heap:
            d, u = heapq.heappop(heap)
            if d > dist[u]:
                continue
            for v, w in adj[u].items():
                nd = d + w
                if nd < dist[v] - eps and (within is None or v in within):
                    changed.setdefault(v, dist[v])
                    dist[v] = nd
                    heapq.heappush(heap, (nd, v))

    def _dijkstra(self, oi: int) -> array[float]:
        n = len(self.sites)
        dist = [_INF] * n
        heap: list[tuple[float, int]] = []
        down = self._down_sites
        for s, w in self._access[oi]:
            if s not in down and w < dist[s]:
                dist[s] = w
                heap.append((w, s))
        heapq.heapify(heap)
        adj = self._adj
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            d, u = pop(heap)
            if d > dist[u]:
                continue
            for v, w in adj[u].items():
                nd = d + w
                if nd < dist[v]:
                    dist[v] = nd
                    push(heap, (nd, v))
        return array("d", dist)

    def recompute_all(self) -> None:
        """Run Dijkstra again for every origin (a check on the incremental repairs; benchmarks)."""
        for oi in range(len(self._dist)):
            self._dist[oi] = self._dijkstra(oi)
            self._rerank(oi)

    def _update_ranks(self, oi: int, changed: dict[int, float]) -> None:
        """Move the ``changed`` sites (node -> old one-way distance) to their new places in the ranking."""
        if not changed:
            return
        self.repaired += 1
        if len(changed) > 64:
            self._rerank(oi)
            return
        rtts, idx = self._rank_rtt[oi], self._rank_idx[oi]
        for s, old in changed.items():
            if old == _INF:
                continue  # was not ranked
            # Found by its old RTT in O(log n), then a short walk over ties.
            k = bisect.bisect_left(rtts, 2.0 * old)
            while k < len(idx) and idx[k] != s:
                k += 1
            if k < len(idx):
                del idx[k]
                del rtts[k]
        for s in changed:
            if self._dist[oi][s] != _INF:
                self._insert(oi, s)

    def _rerank(self, oi: int) -> None:
        dist = self._dist[oi]
        # Sites enumerated in id order, then a stable sort by distance: ties stay in id order.
        order = sorted((i for i in self._id_order if dist[i] != _INF), key=dist.__getitem__)
        self._rank_idx[oi] = array("l", order)
        self._rank_rtt[oi] = array("d", (2.0 * dist[i] for i in order))

    def _insert(self, oi: int, s: int) -> None:
        rtt = 2.0 * self._dist[oi][s]
        rtts, idx, ids = self._rank_rtt[oi], self._rank_idx[oi], self.sites
        k = bisect.bisect_left(rtts, rtt)
        while k < len(rtts) and rtts[k] == rtt and ids[idx[k]] < ids[s]:
            k += 1
        rtts.insert(k, rtt)
        idx.insert(k, s)

    def __repr__(self) -> str:
        return (
            f"RttIndex(layout={self.layout.name!r}, origins={len(self.origins)}, sites={len(self.sites)}, "
            f"links={self.graph.number_of_edges()}, down_links={len(self._down_links)}, "
            f"down_sites={len(self._down_sites)})"
        )


def build(layout: Layout) -> RttIndex:
    """Shorthand for :meth:`RttIndex.build`."""
    return RttIndex.build(layout)
