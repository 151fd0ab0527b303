"""The market API: the catalogue, offers, budgets and tenants' settings (admin key); quotes and
statements (tenant key; admins name the account). See docs/market.md.

::

    PUT    /v1/market/models/{model}      ModelBody -> 200 the new revision (admin)
    GET    /v1/market/models              the catalogue in force
    POST   /v1/market/offers              OfferBody -> 201 (200 if the same offer was there) (admin, or
                                          a provider key for its own pools; 422 ``provider`` if the
                                          pool's declared provider is another)
    GET    /v1/market/offers              ?pool=&provider= (admin; a provider key: its own)
    DELETE /v1/market/offers/{offer}      withdraw now (admin; a provider key: its own)
    PUT    /v1/tenants/{tenant}/budget    BudgetBody -> 200 with where it stands (admin)
    GET    /v1/tenants/{tenant}/budget    (admin)
    PUT    /v1/tenants/{tenant}/market    TenantMarketBody: public_facing, filing_number (admin)
    GET    /v1/tenants/{tenant}/market    (admin)
    POST   /v1/quotes                     the /v1/jobs body -> 201 quote (tenant)
    GET    /v1/statements                 ?period=month|day&at=EPOCH | ?start=&end=; ?format=csv;
                                          admins: ?account=tenant:ID|provider:ID|operator:NAME;
                                          a provider key: its own provider:ID
    GET    /v1/market/totals              ?period=&at= | ?start=&end= (admin)
    GET    /v1/market/reconcile           the ledger against billed lines × prices (admin)
    GET    /v1/jobs/{job}/charges         what a job cost and why (tenant)
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import msgspec
from aiohttp import web

from controlplane.core.errors import Forbidden, NotFound, RequestError
from controlplane.gateway.app import SERVICES, Routes, json_response, principal, read_body, require_admin, require_tenant
from controlplane.gateway.jobs import JobBody, body_hash, normalise
from controlplane.gateway.openapi import Op
from controlplane.market import budgets, catalogue, ledger, offers, views
from controlplane.services.market import MarketService

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=127, pattern=r"^[a-z0-9][a-z0-9_.:-]{0,126}$")]
Fen = Annotated[int, msgspec.Meta(ge=0, le=10**15)]
Hour = Annotated[int, msgspec.Meta(ge=0, le=23)]
Epoch = Annotated[float, msgspec.Meta(ge=0, le=253_402_300_799)]
Text = Annotated[str, msgspec.Meta(max_length=200)]


class FilingBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A model's filing with the regulator."""

    number: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    scope: Literal["public", "internal"]
    filed_on: Annotated[str, msgspec.Meta(pattern=r"^\d{4}-\d{2}-\d{2}$")]
    """ISO date, China local time, from which it is in force."""
    covers_version: Text = ""


class ModelBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``PUT /v1/market/models/{model}``: a new revision of a catalogue record, in force from now."""

    owner: Id
    """The owner tenant."""
    version: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] = "1"
    accelerators: Annotated[list[Annotated[str, msgspec.Meta(min_length=1, max_length=64)]],
                            msgspec.Meta(max_length=16)] = []
    memory_gb: Annotated[float, msgspec.Meta(ge=0, le=100_000)] = 0.0
    input_fen_per_mtok: Fen = 0
    output_fen_per_mtok: Fen = 0
    filing: FilingBody | None = None
    owner_share_bp: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 0


class WindowBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    start_hour: Hour
    end_hour: Hour
    fen_per_card_hour: Fen


class OfferBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/market/offers``: a pool owner's price per card-hour for one accelerator."""

    id: Id
    pool: Id
    provider: Id
    accelerator: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    fen_per_card_hour: Fen
    windows: Annotated[list[WindowBody], msgspec.Meta(max_length=24)] = []
    min_lease_s: Annotated[int, msgspec.Meta(ge=0, le=366 * 86_400)] = 0
    valid_from: Epoch | None = None
    """None: now."""
    valid_until: Epoch | None = None


class BudgetBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``PUT /v1/tenants/{tenant}/budget``: a spend limit per calendar day or month (China time)."""

    limit_fen: Fen
    period: Literal["day", "month"] = "month"
    thresholds_pct: Annotated[list[Annotated[int, msgspec.Meta(ge=1, le=100)]], msgspec.Meta(max_length=10)] = msgspec.field(default_factory=lambda: [50, 80, 100])


class TenantMarketBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``PUT /v1/tenants/{tenant}/market``."""

    public_facing: bool
    """True: the tenant serves the public; it may call only models filed for public service."""
    filing_number: Text = ""
    """The tenant's own service filing, kept and shown."""


def _market(request: web.Request) -> MarketService:
    return request.app[SERVICES].market


def _now(request: web.Request) -> float:
    """The hub's clock (injected in tests and `cpn up --time-scale` runs), never the wall's."""
    return _market(request).clock.time()


# --------------------------------------------------------------------------- admin


async def put_model(request: web.Request) -> web.Response:
    require_admin(request)
    body = await read_body(request, ModelBody)
    model_id = request.match_info["model"]
    filing = None if body.filing is None else catalogue.Filing(
        number=body.filing.number, scope=body.filing.scope, filed_on=body.filing.filed_on,
        covers_version=body.filing.covers_version)
    record = catalogue.ModelRecord(
        id=model_id, owner=body.owner, version=body.version, accelerators=tuple(body.accelerators),
        memory_gb=body.memory_gb, input_fen_per_mtok=body.input_fen_per_mtok,
        output_fen_per_mtok=body.output_fen_per_mtok, filing=filing, owner_share_bp=body.owner_share_bp)
    return json_response(await _market(request).put_model(record))


async def list_models(request: web.Request) -> web.Response:
    principal(request)
    return json_response({"object": "list", "data": _market(request).models()})


def _admin_or_provider(request: web.Request) -> str | None:
    """None for an admin key, the provider's id for a provider key; 403 for anyone else."""
    p = principal(request)
    if p.provider_id is not None:
        return p.provider_id
    if not p.is_admin:
        raise Forbidden("this endpoint needs an admin or a provider key")
    return None


async def post_offer(request: web.Request) -> web.Response:
    provider = _admin_or_provider(request)
    body = await read_body(request, OfferBody)
    offer = offers.Offer(
        id=body.id, pool=body.pool, provider=body.provider, accelerator=body.accelerator,
        fen_per_card_hour=body.fen_per_card_hour,
        windows=tuple(offers.Window(start_hour=w.start_hour, end_hour=w.end_hour, fen_per_card_hour=w.fen_per_card_hour)
                      for w in body.windows),
        min_lease_s=body.min_lease_s, valid_from=body.valid_from if body.valid_from is not None else _now(request),
        valid_until=body.valid_until)
    view, new = await _market(request).put_offer(offer, by_provider=provider)
    return json_response(view, status=201 if new else 200)


async def list_offers(request: web.Request) -> web.Response:
    by = _admin_or_provider(request)
    data = _market(request).offers(pool=request.query.get("pool"), provider=request.query.get("provider"),
                                   by_provider=by)
    return json_response({"object": "list", "data": data})


async def withdraw_offer(request: web.Request) -> web.Response:
    by = _admin_or_provider(request)
    return json_response(await _market(request).withdraw_offer(request.match_info["offer"], by_provider=by))


async def put_budget(request: web.Request) -> web.Response:
    require_admin(request)
    body = await read_body(request, BudgetBody)
    budget = budgets.Budget(tenant=request.match_info["tenant"], limit_fen=body.limit_fen, period=body.period,
                            thresholds_pct=tuple(body.thresholds_pct))
    return json_response(await _market(request).put_budget(budget))


async def get_budget(request: web.Request) -> web.Response:
    require_admin(request)
    return json_response(_market(request).budget(request.match_info["tenant"]))


async def put_tenant_market(request: web.Request) -> web.Response:
    require_admin(request)
    body = await read_body(request, TenantMarketBody)
    return json_response(await _market(request).put_tenant(request.match_info["tenant"], public_facing=body.public_facing,
                                                     filing_number=body.filing_number))


async def get_tenant_market(request: web.Request) -> web.Response:
    require_admin(request)
    return json_response(_market(request).tenant(request.match_info["tenant"]))


# --------------------------------------------------------------------------- quotes


async def create_quote(request: web.Request) -> web.Response:
    """Price a training job (the ``/v1/jobs`` body) on every feasible pool, before committing."""
    tenant = require_tenant(request)
    body = await read_body(request, JobBody)
    if body.quote_id is not None or body.quote_pool is not None:
        raise RequestError("a quote is asked for the job body alone", field="quote_id" if body.quote_id else "quote_pool")
    now = _now(request)
    spec = normalise(body, request, now)
    q = await _market(request).quote(tenant, spec, body_hash(spec), now)
    return json_response(views.quote_body(q), status=201, headers={"Location": f"/v1/quotes/{q.id}"})


async def job_charges(request: web.Request) -> web.Response:
    tenant = require_tenant(request)
    job_id = request.match_info["job"]
    if request.app[SERVICES].training.job(job_id, tenant=tenant) is None:
        raise NotFound(f"job {job_id!r} not found", field="job")
    return json_response(_market(request).job_charges(job_id))


# --------------------------------------------------------------------------- statements


def _float(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise RequestError(f"{name} must be epoch seconds, got {raw!r}", field=name) from None
    if not math.isfinite(value) or not 0 <= value <= 253_402_300_799:
        raise RequestError(f"{name} must be epoch seconds, got {raw!r}", field=name)
    return value


def _period(request: web.Request) -> tuple[float, float]:
    """``[start, end)`` from ``start``/``end``, else the calendar ``period`` (default month, China
    time) holding ``at`` (default now)."""
    start, end = _float(request, "start"), _float(request, "end")
    if start is not None or end is not None:
        if start is None or end is None:
            raise RequestError("give both start and end, or neither", field="start" if start is None else "end")
        if not end > start:
            raise RequestError("end must be after start", field="end")
        return start, end
    period = request.query.get("period", "month")
    if period not in ("day", "month"):
        raise RequestError(f"period must be day or month, got {period!r}", field="period")
    at = _float(request, "at")
    return budgets.period_bounds(period, at if at is not None else _now(request))  # type: ignore[arg-type]


async def statements(request: web.Request) -> web.StreamResponse:
    """A tenant's statement for a period (admins: any account), as JSON or CSV."""
    p = principal(request)
    account = request.query.get("account")
    if p.provider_id is not None:
        own = f"provider:{p.provider_id}"
        if account is not None and account != own:
            raise Forbidden(f"a provider key reads only its own statement ({own})", field="account")
        account = own
    elif p.is_admin:
        if not account or not ledger.ACCOUNT_RE.match(account):
            raise RequestError("admins name the account: ?account=tenant:ID, provider:ID or operator:NAME",
                               field="account")
    else:
        own = f"tenant:{p.tenant_id}"
        if account is not None and account != own:
            raise NotFound(f"account {account!r} not found", field="account")
        account = own
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise RequestError(f"format must be json or csv, got {fmt!r}", field="format")
    start, end = _period(request)
    st = _market(request).statement(account, start, end)
    if fmt == "csv":
        name = account.replace(":", "-")
        return web.Response(text=ledger.statement_csv(st), content_type="text/csv", headers={
            "Content-Disposition": f'attachment; filename="statement-{name}-{int(start)}.csv"'})
    return json_response(views.statement_body(st))


async def totals(request: web.Request) -> web.Response:
    require_admin(request)
    start, end = _period(request)
    return json_response(_market(request).totals(start, end))


async def reconcile(request: web.Request) -> web.Response:
    require_admin(request)
    body = msgspec.to_builtins(_market(request).reconcile())
    return json_response({"object": "market.reconciliation", **body})


_PERIOD = (("period", "query", "day or month (China time; default month)"),
           ("at", "query", "epoch seconds inside the period (default now)"),
           ("start", "query", "epoch seconds (with end, instead of period)"), ("end", "query", "epoch seconds"))

OPERATIONS = [
    Op("PUT", "/v1/market/models/{model}", "Add a catalogue revision of a model (prices, filing), in force from now",
       body=ModelBody, auth="admin", tags=("market",)),
    Op("GET", "/v1/market/models", "The model catalogue in force", tags=("market",)),
    Op("POST", "/v1/market/offers", "Publish a pool owner's offer (price per card-hour by accelerator)", body=OfferBody,
       status=201, auth="admin", tags=("market",)),
    Op("GET", "/v1/market/offers", "Offers, past ones included", auth="admin", tags=("market",),
       params=(("pool", "query", "only this pool's"), ("provider", "query", "only this provider's"))),
    Op("DELETE", "/v1/market/offers/{offer}", "Withdraw an offer now", auth="admin", tags=("market",)),
    Op("PUT", "/v1/tenants/{tenant}/budget", "Set a tenant's spend limit per day or month", body=BudgetBody,
       auth="admin", tags=("market",)),
    Op("GET", "/v1/tenants/{tenant}/budget", "A tenant's budget and where it stands", auth="admin", tags=("market",)),
    Op("PUT", "/v1/tenants/{tenant}/market", "Mark a tenant public-facing (filed models only) or internal",
       body=TenantMarketBody, auth="admin", tags=("market",)),
    Op("GET", "/v1/tenants/{tenant}/market", "A tenant's market settings", auth="admin", tags=("market",)),
    Op("POST", "/v1/quotes", "Price a training job (the /v1/jobs body) before committing to it", body=JobBody,
       status=201, tags=("market", "training")),
    Op("GET", "/v1/statements", "A statement of account for a period (JSON, or CSV with format=csv)",
       tags=("market",), params=(("account", "query", "admins: tenant:ID, provider:ID or operator:NAME"),
                                  ("format", "query", "json or csv"), *_PERIOD)),
    Op("GET", "/v1/market/totals", "What each tenant owes, each provider earns, and the network kept",
       auth="admin", tags=("market",), params=_PERIOD),
    Op("GET", "/v1/market/reconcile", "The ledger checked against billed usage and attempts × prices",
       auth="admin", tags=("market",)),
    Op("GET", "/v1/jobs/{job}/charges", "What a job cost and why (its ledger transactions)", tags=("market", "training")),
]


def add_routes(routes: Routes) -> None:
    routes.add_put("/v1/market/models/{model}", put_model)
    routes.add_get("/v1/market/models", list_models)
    routes.add_post("/v1/market/offers", post_offer, providers=True)
    routes.add_get("/v1/market/offers", list_offers, providers=True)
    routes.add_delete("/v1/market/offers/{offer}", withdraw_offer, providers=True)
    routes.add_put("/v1/tenants/{tenant}/budget", put_budget)
    routes.add_get("/v1/tenants/{tenant}/budget", get_budget)
    routes.add_put("/v1/tenants/{tenant}/market", put_tenant_market)
    routes.add_get("/v1/tenants/{tenant}/market", get_tenant_market)
    routes.add_post("/v1/quotes", create_quote)
    routes.add_get("/v1/statements", statements, providers=True)
    routes.add_get("/v1/market/totals", totals)
    routes.add_get("/v1/market/reconcile", reconcile)
    routes.add_get("/v1/jobs/{job}/charges", job_charges)
