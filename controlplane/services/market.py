"""The market service: prices, filings, budgets and the ledger, carried out for the gateway, the
usage flush and training metering (docs/market.md).

It asks the pure market (``controlplane/market/``) and writes its record (``store/market/``):

- **Admin**: catalogue revisions, offers, budgets and tenants' market settings, each checked by the
  pure ``*_problem`` functions first (a 400 naming the field) and written in one transaction,
  awaited (``store.db.write``: on the replicated record the loop goes on while a quorum answers).
- **Inference gate** (:meth:`MarketService.admit`, before a request is relayed): a public-facing
  tenant calling a model without a public-service filing in force is refused (403
  ``model_not_filed``, naming the missing filing); a tenant whose budget the request could exceed
  (its prompt plus ``max_tokens`` of output at the model's prices, on top of what it spent this
  period, including usage not flushed yet) is refused (402 ``budget_exceeded`` with the figures).
  Otherwise the answer is the filing number to display (``X-CPN-Model-Filing``). Catalogue, budgets
  and settings are read from memory, re-read from the record at most once a second (so a change
  made by ``cpn market`` or another hub applies within a second).
- **Usage flush** (:meth:`MarketService.post_usage`): called by the hub *inside* the transaction
  that adds the usage counters: each (tenant, model, site) line is kept and, when the model is in
  the catalogue, priced and posted to the ledger. All of it commits, or none of it.
- **Training metering** (:meth:`MarketService.bill_attempt`): called by the training service
  *inside* the transaction that ends an attempt: the attempt is kept and priced at the offer in
  force at its start, the tenant charged at most what its quote still allows.
- **Placement** (:meth:`MarketService.price_pools`, before each scheduling round): pools with an
  offer in force are priced at it, so the scheduler minimises what the tenant pays (the offer,
  which includes the owner's energy); pools without one are still priced by their energy.
- **Quotes** (:meth:`MarketService.quote`, :meth:`MarketService.bind_quote`) and statements,
  totals and the reconciliation for the operator.
- **Holds** (``budgets`` Rules 3-4): an admitted request holds its most-it-can-cost in this
  process's memory until its answer is done; an accepted job holds its own (the quote's maximum,
  else the most expensive feasible offer's) in its stored spec, less what it was charged, until
  it ends. Every check counts spent + both holds.

With several hub processes (``record = "nats"``) everything this service writes is in the
replicated record (``store/replica.py``), so statements, budgets, offers and jobs' holds are the
same at every process; only requests' holds are per process (docs/market.md, "Budgets").
"""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING, Any

import msgspec

from controlplane.core import lifecycle, placement
from controlplane.core.clock import Clock
from controlplane.core.errors import Conflict, Forbidden, NotFound, Refused, RequestError, Unprocessable
from controlplane.core.jobspec import JobSpec
from controlplane.core.usage import UsageFlush
from controlplane.market import budgets, catalogue, ledger, offers, postings, quotes, reconcile, views
from controlplane.store.db import transaction, write
from controlplane.store.market import billing
from controlplane.store.market import ledger as ledger_store
from controlplane.store.market import records
from edge_agent import wire

if TYPE_CHECKING:
    from controlplane.core.lifecycle import Meter
    from controlplane.services.accounting import UsageAccounts
    from controlplane.services.sites import SiteService
    from controlplane.services.tenancy import TenancyService
    from controlplane.store.handle import Store
    from controlplane.services.training import JobRow, TrainingService

log = logging.getLogger("cpn.market")

REFRESH_S = 1.0
"""How stale the in-memory catalogue, budgets and tenant settings may be."""
QUOTE_FIELDS = ("quote_id", "quote_pool")
"""Fields of a job body that say which quote it is submitted against (not part of the priced job)."""


class MarketService:
    """The market for one hub (name ``market``). Build it with :func:`install`."""

    name = "market"

    def __init__(self, *, store: Store, tenancy: TenancyService, sites: SiteService,
                 accounting: UsageAccounts, clock: Clock, training: TrainingService,
                 fees: postings.Fees = postings.DEFAULT_FEES, policy: quotes.QuotePolicy = quotes.DEFAULT_POLICY) -> None:
        self.store = store
        self.tenancy = tenancy
        self.sites = sites
        self.accounting = accounting
        self.clock = clock
        self.training = training
        self.fees = fees
        self.policy = policy
        self._models: dict[str, catalogue.ModelRecord] = {}
        self._budgets: dict[str, budgets.Budget] = {}
        self._tenants: dict[str, billing.TenantSettings] = {}
        self._offers: list[offers.Offer] = []
        self._holds: dict[str, tuple[str, int]] = {}
        """Request id -> (tenant, fen): what admitted requests hold against their tenant's budget."""
        self._held: dict[str, int] = {}
        """Tenant -> the sum of its holds."""
        self._spent: dict[tuple[str, str], tuple[float, float, int]] = {}
        """(tenant, period) -> (start, end, fen): the ledger part of what the tenant spent in the
        period [start, end). Every ledger post of this process clears it, as does :meth:`refresh`
        (at most a second apart): the gate reads SQLite once per tenant per post, not per request."""
        self._job_held: dict[str, int] = {}
        """Tenant -> what its accepted, unfinished jobs hold (``budgets`` Rule 4), cleared with
        ``_spent`` (every post, every refresh, every submission checked here)."""
        self._loaded_at = -1e18
        self.counters = {"refused_filing": 0, "refused_budget": 0, "usage_lines": 0, "attempts_billed": 0,
                         "attempts_unpriced": 0}

    def __repr__(self) -> str:
        return f"<MarketService models={len(self._models)} budgets={len(self._budgets)} {self.counters}>"

    async def start(self) -> None:
        self.refresh()

    async def stop(self) -> None:
        return None

    @property
    def db(self) -> Any:
        return self.store.db

    def refresh(self) -> None:
        """Re-read the catalogue in force, the budgets and the tenants' settings."""
        now = self.clock.time()
        self._models = records.models(self.db, now)
        self._budgets = billing.budgets(self.db)
        self._tenants = billing.tenants(self.db)
        self._offers = records.list_offers(self.db)
        self._spent.clear()
        self._job_held.clear()
        self._loaded_at = self.clock.monotonic()

    def _fresh(self) -> None:
        if self.clock.monotonic() - self._loaded_at >= REFRESH_S:
            self.refresh()

    # ------------------------------------------------------------------ admin

    def _known_tenant(self, tenant: str) -> None:
        if self.tenancy.tenant(tenant) is None:
            raise NotFound(f"tenant {tenant!r} not found", field="tenant")

    async def put_model(self, model: catalogue.ModelRecord) -> dict[str, Any]:
        """Add a catalogue revision in force from now (400 naming the field if invalid)."""
        problem = catalogue.record_problem(model)
        if problem is not None:
            raise RequestError(f"model {model.id}: {problem}", field=_field_of(problem))
        self._known_tenant(model.owner)
        try:
            now = self.clock.time()
            revision = await write(self.db, lambda db: records.put_model(db, model, now), fenced=False)
        except ValueError as exc:
            raise Conflict(str(exc), field="model") from None
        self.refresh()
        return {**model_view(model), "revision": revision}

    def models(self) -> list[dict[str, Any]]:
        return [model_view(m) for m in records.models(self.db, self.clock.time()).values()]

    def pool_provider(self, pool: str) -> str:
        """The provider the operator declared for ``pool`` (layout or ``PUT /v1/sites``; "" = none,
        the operator's own); 400 naming ``pool`` if it is neither in the layout nor declared."""
        decl = self.sites.declarations.get(pool)
        if decl is not None:
            return decl.provider
        for site in self.sites.layout.sites:
            if site.id == pool:
                return site.provider
        raise RequestError(f"unknown pool {pool!r}: not a site of the layout or declared", field="pool")

    def _own_pool(self, pool: str, provider: str | None) -> None:
        """403 unless ``provider`` (a provider key's; None: an admin) is ``pool``'s declared provider."""
        if provider is not None and (self.pool_provider(pool) or self.fees.operator_provider) != provider:
            raise Forbidden(f"pool {pool} is not provider {provider}'s", field="pool")

    async def put_offer(self, offer: offers.Offer, *, by_provider: str | None = None) -> tuple[dict[str, Any], bool]:
        """Publish an offer (400 naming the field; 409 if its id is taken by other terms; 422
        ``provider`` if it is not the pool's declared provider; 403 for a provider key on another's
        pool or naming another provider); True if it is new."""
        problem = offers.offer_problem(offer)
        if problem is not None:
            raise RequestError(f"offer {offer.id}: {problem}", field=_field_of(problem))
        declared = self.pool_provider(offer.pool)
        if by_provider is not None and offer.provider != by_provider:
            raise Forbidden(f"a provider key publishes offers as itself ({by_provider}), not as {offer.provider}",
                            field="provider")
        self._own_pool(offer.pool, by_provider)
        problem = offers.provider_problem(offer, declared, self.fees.operator_provider)
        if problem is not None:
            raise Unprocessable(f"offer {offer.id}: {problem}", field="provider", code="offer_provider_mismatch")
        try:
            new = await write(self.db, lambda db: records.put_offer(db, offer), fenced=False)
        except ValueError as exc:
            raise Conflict(str(exc), field="id") from None
        return offer_view(offer), new

    def offers(self, *, pool: str | None = None, provider: str | None = None,
               by_provider: str | None = None) -> list[dict[str, Any]]:
        """Offers, past ones included (a provider key: only its own)."""
        if by_provider is not None:
            if provider is not None and provider != by_provider:
                raise Forbidden(f"a provider key lists only its own offers ({by_provider})", field="provider")
            provider = by_provider
        now = self.clock.time()
        return [{**offer_view(o), "in_force": offers.valid_at(o, now)}
                for o in records.list_offers(self.db, pool=pool, provider=provider)]

    async def withdraw_offer(self, offer_id: str, *, by_provider: str | None = None) -> dict[str, Any]:
        """End an offer now (404 unknown; 403 for a provider key on another provider's offer)."""
        if by_provider is not None:
            found = next((o for o in records.list_offers(self.db) if o.id == offer_id), None)
            if found is None:
                raise NotFound(f"offer {offer_id!r} not found", field="offer")
            if found.provider != by_provider:
                raise Forbidden(f"offer {offer_id} is not provider {by_provider}'s", field="offer")
        now = self.clock.time()
        ended = await write(self.db, lambda db: records.withdraw_offer(db, offer_id, now), fenced=False)
        if ended is None:
            raise NotFound(f"offer {offer_id!r} not found", field="offer")
        return offer_view(ended)

    async def put_budget(self, budget: budgets.Budget) -> dict[str, Any]:
        problem = budgets.budget_problem(budget)
        if problem is not None:
            raise RequestError(f"budget of {budget.tenant}: {problem}", field=_field_of(problem))
        self._known_tenant(budget.tenant)
        now = self.clock.time()
        await write(self.db, lambda db: records.put_budget(db, budget, now), fenced=False)
        self.refresh()
        return self.budget(budget.tenant)

    def budget(self, tenant: str) -> dict[str, Any]:
        """A tenant's budget and where it stands this period (404 without one)."""
        self._known_tenant(tenant)
        b = records.budget(self.db, tenant)
        if b is None:
            raise NotFound(f"tenant {tenant!r} has no budget", field="tenant")
        return {"tenant": tenant, "thresholds_pct": list(b.thresholds_pct), **self._standing(b)}

    def standing(self, tenant: str) -> dict[str, Any] | None:
        """The ``budget`` part of ``GET /v1/usage`` (None: the tenant has no budget)."""
        b = records.budget(self.db, tenant)
        return None if b is None else self._standing(b)

    def _standing(self, b: budgets.Budget) -> dict[str, Any]:
        now = self.clock.time()
        start, end = budgets.period_bounds(b.period, now)
        body = views.budget_standing_body(budgets.standing(b, self.spent_fen(b.tenant, b.period, now)), b.period)
        return {**body, "held_fen": self.held_fen(b.tenant), "jobs_held_fen": self.jobs_held_fen(b.tenant),
                "period_start": start, "period_end": end}

    async def put_tenant(self, tenant: str, *, public_facing: bool, filing_number: str = "") -> dict[str, Any]:
        """Mark a tenant public-facing or internal; ``filing_number`` is the tenant's own service
        filing, kept and shown (the model's filing is what the gateway checks)."""
        settings = billing.TenantSettings(tenant=tenant, public_facing=public_facing,
                                          filing_number=filing_number.strip())
        self._known_tenant(settings.tenant)
        now = self.clock.time()
        await write(self.db, lambda db: billing.put_tenant(db, settings, now), fenced=False)
        self.refresh()
        return msgspec.to_builtins(settings)  # type: ignore[no-any-return]

    def tenant(self, tenant: str) -> dict[str, Any]:
        self._known_tenant(tenant)
        s = billing.tenants(self.db).get(tenant) or billing.TenantSettings(tenant=tenant)
        return msgspec.to_builtins(s)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ inference

    def admit(self, req: wire.InferRequest, now: float) -> str | None:
        """May ``req.tenant`` send ``req``? The filing number to display, or None.

        Raises:
            Refused: 403 ``model_not_filed`` or 402 ``budget_exceeded``, with the figures.
        """
        if self.clock.monotonic() - self._loaded_at >= REFRESH_S:
            self.refresh()
        tenant = req.tenant
        model = self._models.get(req.model)
        settings = self._tenants.get(tenant)
        public = settings is not None and settings.public_facing
        if model is None:
            if public:
                self.counters["refused_filing"] += 1
                raise Refused(403, views.filing_refused_body(catalogue.Refused(
                    model=req.model, missing="public-service filing (the model is not in the catalogue)",
                    message=(f"model {req.model} may not serve a public-facing tenant: it is not in the catalogue, "
                             "so it has no filing for public service"))))
            return None
        verdict = catalogue.may_call(model, public_facing=public, now=now)
        if isinstance(verdict, catalogue.Refused):
            self.counters["refused_filing"] += 1
            raise Refused(403, views.filing_refused_body(verdict))
        budget = self._budgets.get(tenant)
        if budget is not None:
            incoming = catalogue.estimate_request_fen(model, prompt_bound(req), max(0, req.max_tokens))
            held = self._held.get(tenant, 0)
            decision = budgets.check(budget, self.spent_fen(tenant, budget.period, now), incoming,
                                     held + self.jobs_held_fen(tenant))
            if decision.verdict == "refuse":
                self.counters["refused_budget"] += 1
                raise Refused(402, views.budget_exceeded_body(decision, budget.period))
            if incoming and req.request_id not in self._holds:
                self._holds[req.request_id] = (tenant, incoming)
                self._held[tenant] = held + incoming
        return verdict.header

    def release(self, request_id: str) -> None:
        """The request ``request_id`` ended (served, failed or abandoned): drop its hold. Called by
        the gateway once the request's answer is done, when its usage (if any) is already counted
        in the tenant's spending (the usage buffer), so the two never both miss it."""
        if not self._holds:
            return
        hold = self._holds.pop(request_id, None)
        if hold is None:
            return
        tenant, fen = hold
        left = self._held.get(tenant, 0) - fen
        if left > 0:
            self._held[tenant] = left
        else:
            self._held.pop(tenant, None)

    def held_fen(self, tenant: str) -> int:
        """What ``tenant``'s requests in flight (at this process) and its unfinished jobs hold
        against its budget."""
        return self._held.get(tenant, 0) + self.jobs_held_fen(tenant)

    def jobs_held_fen(self, tenant: str) -> int:
        """What ``tenant``'s accepted, unfinished jobs still hold (``budgets`` Rule 4): each one's
        hold less what its attempts were charged so far (read from the record, cached until the
        next post or refresh)."""
        hit = self._job_held.get(tenant)
        if hit is not None:
            return hit
        ended = {s.value for s in lifecycle.TERMINAL}
        held = sum(budgets.job_hold_fen(hold, charged, False)
                   for _, hold, charged in billing.job_holds(self.db, tenant, ended))
        self._job_held[tenant] = held
        return held

    def spent_fen(self, tenant: str, period: budgets.Period, now: float) -> int:
        """What ``tenant`` spent this period: its ledger entries plus its usage not flushed yet,
        priced as the flush will price it."""
        hit = self._spent.get((tenant, period))
        if hit is not None and hit[0] <= now < hit[1]:
            spent = hit[2]
        else:
            start, end = budgets.period_bounds(period, now)
            spent = ledger_store.spent_fen(self.db, tenant, start, end)
            self._spent[(tenant, period)] = (start, end, spent)
        for row in self.accounting.pending(tenant):
            model = self._models.get(row.model)
            if model is not None:
                spent += catalogue.price_usage(model, row.prompt_tokens, row.completion_tokens)
        return spent

    def post_usage(self, usage: UsageFlush) -> None:
        """Keep and price one usage flush; runs inside the hub's flush transaction (raises to roll
        the whole flush back). Idempotent: a flush written again (its first outcome unknown) keys
        its lines and transactions by its own id and prices them at its own time, so what already
        landed is left as it is."""
        flush, now, rows = usage.id, usage.at, usage.rows
        lines: list[billing.UsageLine] = []
        txns: list[ledger.Transaction] = []
        for r in rows:
            if not (r.prompt_tokens or r.completion_tokens):
                continue
            model = records.model_at(self.db, r.model, now)
            lines.append(billing.UsageLine(flush=flush, tenant=r.tenant, model=r.model, site=r.site, at=now,
                                           prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                                           priced=model is not None))
            if model is not None:
                txns.append(postings.usage_transaction(flush, now, r.tenant, model, r.site, r.prompt_tokens,
                                                       r.completion_tokens))
        with transaction(self.db):
            billing.add_usage_lines(self.db, lines)
            for result in ledger_store.post_many(self.db, txns):
                if isinstance(result, ledger.Conflict):
                    raise RuntimeError(f"ledger conflict posting a usage flush: {result}")
            self._spent.clear()
            self._job_held.clear()
        self.counters["usage_lines"] += len(lines)

    # ------------------------------------------------------------------ training

    def bill_attempt(self, row: JobRow, meter: Meter) -> None:
        """Price one ended attempt at its pool's offer and post it; runs inside the transaction that
        ends the attempt. An attempt already billed, or one that did not run, posts nothing."""
        if not meter.end_at > meter.start_at:
            return
        db = self.db
        quote_id = row.spec.quote_id or ""
        offer = offers.select(records.list_offers(db, pool=meter.pool), meter.pool, meter.accelerator, meter.start_at)
        line = billing.AttemptLine(job=row.id, attempt=meter.attempt, tenant=row.tenant, pool=meter.pool,
                                   accelerator=meter.accelerator, cards=meter.cards, start_at=meter.start_at,
                                   end_at=meter.end_at, offer_id=offer.id if offer is not None else "",
                                   quote_id=quote_id)
        with transaction(db):
            if not billing.add_attempt_line(db, line):
                return
            if offer is None:
                self.counters["attempts_unpriced"] += 1
                log.info("event=attempt_unpriced job=%s attempt=%d pool=%s accelerator=%s", row.id, meter.attempt,
                         meter.pool, meter.accelerator)
                return
            priced = quotes.price_attempts([quotes.AttemptUsage(
                attempt=meter.attempt, pool=meter.pool, cards=meter.cards, start_at=meter.start_at,
                end_at=meter.end_at, offer=offer)])[0]
            cap = None
            option = self._quoted_option(row) if quote_id else None
            if option is not None:
                cap = quotes.cap_fen(option)
            so_far = billing.charged_fen(db, row.id, postings.tenant_account(row.tenant))
            share = quotes.attempt_charge(cap, so_far, priced.price_fen)
            ledger_store.post(db, postings.attempt_transaction(row.tenant, row.id, priced, share, quote_id=quote_id,
                                                               fees=self.fees))
            self._spent.clear()
            self._job_held.clear()
        self.counters["attempts_billed"] += 1

    def _quoted_option(self, row: JobRow) -> quotes.QuoteOption | None:
        spec = row.spec
        q = records.quote(self.db, str(spec.quote_id), row.tenant)
        if q is None:
            return None
        for o in q.options:
            if o.pool == spec.quote_pool and o.accelerator == spec.quote_accelerator:
                return o
        return None

    def job_charges(self, job_id: str) -> dict[str, Any]:
        """What a job cost and why: each attempt's ledger transaction."""
        txns = [t for t in ledger_store.load(self.db) if t.ref == job_id and t.kind == "training"]
        lines = billing.attempt_lines(self.db, job=job_id)
        charged = -sum(e.amount_fen for t in txns for e in t.entries if e.kind == "charge")
        return {"job": job_id, "charged_fen": charged, "attempts": [msgspec.to_builtins(x) for x in lines],
                "transactions": [msgspec.to_builtins(t) for t in txns]}

    def price_pools(self, pools: list[placement.Pool], now: float) -> list[placement.Pool]:
        """``pools`` with the offers in force now as their card-hour prices (CNY, by local hour):
        what the scheduler then minimises. Pools without an offer keep pricing by energy."""
        self._fresh()
        if not self._offers:
            return pools
        out = []
        for pool in pools:
            table = {}
            for acc in pool.cards_total:
                offer = offers.select(self._offers, pool.id, acc, now)
                if offer is not None:
                    table[acc] = tuple(fen / 100.0 for fen in offer.hours())
            out.append(msgspec.structs.replace(pool, card_hour_cny=table) if table else pool)
        return out

    # ------------------------------------------------------------------ quotes

    async def quote(self, tenant: str, spec: JobSpec, spec_hash: str, now: float) -> quotes.Quote:
        """Price ``spec`` on every pool now and keep the quote (``POST /v1/quotes``), written awaited
        (unfenced: a tenant's write; optimistic: it reads only its own new rows), so the loop goes on
        while the record's quorum acknowledges it (409/503 as for a submission)."""
        q = self._price(tenant, spec, now, quote_id="q-" + secrets.token_hex(8))

        def keep(db: Any) -> None:
            records.put_quote(db, q)
            billing.put_quote_spec(db, q.id, spec_hash)

        await write(self.db, keep, fenced=False, optimistic=True)
        return q

    def _price(self, tenant: str, spec: JobSpec, now: float, *, quote_id: str) -> quotes.Quote:
        job = job_spec(tenant, spec, now)
        pools = self.training.pools_now(now)
        return quotes.quote_job(job, pools, records.list_offers(self.db), now, quote_id=quote_id, policy=self.policy)

    def bind_quote(self, tenant: str, spec: JobSpec, spec_hash: str, now: float) -> JobSpec:
        """The spec to store for a submission against ``spec.quote_id``: pinned to the chosen
        option's pool and accelerator. A submission without a quote is checked against the tenant's
        budget at its cheapest option's maximum (if any pool can price it).

        Raises:
            NotFound: no such quote for this tenant. Conflict: the body is not the quoted job.
            Refused: the quote expired (410) or has no such option (409); the budget (402).
        """
        quote_id = spec.quote_id
        spec = msgspec.structs.replace(spec, budget_hold_fen=0)  # set here only, never from a body
        if quote_id is None:
            hold = self._check_budget(tenant, now, lambda: self._unquoted_hold(tenant, spec, now))
            return msgspec.structs.replace(spec, budget_hold_fen=hold.fen) if hold is not None else spec
        q = records.quote(self.db, quote_id, tenant)
        if q is None:
            raise NotFound(f"quote {quote_id!r} not found", field="quote_id")
        if billing.quote_spec(self.db, q.id) != spec_hash:
            raise Conflict(f"quote {q.id} priced another job: submit the same body you asked a quote for",
                           field="quote_id", code="quote_spec_mismatch")
        wanted = spec.quote_pool
        chosen = next((o for o in q.options if wanted is None or o.pool == wanted), None)
        verdict = quotes.accept(q, chosen.pool if chosen else str(wanted), chosen.accelerator if chosen else "",
                                tenant, now)
        if isinstance(verdict, quotes.QuoteRefused):
            raise Refused(views.quote_refused_status(verdict), views.quote_refused_body(verdict))
        hold = self._check_budget(tenant, now, lambda: budgets.training_hold(verdict.max_fen, ()))
        return msgspec.structs.replace(spec, quote_pool=verdict.pool, quote_accelerator=verdict.accelerator,
                                       pools=(verdict.pool,), accelerators=(verdict.accelerator,),
                                       budget_hold_fen=hold.fen if hold is not None else 0)

    def _unquoted_hold(self, tenant: str, spec: JobSpec, now: float) -> budgets.TrainingHold | None:
        q = self._price(tenant, spec, now, quote_id="budget-check")
        return budgets.training_hold(None, [o.max_fen for o in q.options])

    def _check_budget(self, tenant: str, now: float, incoming: Any) -> budgets.TrainingHold | None:
        """Refuse (402) a submission whose hold does not fit; the hold to keep with the job (None:
        the tenant has no budget, or nothing could price the job)."""
        b = records.budget(self.db, tenant)
        if b is None:
            return None
        hold: budgets.TrainingHold | None = incoming()
        if hold is None:
            return None
        decision = budgets.check(b, self.spent_fen(tenant, b.period, now), hold.fen, self.held_fen(tenant))
        if decision.verdict == "refuse":
            self.counters["refused_budget"] += 1
            body = views.budget_exceeded_body(decision, b.period)
            body["budget"]["incoming_basis"] = hold.basis
            raise Refused(402, body)
        self._job_held.pop(tenant, None)  # the job about to be stored holds this from now on
        return hold

    # ------------------------------------------------------------------ statements and checks

    def statement(self, account: str, start: float, end: float) -> ledger.Statement:
        return ledger_store.statement(self.db, account, start, end)

    def totals(self, start: float, end: float) -> dict[str, Any]:
        """What each tenant owes, each provider earns and the network kept over ``[start, end)``."""
        t = postings.party_totals(ledger_store.load(self.db, before=end), start, end)
        body: dict[str, Any] = msgspec.to_builtins(t)
        return {"object": "market.totals", "start": start, "end": end, **body,
                "imbalance_fen": ledger_store.imbalance(self.db)}

    def reconcile(self) -> reconcile.Reconciliation:
        """The ledger against every billed line × the prices in force when it was billed."""
        return reconcile.reconcile(ledger_store.load(self.db), billing.expected(self.db, self.fees))


# --------------------------------------------------------------------------- helpers


def prompt_bound(req: wire.InferRequest) -> int:
    """An upper bound on the prompt's tokens before it is tokenised: its size in UTF-8 bytes."""
    n = len(req.prompt.encode())
    for m in req.messages or ():
        n += len(m.content.encode())
    return n


def job_spec(tenant: str, spec: JobSpec, now: float) -> placement.JobSpec:
    """The scheduler's view of a job body about to be quoted (as ``training`` builds it when queued)."""
    return spec.waiting(id="quote", tenant=tenant, priority=spec.priority, submitted_at=now, progress=0.0,
                        checkpoint_pool="", restarting=False)


def model_view(m: catalogue.ModelRecord) -> dict[str, Any]:
    body: dict[str, Any] = msgspec.to_builtins(m)
    body["object"] = "market.model"
    return body


def offer_view(o: offers.Offer) -> dict[str, Any]:
    body: dict[str, Any] = msgspec.to_builtins(o)
    body["object"] = "market.offer"
    return body


def _field_of(problem: str) -> str:
    """The field a ``*_problem`` sentence names first (its first word, before any bracket or dot)."""
    word = problem.split(" ", 1)[0]
    return word if word and word[0].isalpha() else ""


def install(service: MarketService, accounting: UsageAccounts, training: TrainingService) -> MarketService:
    """Plug ``service`` into the usage flush of ``accounting`` and the metering of ``training`` (the
    composition root adds it to the process and its routes, ``gateway/market.py``)."""
    accounting.usage_listeners.append(service.post_usage)
    training.billing = service.bill_attempt
    training.pricing = service.price_pools
    return service


__all__ = ["MarketService", "QUOTE_FIELDS", "install"]
