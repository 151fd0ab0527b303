"""Whether the site's inference backend answers: probes, and requests that could not connect.

Promises:

- Rule 1: a backend with a ``probe()`` method (``openai-http``) and ``probe_s > 0`` is checked at
  start and every ``probe_s``; while a check fails, ``inventory.serving`` is False, so the site's
  replicas are reported not ready (state ``loading``: the wire's not-ready, not-failed state, which
  every hub's router passes over) and requests are refused at once with ``backend_unavailable``
  (retryable: the hub tries another site). The first check that passes makes them ready again.
- Rule 2: a request that cannot connect to the backend marks it down at once (:meth:`mark_down`),
  without waiting for the next check; the checks alone bring it back.
- Rule 3: every change is logged once with the probe's detail (URLs stay in the site's log) and
  reported through ``on_change`` (the agent heartbeats at once).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from edge_agent.clock import WALL, Clock
from edge_agent.inventory import Inventory
from edge_agent.logs import log

Probe = Callable[[], Awaitable[str]]


class BackendHealth:
    """Tracks one backend's reachability and mirrors it into ``inventory.serving``."""

    def __init__(self, site: str, probe: Probe | None, probe_s: float, inventory: Inventory,
                 on_change: Callable[[bool], None], *, clock: Clock = WALL) -> None:
        self.site = site
        self.clock = clock
        self._probe = probe
        self.probe_s = probe_s
        self.inventory = inventory
        self._on_change = on_change
        self.probes = 0
        self.downs = 0

    def __repr__(self) -> str:
        return f"<BackendHealth site={self.site} up={self.up} probes={self.probes} downs={self.downs}>"

    @property
    def enabled(self) -> bool:
        return self._probe is not None and self.probe_s > 0

    @property
    def up(self) -> bool:
        return self.inventory.serving

    def _set(self, up: bool, detail: str) -> None:
        if up == self.inventory.serving:
            return
        self.inventory.serving = up
        if up:
            log(logging.INFO, "backend_up", site=self.site)
        else:
            self.downs += 1
            log(logging.WARNING, "backend_down", site=self.site, detail=detail)
        self._on_change(up)

    def mark_down(self, detail: str) -> None:
        """A request could not reach the backend (Rule 2); ignored when nothing checks it."""
        if self.enabled:
            self._set(False, detail)

    async def check(self) -> bool:
        """Probe once and record the result; True when the backend answered."""
        assert self._probe is not None
        problem = await self._probe()
        self.probes += 1
        self._set(not problem, problem)
        return not problem

    async def run(self) -> None:
        """Probe every ``probe_s`` until cancelled (returns at once when probing is off)."""
        if not self.enabled:
            return
        while True:
            await self.check()
            await self.clock.sleep(self.probe_s)
