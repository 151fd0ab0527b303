"""The model catalogue: priced models, their filings, and who may call them. Pure.

What this module promises:

- Rule 1: a :class:`ModelRecord` carries its owner tenant, the accelerators and memory it needs,
  its token prices in integer fen per million tokens, and its filing (备案) status, if any.
- Rule 2 (the filing rule): a tenant marked public-facing may call a model only if the model holds
  a filing for **public** service that is in force on the day of the call (filed on or before it)
  and covers the model's current version (a major change must be filed again). Tenants that are
  not public-facing (internal use, research) may call any model in the catalogue.
  :func:`may_call` returns :class:`Allowed` or a :class:`Refused` naming what filing is missing;
  it never raises for a refusal.
- Rule 3: :func:`filing_header` gives the text served requests must display: the filing number.

Dates are ISO ``YYYY-MM-DD`` in China local time (UTC+8): a filing dated 2024-05-01 is in force
from 00:00 on that day in Beijing.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Literal

import msgspec

from controlplane.market import money

FILING_HEADER = "X-CPN-Model-Filing"
"""Response header carrying the served model's filing number (display is required)."""

Scope = Literal["public", "internal"]
_CHINA = dt.timezone(dt.timedelta(hours=8))
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_.:-]{0,126}$")


class Filing(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A model's filing with the regulator."""

    number: str
    """The filing number as issued (shown in :data:`FILING_HEADER`)."""
    scope: Scope
    """``public``: filed for service to the public; ``internal``: recorded for internal use only."""
    filed_on: str
    """ISO date (China local) from which the filing is in force."""
    covers_version: str = ""
    """The model version the filing covers; empty covers whatever version the record has."""


class ModelRecord(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One model in the catalogue."""

    id: str
    owner: str
    """Owner tenant id."""
    version: str = "1"
    accelerators: tuple[str, ...] = ()
    """Accelerator types the model can be served on."""
    memory_gb: float = 0.0
    """Accelerator memory one replica needs."""
    input_fen_per_mtok: int = 0
    output_fen_per_mtok: int = 0
    filing: Filing | None = None
    owner_share_bp: int = 0
    """Share of token revenue (basis points) credited to the owner tenant when others call it."""


class Allowed(msgspec.Struct, frozen=True, kw_only=True, tag="allowed"):
    """The call may go ahead; ``header`` is the value of :data:`FILING_HEADER` to send, if any."""

    header: str | None = None


class Refused(msgspec.Struct, frozen=True, kw_only=True, tag="refused"):
    """The call is refused (a 403 ``model_not_filed``); ``missing`` names the filing it lacks."""

    model: str
    missing: str
    message: str
    code: str = "model_not_filed"


def record_problem(model: ModelRecord) -> str | None:
    """What is wrong with a catalogue record (naming the field), or None."""
    if not _ID_RE.match(model.id):
        return f"id {model.id!r} is not a valid model id"
    if not model.owner:
        return "owner must name a tenant"
    for name in ("input_fen_per_mtok", "output_fen_per_mtok", "owner_share_bp"):
        value = getattr(model, name)
        if type(value) is not int or value < 0:  # noqa: E721
            return f"{name} must be a non-negative int, got {value!r}"
    if model.owner_share_bp > 10_000:
        return f"owner_share_bp must be <= 10000, got {model.owner_share_bp}"
    if not model.memory_gb >= 0:
        return f"memory_gb must be >= 0, got {model.memory_gb!r}"
    if model.filing is not None:
        if not model.filing.number.strip():
            return "filing.number must not be empty"
        try:
            dt.date.fromisoformat(model.filing.filed_on)
        except ValueError:
            return f"filing.filed_on must be an ISO date, got {model.filing.filed_on!r}"
    return None


def china_date(now: float) -> dt.date:
    """The date in China local time (UTC+8) at epoch seconds ``now``."""
    return dt.datetime.fromtimestamp(now, _CHINA).date()


def filing_in_force(model: ModelRecord, now: float) -> bool:
    """True if the model holds a public-service filing in force at ``now`` for its current version."""
    return _missing(model, now) is None


def _missing(model: ModelRecord, now: float) -> str | None:
    f = model.filing
    if f is None:
        return "no filing"
    if f.scope != "public":
        return f"filing {f.number} is for internal use only, not public service"
    if dt.date.fromisoformat(f.filed_on) > china_date(now):
        return f"filing {f.number} is in force only from {f.filed_on}"
    if f.covers_version and f.covers_version != model.version:
        return (f"filing {f.number} covers version {f.covers_version}, the model is at version "
                f"{model.version}: a changed model must be filed again")
    return None


def may_call(model: ModelRecord, *, public_facing: bool, now: float) -> Allowed | Refused:
    """Rule 2: may a tenant (public-facing or not) call ``model`` at ``now``?"""
    header = filing_header(model)
    if not public_facing:
        return Allowed(header=header)
    missing = _missing(model, now)
    if missing is None:
        return Allowed(header=header)
    return Refused(
        model=model.id,
        missing=f"public-service filing ({missing})",
        message=(f"model {model.id} may not serve a public-facing tenant: it needs a filing for "
                 f"public service in force ({missing})"),
    )


def filing_header(model: ModelRecord) -> str | None:
    """Value of :data:`FILING_HEADER` for a served request: the filing number, or None if unfiled."""
    return model.filing.number if model.filing is not None else None


def price_usage(model: ModelRecord, prompt_tokens: int, completion_tokens: int) -> money.Fen:
    """Fen for one line of usage of ``model`` (prices exact, rounded once, half up)."""
    return money.price_tokens(prompt_tokens, completion_tokens, model.input_fen_per_mtok, model.output_fen_per_mtok)


def estimate_request_fen(model: ModelRecord, prompt_tokens: int, max_tokens: int) -> money.Fen:
    """The most a request can cost before it runs (its prompt plus ``max_tokens`` of output),
    for a budget check."""
    return price_usage(model, prompt_tokens, max_tokens)
