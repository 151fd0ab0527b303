"""Readiness of a hub process: can it do its job right now (``/readyz``), as opposed to being alive
(``/healthz``).

A hub is ready when its record is open, its NATS connection is up and its layout is loaded; a
composition root may add gates of its own that hold readiness until something it promises is true
(``cpn up`` holds ``demo_model`` until the demo tenant's chat request would be served). A load
balancer or a Kubernetes readiness probe sends traffic only to ready processes; a liveness probe
(``/healthz``) must not restart a hub because NATS is down, so it does not look at any of this.

Promise: :meth:`Readiness.report` reads attributes only (no I/O), so a probe costs microseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from controlplane.store.handle import Store


class Connection(Protocol):
    @property
    def connected(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Check:
    """One readiness check: ``ok``, and when not, why (one line for an operator)."""

    name: str
    ok: bool
    detail: str = ""


class Readiness:
    """The built-in checks of a hub plus named gates held by whoever composed the process.

    Args:
        store: the process's record (ready once open).
        bus: its NATS connection (ready while connected).
    """

    def __init__(self, *, store: Store, bus: Connection) -> None:
        self.store = store
        self.bus = bus
        self._gates: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"<Readiness gates_held={len(self._gates)}>"

    def hold(self, name: str, why: str) -> None:
        """Keep the process not ready until :meth:`release` of ``name`` (``why`` is shown in /readyz)."""
        self._gates[name] = why

    def release(self, name: str) -> None:
        self._gates.pop(name, None)

    def checks(self) -> list[Check]:
        """Every check, in a fixed order: store, nats, layout, then the gates by name.

        (The layout is loaded when the process is composed, before it can answer: always ok.)"""
        opened = self.store.is_open
        connected = self.bus.connected
        out = [
            Check("store", opened, "" if opened else "record not open"),
            Check("nats", connected, "" if connected else "not connected to NATS"),
            Check("layout", True),
        ]
        out.extend(Check(name, False, why) for name, why in sorted(self._gates.items()))
        return out

    def ready(self) -> bool:
        return all(c.ok for c in self.checks())

    def report(self) -> dict[str, object]:
        """The ``/readyz`` body: ``{"ready": bool, "checks": {name: "ok" | reason}}``."""
        checks = self.checks()
        return {
            "ready": all(c.ok for c in checks),
            "checks": {c.name: "ok" if c.ok else c.detail for c in checks},
        }

