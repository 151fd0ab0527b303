"""A tenant's card quota, shared by training and deployments (architecture: tenancy). Pure.

Rule 1: ``quota_cards`` bounds the cards a tenant holds in all: its training jobs that are placed
or running plus its deployments' replicas that are placed, loading or ready. ``None`` is no quota.
Rule 2: each side asks :func:`cards_left` with what the *other* side (and, for deployments, its own
replicas) holds; the training scheduler counts its own jobs itself, so training asks with
``training_cards=0`` and gets the quota less what deployments hold, in whole cards.
"""

from __future__ import annotations

import math

_EPS = 1e-9
"""Slack for fractional replica cards (0.1 + 0.2 must fit in 0.3)."""


def cards_left(quota_cards: int | float | None, *, training_cards: float = 0.0,
               deployment_cards: float = 0.0) -> float | None:
    """Cards the tenant may still take (never negative); None when it has no quota."""
    if quota_cards is None:
        return None
    return max(0.0, float(quota_cards) - training_cards - deployment_cards)


def training_quota(quota_cards: int | None, deployment_cards: float) -> int | None:
    """The quota the training scheduler sees: whole cards left once deployments are counted."""
    left = cards_left(quota_cards, deployment_cards=deployment_cards)
    return None if left is None else max(0, math.floor(left + _EPS))


def replicas_within(left: float | None, cards_per_replica: float) -> int | None:
    """How many replicas of ``cards_per_replica`` fit in ``left`` cards (None: no quota)."""
    if left is None:
        return None
    return max(0, int((left + _EPS) // cards_per_replica))
