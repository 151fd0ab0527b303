"""What a site holds right now: cards per accelerator, model replicas, training attempts' cards.

Pure bookkeeping (no asyncio, no clock): the agent asks it questions and tells it what happened.

- Rule 1: cards are never over-committed: replicas (fractional cards) plus attempts (whole cards)
  on an accelerator never exceed its total; a reservation that does not fit returns None.
- Rule 2: a request gets a slot only on a ``ready`` replica with ``busy < slots``; the least busy
  replica is chosen so load spreads over a model's replicas.
- Rule 3: while ``serving`` is False (the backend does not answer) no request gets a slot
  (``backend_unavailable``) and ready replicas are reported ``loading``: not ready.
- Free cards are rounded to 1e-6 so 0.1 + 0.2 replicas do not show as 0.30000000000000004.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edge_agent import wire

READY = "ready"
LOADING = "loading"


@dataclass(slots=True)
class Replica:
    """A model replica on this site (mutable; owned by :class:`Inventory`)."""

    model: str
    deployment: str
    accelerator: str
    cards: float
    slots: int
    state: str = LOADING
    busy: int = 0

    def status(self, serving: bool = True) -> wire.ReplicaStatus:
        state = self.state if serving or self.state != READY else LOADING
        return wire.ReplicaStatus(
            model=self.model, deployment=self.deployment, state=state,  # type: ignore[arg-type]
            cards=self.cards, slots=self.slots, busy=self.busy, accelerator=self.accelerator,
        )


class Inventory:
    """Cards, replicas and attempt reservations of one site."""

    def __init__(self, accelerators: dict[str, int]) -> None:
        self.total: dict[str, int] = dict(accelerators)
        self.replicas: dict[tuple[str, str], Replica] = {}
        self.attempt_cards: dict[str, tuple[str, int]] = {}
        """job -> (accelerator, cards) of its running attempt."""
        self.serving = True
        """The inference backend answers (Rule 3; kept by :mod:`edge_agent.backend_health`)."""

    def __repr__(self) -> str:
        return f"<Inventory replicas={len(self.replicas)} attempts={len(self.attempt_cards)} free={self.free_cards()}>"

    def free_cards(self) -> dict[str, float]:
        """Cards not used by replicas or attempts, per accelerator."""
        used = {name: 0.0 for name in self.total}
        for r in self.replicas.values():
            used[r.accelerator] = used.get(r.accelerator, 0.0) + r.cards
        for accelerator, cards in self.attempt_cards.values():
            used[accelerator] = used.get(accelerator, 0.0) + cards
        return {name: round(max(0.0, total - used[name]), 6) for name, total in self.total.items()}

    def pick_accelerator(self, cards: float) -> str | None:
        """The accelerator with the most free cards that fits ``cards`` (ties by name), or None."""
        free = self.free_cards()
        fitting = [(-left, name) for name, left in free.items() if left + 1e-9 >= cards]
        return min(fitting)[1] if fitting else None

    # ------------------------------------------------------------------ replicas

    def add_replica(self, model: str, deployment: str, cards: float, slots: int,
                    accelerator: str | None = None) -> Replica | None:
        """Reserve cards for a new replica (state ``loading``) on ``accelerator``, or (None) on the
        one with the most free cards; None if it does not fit."""
        if accelerator is None:
            accelerator = self.pick_accelerator(cards)
        elif self.free_cards().get(accelerator, -1.0) + 1e-9 < cards:
            return None
        if accelerator is None:
            return None
        replica = Replica(model=model, deployment=deployment, accelerator=accelerator, cards=cards, slots=slots)
        self.replicas[(model, deployment)] = replica
        return replica

    def remove_replica(self, model: str, deployment: str) -> Replica | None:
        return self.replicas.pop((model, deployment), None)

    def acquire_slot(self, model: str) -> tuple[Replica | None, str]:
        """Take a slot on the least busy ready replica of ``model``.

        Returns:
            ``(replica, "")`` on success, else ``(None, reason)`` with reason ``unknown_model`` (no
            replica, or none ready yet), ``busy`` (every slot taken) or ``backend_unavailable``.
        """
        if not self.serving:
            return None, "backend_unavailable"
        best: Replica | None = None
        for r in self.replicas.values():  # a site holds a handful of replicas: a scan beats an index
            if r.model != model or r.state != READY:
                continue
            if best is None or (r.busy * best.slots, r.busy, r.deployment) < (best.busy * r.slots, best.busy, best.deployment):
                best = r
        if best is None:
            return None, "unknown_model"
        if best.busy >= best.slots:
            return None, "busy"
        best.busy += 1
        return best, ""

    @staticmethod
    def release_slot(replica: Replica) -> None:
        replica.busy = max(0, replica.busy - 1)

    def statuses(self) -> list[wire.ReplicaStatus]:
        return [r.status(self.serving) for r in self.replicas.values()]

    def inflight(self) -> int:
        return sum(r.busy for r in self.replicas.values())

    # ------------------------------------------------------------------ attempts

    def reserve_attempt(self, job: str, accelerator: str, cards: int) -> bool:
        """Reserve whole cards for a job's attempt; False if the accelerator lacks them."""
        if accelerator not in self.total:
            return False
        free = self.free_cards()[accelerator]
        if free + 1e-9 < cards:
            return False
        self.attempt_cards[job] = (accelerator, cards)
        return True

    def release_attempt(self, job: str) -> None:
        self.attempt_cards.pop(job, None)


class ServiceTimes:
    """Service times of the most recent requests (a ring), for heartbeat p50/p99."""

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._values: list[float] = []
        self._next = 0

    def add(self, service_ms: float) -> None:
        if len(self._values) < self._size:
            self._values.append(service_ms)
        else:
            self._values[self._next] = service_ms
            self._next = (self._next + 1) % self._size

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile, ``q`` in 0..1; 0.0 when nothing was recorded."""
        if not self._values:
            return 0.0
        ordered = sorted(self._values)
        index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
        return ordered[index]

    def __len__(self) -> int:
        return len(self._values)
