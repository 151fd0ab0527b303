"""Request bodies the gateway decodes: msgspec Structs (the same ones /openapi.json is built from).

Unknown fields are rejected (``forbid_unknown_fields``): a 422 naming the field, so a tenant who
sends ``tenant_id`` or ``site`` learns at once that cpn does not take it from them. Every integer
and number has a lower and an upper bound (tests/adapters/test_body_bounds.py checks every body the
OpenAPI document lists).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

Id = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]

# Every number a body takes is bounded both ways, so none reaches SQLite (64-bit integers), the wire
# or a pure core out of range: a value outside is a 400 naming the field, never a 500.
MAX_CARDS = 1_000_000
MAX_RATE_PER_S = 1_000_000.0
MAX_BURST = 1_000_000
BudgetMs = Annotated[float, msgspec.Meta(gt=0, le=10_000)]


class InferBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/infer``: cpn's native inference call."""

    model: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    input: Annotated[str, msgspec.Meta(max_length=200_000)]
    origin: Id | None = None
    budget_ms: BudgetMs | None = None
    policy: Literal["strict", "nearest"] | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=32_768)] = 16


class TenantBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/tenants`` (admin): a tenant and its first API key."""

    id: Id
    name: Annotated[str, msgspec.Meta(max_length=200)] = ""
    default_origin: Id | None = None
    quota_cards: Annotated[int, msgspec.Meta(ge=0, le=MAX_CARDS)] | None = None
    rate_per_s: Annotated[float, msgspec.Meta(gt=0, le=MAX_RATE_PER_S)] | None = None
    burst: Annotated[int, msgspec.Meta(ge=1, le=MAX_BURST)] | None = None


class DrainBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/sites/{site}/drain`` (admin)."""

    on: bool = True


TEN_YEARS_S = 10 * 365 * 86_400
KeySeconds = Annotated[float, msgspec.Meta(gt=0, le=TEN_YEARS_S)]
EpochSeconds = Annotated[float, msgspec.Meta(gt=0, le=4_102_444_800)]  # up to 2100-01-01
KeyLabel = Annotated[str, msgspec.Meta(max_length=200)]


class KeyBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/tenants/{tenant}/keys`` and ``POST /v1/admin/keys`` (admin): one more key,
    optionally expiring at ``expires_at`` (epoch seconds) or ``ttl_s`` from now (not both)."""

    label: KeyLabel = ""
    expires_at: EpochSeconds | None = None
    ttl_s: KeySeconds | None = None


class RotateKeyBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST .../keys/{key_id}/rotate`` (admin): a new key; the old one keeps working ``grace_s``
    more seconds (default 24 h; 0 revokes it now). ``expires_at``/``ttl_s`` are the new key's."""

    grace_s: Annotated[float, msgspec.Meta(ge=0, le=TEN_YEARS_S)] = 86_400.0
    label: KeyLabel = ""
    expires_at: EpochSeconds | None = None
    ttl_s: KeySeconds | None = None
