"""The scenario schema of ``cpn sim``: what load, faults and policies a run simulates. Pure.

A scenario is a TOML document (``controlplane/scenarios/*.toml``, documented in docs/sim.md)
decoded by :func:`decode` into frozen Structs that reject unknown keys. :func:`decode` raises
:class:`ScenarioError` whose message names the offending field (``inference.models[1].share``),
so an operator's typo is a clear error, never a silently ignored key.

Promises: a :class:`Scenario` that exists is usable — shares are positive, profiles have 24 hourly
values, hours are within a day, every model can be served in some time (ttft/per-token ≥ 0).
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from controlplane.core.overhead import FLOOR_MS

Pos = Annotated[float, msgspec.Meta(gt=0)]
NonNeg = Annotated[float, msgspec.Meta(ge=0)]
Hour = Annotated[float, msgspec.Meta(ge=0, le=24)]
Profile = Annotated[list[NonNeg], msgspec.Meta(min_length=24, max_length=24)]

# A weekday-like tidal curve (relative demand by China local hour): low before dawn, a morning and an
# evening peak. Illustrative shape, in the spirit of published diurnal traffic curves of carriers.
TIDAL_PROFILE = [0.35, 0.25, 0.18, 0.14, 0.12, 0.14, 0.25, 0.5, 0.8, 1.0, 1.05, 1.0,
                 0.9, 0.9, 0.95, 1.0, 1.0, 0.95, 0.95, 1.05, 1.15, 1.2, 1.0, 0.65]
FLAT_PROFILE = [1.0] * 24

DEFAULT_START = "2026-11-23T00:00:00+08:00"


class _Cfg(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of the scenario sections: frozen, keyword-only, unknown keys rejected."""


class Model(_Cfg, frozen=True):
    """One inference model, deployed as one deployment covering every origin."""

    name: str
    share: Pos = 1.0
    """Share of requests (relative)."""
    cards_per_replica: Pos = 1.0
    slots_per_replica: Annotated[int, msgspec.Meta(ge=1)] = 4
    min_cities: Annotated[int, msgspec.Meta(ge=1)] = 2
    deploy_budget_ms: Pos = 10.0
    """The deployment's coverage budget (replicas.plan_replicas)."""
    replicas: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """A floor on the replica count beyond coverage: today's fixed deployment (policy ``cpn-fixed``,
    the baselines, and the replicas ``cpn`` starts the day with)."""
    min_replicas: Annotated[int, msgspec.Meta(ge=0)] = 0
    """With ``max_replicas``: ``cpn`` never scales below coverage plus this floor."""
    max_replicas: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """Set: policy ``cpn`` scales this model's replicas (``autoscale.decide``) up to this many."""
    max_replicas_per_site: Annotated[int, msgspec.Meta(ge=1)] = 1
    """Replicas of the model one site may hold when ``cpn`` scales (served as one larger replica)."""
    load_s: NonNeg = 120.0
    """Time from a scale-out decision to the replica being ready (weights loaded)."""
    accelerators: list[str] | None = None
    ttft_ms: NonNeg = 30.0
    """Service model of the ``sim`` backend: time to first token ..."""
    per_token_ms: NonNeg = 5.0
    """... plus this per generated token."""
    mean_tokens: Pos = 200.0
    """Generated tokens per request: exponential with this mean, at least 1."""
    prompt_tokens_mean: Pos = 512.0
    """Requests with a TTFT SLO: prompt tokens, exponential with this mean, at least 1. Their
    backend prefill (first token after the queue) is ``ttft_ms × prompt ÷ prompt_tokens_mean ÷
    units`` of the replica's accelerator (``ttft_ms`` for a mean prompt on an A800-equivalent card)."""


class Inference(_Cfg, frozen=True):
    requests: NonNeg = 1_200_000
    """Expected requests over ``hours`` (a non-homogeneous Poisson process)."""
    profile: Profile = msgspec.field(default_factory=lambda: list(TIDAL_PROFILE))
    budgets_ms: list[Pos] = msgspec.field(default_factory=lambda: [5.0, 10.0])
    budget_shares: list[Pos] = msgspec.field(default_factory=lambda: [0.3, 0.7])
    policy: str = "strict"
    """Router policy: ``strict`` (nothing beyond the budget) or ``nearest`` (best effort)."""
    window: Annotated[int, msgspec.Meta(ge=1)] = 3
    autoscale_s: Pos = 60.0
    """How often ``cpn`` takes a scaling decision per autoscaled model."""
    models: list[Model] = msgspec.field(default_factory=lambda: [Model(name="qwen2.5-7b")])
    baselines: bool = True
    """Run the random and round-robin routers over the same request stream."""
    ingress: bool = False
    """Also route the same requests entering at gateways: policies ``cpn@central``, ``cpn@region``
    and ``cpn@province`` (the fixed replicas; each origin at its nearest gateway of the set; RTT and
    budget on the full path origin -> gateway -> site). ``cpn`` itself is the direct path: a
    gateway in every city."""
    slo_share: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    """Share of requests carrying a time-to-first-token SLO (``X-CPN-SLO-TTFT-Ms``): cpn admits them
    by ``ttft.admit`` (or refuses them, a 429) and they may wait in a site's queue. 0: none (the
    request stream and every figure are then as without this field)."""
    slo_ttft_ms: Pos = 1000.0
    """The SLO those requests carry."""
    overhead_ms: NonNeg = FLOOR_MS
    """cpn's own time (gateway, NATS, agent) charged on every request, for every policy and the
    bound: a request is within budget when RTT + this is, as a live gateway budgets RTT + its
    measured overhead (``core.overhead``; 1.0 is its floor before any measurement). 0: the network alone."""


class SizeBin(_Cfg, frozen=True):
    cards: Annotated[list[int], msgspec.Meta(min_length=2, max_length=2)]
    """[min, max] cards, drawn log-uniformly, rounded to a multiple of 8 above 8."""
    share: Pos


class AccelChoice(_Cfg, frozen=True):
    accelerators: Annotated[list[str], msgspec.Meta(min_length=1)]
    share: Pos
    sizes: list[SizeBin] | None = None
    """Sizes of the jobs of this choice instead of ``training.sizes`` (e.g. small fine-tuning jobs)."""


class Training(_Cfg, frozen=True):
    jobs: NonNeg = 2200
    """Expected job arrivals over ``hours``."""
    profile: Profile = msgspec.field(default_factory=lambda: list(FLAT_PROFILE))
    sizes: list[SizeBin] = msgspec.field(default_factory=lambda: [
        SizeBin(cards=[1, 8], share=0.45), SizeBin(cards=[16, 128], share=0.4),
        SizeBin(cards=[256, 1024], share=0.13), SizeBin(cards=[2048, 4096], share=0.02),
    ])
    hours: Annotated[list[Pos], msgspec.Meta(min_length=2, max_length=2)] = msgspec.field(default_factory=lambda: [0.5, 24.0])
    """[min, max] of est_hours (A800-equivalent run time), log-uniform."""
    accelerators: list[AccelChoice] = msgspec.field(default_factory=lambda: [
        AccelChoice(accelerators=["A800", "910B"], share=0.5), AccelChoice(accelerators=["910B"], share=0.3),
        AccelChoice(accelerators=["A800"], share=0.1), AccelChoice(accelerators=["H800"], share=0.1),
    ])
    priorities: list[Annotated[list[float], msgspec.Meta(min_length=2, max_length=2)]] = msgspec.field(
        default_factory=lambda: [[0, 0.7], [1, 0.25], [2, 0.05]])
    """[priority, share] pairs."""
    deadline_share: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.5
    """Share of jobs with a deadline (they may wait for a cheaper tariff window)."""
    deadline_slack: Annotated[list[Pos], msgspec.Meta(min_length=2, max_length=2)] = msgspec.field(
        default_factory=lambda: [1.5, 3.0])
    """Deadline = submit + est_hours × uniform(slack) (+ 1 h)."""
    checkpoint_cost_s: NonNeg = 300.0
    tenants: Annotated[int, msgspec.Meta(ge=1)] = 8
    tiers: list[str] = msgspec.field(default_factory=lambda: ["hub", "regional"])
    """Site tiers whose cards take training jobs."""
    tick_s: Pos = 60.0
    """Scheduler ticks at most this often (and only when something changed or a wait ends)."""
    failure_rate_scale: NonNeg = 1.0
    """Multiplies every pool's failure_rate_per_card_hour (0 turns card failures off)."""
    baselines: bool = True
    min_wait_saving_pct: Annotated[float, msgspec.Meta(ge=0, le=100)] = 20.0
    """cpn's tariff-wait threshold (the hub's ``training_min_wait_saving_pct``): a job waits for a
    cheaper window only if that saves at least this percentage against starting now."""
    cost_first_share: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    """Share of jobs that ask ``prefer = "cost"`` (wait for a cheaper window even without a deadline)."""


class Outage(_Cfg, frozen=True):
    at_hour: NonNeg
    """Hours after the start of the run."""
    sites: list[str] = []
    city: str = ""
    tiers: list[str] = []
    """With ``city``: lose that city's sites of these tiers (empty: every tier)."""
    duration_h: Pos = 1.0


class Faults(_Cfg, frozen=True):
    outages: list[Outage] = []
    random_outages: NonNeg = 0.0
    """Expected extra outages of random sites over the run (site chosen uniformly)."""
    random_outage_h: Pos = 1.0
    """Mean duration of a random outage (exponential)."""
    detection_s: NonNeg = 3.0
    """Silence before the hub declares a site lost (heartbeat_s × miss_limit, DESIGN §10)."""


class Lending(_Cfg, frozen=True):
    """Tidal lending as cpn's scheduler rule (``core/lending.py``): idle inference cards of
    ``tiers`` are offered to training until a reclaim time before the forecast ramp, and lent
    attempts checkpoint and stop before it."""

    enabled: bool = False
    tiers: list[str] = msgspec.field(default_factory=lambda: ["edge"])
    tick_s: Pos = 300.0
    """How often offers and reclaims are decided (and at each reclaim falling due)."""
    margin_s: NonNeg = 900.0
    """Reclaim this long before the hour whose forecast need exceeds what inference keeps."""
    min_lend_s: Pos = 3600.0
    """No offer shorter than this."""
    peak_need_share: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    """The forecast: at the peak hour of ``inference.profile`` inference may need this share of a
    site's cards, other hours in proportion."""
    headroom: Annotated[float, msgspec.Meta(ge=1)] = 1.5
    """... and never less than what its replicas hold now, grown along the profile, times this."""
    profile: Profile | None = None
    """The declared profile the forecast starts from (the hub's ``[lending] profile``); default
    ``inference.profile``, the demand the run really has. Set it apart to see a wrong declaration
    corrected by learning over a multi-day run."""
    inference_first: list[str] = []
    """Accelerator types inference keeps first (``lending.Rules.inference_first``, Rule 6): a site's
    forecast is met by its cards of these types before its others, and they are never lent."""
    forecast: str = "learnt"
    """``learnt``: each site's forecast profile is its region's requests by local hour as observed
    so far (``demand_hours``, exponentially weighted over days), ``inference.profile`` the prior for
    hours not observed yet; ``declared``: ``inference.profile`` alone."""


class Market(_Cfg, frozen=True):
    """Prices in the simulation (docs/market.md): each pool's owner (the site's ``provider``) offers
    its cards at their energy cost per card-hour, hour by hour (tariff × PUE × board power), plus a
    markup; the operator takes a commission on third-party pools."""

    markup_pct: NonNeg = 30.0
    commission_bp: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 1000
    operator_provider: str = "cpn-operator"
    """The provider id of the operator's own sites (they earn into ``operator:pools``)."""


class Scenario(_Cfg, frozen=True):
    name: str
    description: str = ""
    hours: Pos = 24.0
    start: str = DEFAULT_START
    """ISO 8601 with offset; tariff hours are China local time."""
    sample_s: Pos = 60.0
    """Utilisation is sampled this often."""
    inference: Inference = Inference()
    training: Training = Training()
    faults: Faults = Faults()
    lending: Lending = Lending()
    market: Market = Market()


class ScenarioError(ValueError):
    """A scenario that cannot be used; the message names the field."""


def _check(s: Scenario) -> None:
    inf = s.inference
    if len(inf.budgets_ms) != len(inf.budget_shares):
        raise ScenarioError("inference.budget_shares: need one share per entry of budgets_ms")
    if inf.policy not in ("strict", "nearest"):
        raise ScenarioError(f"inference.policy: want 'strict' or 'nearest', got {inf.policy!r}")
    if inf.requests > 0 and not inf.models:
        raise ScenarioError("inference.models: at least one model when requests > 0")
    if inf.requests > 0 and sum(inf.profile) <= 0:
        raise ScenarioError("inference.profile: all zero")
    for i, m in enumerate(inf.models):
        if m.max_replicas is not None and m.max_replicas < m.min_replicas:
            raise ScenarioError(f"inference.models[{i}].max_replicas: below min_replicas ({m.min_replicas})")
    names = [m.name for m in inf.models]
    if len(set(names)) != len(names):
        raise ScenarioError("inference.models: model names must be unique")
    tr = s.training
    for i, b in enumerate(tr.sizes):
        if not 1 <= b.cards[0] <= b.cards[1]:
            raise ScenarioError(f"training.sizes[{i}].cards: want 1 <= min <= max, got {b.cards}")
    for i, a in enumerate(tr.accelerators):
        for k, b in enumerate(a.sizes or ()):
            if not 1 <= b.cards[0] <= b.cards[1]:
                raise ScenarioError(f"training.accelerators[{i}].sizes[{k}].cards: want 1 <= min <= max, got {b.cards}")
        if a.sizes is not None and not a.sizes:
            raise ScenarioError(f"training.accelerators[{i}].sizes: empty (leave it out to use training.sizes)")
    if tr.hours[0] > tr.hours[1]:
        raise ScenarioError(f"training.hours: want min <= max, got {tr.hours}")
    if tr.deadline_slack[0] > tr.deadline_slack[1] or tr.deadline_slack[0] < 1.0:
        raise ScenarioError(f"training.deadline_slack: want 1 <= min <= max, got {tr.deadline_slack}")
    if tr.jobs > 0 and not (tr.sizes and tr.accelerators and tr.priorities):
        raise ScenarioError("training: sizes, accelerators and priorities must not be empty when jobs > 0")
    if tr.jobs > 0 and sum(tr.profile) <= 0:
        raise ScenarioError("training.profile: all zero")
    for i, p in enumerate(tr.priorities):
        if p[1] <= 0:
            raise ScenarioError(f"training.priorities[{i}]: share must be > 0")
    if s.lending.forecast not in ("learnt", "declared"):
        raise ScenarioError(f"lending.forecast: want 'learnt' or 'declared', got {s.lending.forecast!r}")
    for i, o in enumerate(s.faults.outages):
        if not o.sites and not o.city:
            raise ScenarioError(f"faults.outages[{i}]: give sites or city")
    start_epoch_s(s.start)


def start_epoch_s(start: str) -> float:
    """Epoch seconds of an ISO 8601 timestamp with an offset (``2026-11-23T00:00:00+08:00``).

    Raises:
        ScenarioError: not such a timestamp (field ``start``).
    """
    import datetime as _dt  # stdlib date parsing only; no clock is read

    try:
        when = _dt.datetime.fromisoformat(start)
    except ValueError:
        raise ScenarioError(f"start: not an ISO 8601 timestamp: {start!r}") from None
    if when.tzinfo is None:
        raise ScenarioError(f"start: give a UTC offset (e.g. +08:00): {start!r}")
    return when.timestamp()


def decode(text: str | bytes, source: str = "<scenario>") -> Scenario:
    """Decode and check a scenario TOML document.

    Raises:
        ScenarioError: invalid TOML, an unknown key, a wrong type or an unusable value; the
            message starts with ``source`` and names the field.
    """
    try:
        scenario = msgspec.toml.decode(text, type=Scenario)
    except msgspec.ValidationError as exc:
        raise ScenarioError(f"{source}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ScenarioError(f"{source}: not valid TOML: {exc}") from None
    try:
        _check(scenario)
    except ScenarioError as exc:
        raise ScenarioError(f"{source}: {exc}") from None
    return scenario


def with_hours(s: Scenario, hours: float) -> Scenario:
    """The scenario over ``hours`` instead, with expected requests and jobs scaled to match."""
    if hours == s.hours:
        return s
    k = hours / s.hours
    return msgspec.structs.replace(
        s, hours=hours,
        inference=msgspec.structs.replace(s.inference, requests=s.inference.requests * k),
        training=msgspec.structs.replace(s.training, jobs=s.training.jobs * k),
    )
