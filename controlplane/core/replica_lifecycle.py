"""The lifecycle of one inference replica (a deployment's replica at one site): a transition table.

Pure; read it the way you read ``lifecycle.py`` (the job lifecycle) and h11's ``_state.py``.

- Rule 1: the only way to change a replica's state is :func:`transition` over :data:`TRANSITIONS`;
  an event the table does not hold for the state raises :class:`IllegalReplicaTransition`, which
  the caller counts and drops (it is never applied silently).
- Rule 2: ``placed``, ``loading`` and ``ready`` hold cards at the site (:data:`HOLDING`); ``lost``
  and ``removed`` hold none. ``removed`` is the end of a placement; the same (deployment, site) may
  be placed again later (``place``), which starts a new placement.
- Rule 3: what the agent reports (``reported_loading``/``reported_ready``/``reported_failed``) moves
  a holding replica to that state; ``missing`` (the agent forgot a replica it had accepted) puts it
  back to ``placed`` so that ``LoadModel`` is sent again.
"""

from __future__ import annotations

import enum

from controlplane.core.errors import Conflict


class ReplicaState(enum.StrEnum):
    PLACED = "placed"      # decided; LoadModel queued in the outbox
    LOADING = "loading"    # the agent accepted LoadModel or reports it loading
    READY = "ready"        # the agent reports it ready (it serves)
    LOST = "lost"          # its site was declared lost
    REMOVED = "removed"    # unloaded (or to be): holds no cards


class ReplicaEvent(enum.StrEnum):
    PLACE = "place"                        # a plan put the deployment on this site
    ACCEPTED = "accepted"                  # the agent acknowledged LoadModel
    REPORTED_LOADING = "reported_loading"  # a heartbeat lists it loading
    REPORTED_READY = "reported_ready"      # a heartbeat lists it ready
    REPORTED_FAILED = "reported_failed"    # a heartbeat lists it failed
    REFUSED = "refused"                    # the agent refused LoadModel (no capacity, draining, ...)
    MISSING = "missing"                    # heartbeats stopped listing an accepted replica
    SITE_LOST = "site_lost"                # the registry declared the site lost
    UNPLACE = "unplace"                    # a plan (or a delete) takes the replica off the site


S, E = ReplicaState, ReplicaEvent

TRANSITIONS: dict[ReplicaState, dict[ReplicaEvent, ReplicaState]] = {
    S.PLACED: {
        E.ACCEPTED: S.LOADING,
        E.REPORTED_LOADING: S.LOADING,
        E.REPORTED_READY: S.READY,
        E.REPORTED_FAILED: S.REMOVED,
        E.REFUSED: S.REMOVED,
        E.SITE_LOST: S.LOST,
        E.UNPLACE: S.REMOVED,
    },
    S.LOADING: {
        E.REPORTED_READY: S.READY,
        E.REPORTED_FAILED: S.REMOVED,
        E.MISSING: S.PLACED,
        E.SITE_LOST: S.LOST,
        E.UNPLACE: S.REMOVED,
    },
    S.READY: {
        E.REPORTED_LOADING: S.LOADING,  # the agent reloads it (e.g. after a backend restart)
        E.REPORTED_FAILED: S.REMOVED,
        E.MISSING: S.PLACED,
        E.SITE_LOST: S.LOST,
        E.UNPLACE: S.REMOVED,
    },
    S.LOST: {E.PLACE: S.PLACED, E.UNPLACE: S.REMOVED},
    S.REMOVED: {E.PLACE: S.PLACED},
}

HOLDING = frozenset({S.PLACED, S.LOADING, S.READY})
"""States whose cards are allocated at the site."""


class IllegalReplicaTransition(Conflict):
    """``event`` is not allowed for a replica in ``state``."""

    def __init__(self, state: ReplicaState, event: ReplicaEvent) -> None:
        super().__init__(f"cannot {event.value} a replica that is {state.value}", field="state")
        self.state = state
        self.event = event


def transition(state: ReplicaState | str, event: ReplicaEvent) -> ReplicaState:
    """The state after ``event`` in ``state``.

    Raises:
        IllegalReplicaTransition: the table has no such edge (or ``state`` is no replica state).
    """
    try:
        old = ReplicaState(state)
    except ValueError:
        raise IllegalReplicaTransition(S.REMOVED, event) from None
    try:
        return TRANSITIONS[old][event]
    except KeyError:
        raise IllegalReplicaTransition(old, event) from None


def event_for_report(status: str) -> ReplicaEvent:
    """The event a heartbeat's replica status (``loading``, ``ready``, ``failed``) stands for."""
    return {"loading": E.REPORTED_LOADING, "ready": E.REPORTED_READY}.get(status, E.REPORTED_FAILED)
