"""Time-to-first-token prediction and admission by SLO. Pure.

What it holds: a per-accelerator prefill profile (:class:`Profile`), what the hub knows of one
candidate site for one request (:class:`Candidate`: path RTT and the site's heartbeat figures),
the prediction (:class:`Prediction`), and the admission decision (:func:`admit`): the candidate
with the best prediction, or a refusal with a ``Retry-After`` when none meets the SLO.

Rule 1: predicted TTFT = RTT on the full path + expected queue wait + prefill time.
Rule 2: queue wait: a free slot (busy < slots, nothing queued) waits 0; otherwise the request is
``k = queue_depth + busy − slots + 1`` places behind the slots' current work, and ``slots``
requests leave per measured service time, so it waits ``k / slots × service_ms``.
Rule 3: prefill = ``base_ms + prompt_tokens / prefill_tokens_per_s``, from the accelerator's
profile; :func:`calibrate` moves a profile towards what sites report (exponentially weighted).
Rule 4: refusal is data (:class:`Refuse`, with the best prediction and the seconds after which it
would have met the SLO), never an exception; the caller answers 429 at once rather than serve late.

Rule 5: what the predictor knows of a site is :func:`candidate` of the hub's ``SiteView`` (the
heartbeat's replica, queue depth and service-time p50; the busy slots are the larger of the
heartbeat's and the requests the hub has in flight there). The queue's service time is the model's
own mean at that site when the hub has measured it from the site's answers (:func:`service_update`):
the heartbeat's p50 is over every model the site serves, and a p50 is below the mean of the
long-tailed service times of generation, so it predicts queues too short.

Wired into the live gateway (``X-CPN-SLO-TTFT-Ms``, ``services/inference.py``) and into ``cpn sim``
(``tools/sim/core_inference.py``: the same :func:`candidate` and :func:`admit` over the simulated
sites' views; docs/sim.md, "Admission by predicted time to first token"). A prediction that is not
finite (a full site whose service time is not measured yet) never meets an SLO and asks for a retry
after 1 s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import msgspec

from controlplane.core.registry import SiteView

CALIBRATE_MIN_TOKENS = 256
"""A measured prefill calibrates a profile only for prompts this long: shorter ones are mostly
fixed overhead, which would read as a slow prefill rate."""
REFUSAL_KINDS = ("queue", "prefill", "unmeasured", "no_candidate")
SERVICE_WEIGHT = 0.05
"""Weight of the newest answer in a (site, model) mean service time (:func:`service_update`)."""


class Profile(msgspec.Struct, frozen=True, kw_only=True):
    accelerator: str
    prefill_tokens_per_s: float = 5000.0
    """Illustrative default (a 7B model on an A800-class card); calibrated from reports."""
    base_ms: float = 15.0


class Candidate(msgspec.Struct, frozen=True, kw_only=True):
    site: str
    rtt_ms: float
    accelerator: str
    slots: int
    busy: int = 0
    queue_depth: int = 0
    service_ms: float = 0.0
    """Measured mean service time per request at the site (heartbeat)."""


class Prediction(msgspec.Struct, frozen=True):
    site: str
    ttft_ms: float
    rtt_ms: float
    queue_ms: float
    prefill_ms: float


class Admit(msgspec.Struct, frozen=True):
    prediction: Prediction


class Refuse(msgspec.Struct, frozen=True):
    reason: str
    retry_after_s: float
    best: Prediction | None = None


def queue_ms(c: Candidate) -> float:
    """Expected wait for a slot (Rule 2)."""
    if c.slots <= 0:
        return math.inf
    ahead = c.queue_depth + c.busy - c.slots + 1
    if ahead <= 0:
        return 0.0
    return ahead / c.slots * c.service_ms


def predict(c: Candidate, prompt_tokens: int, profile: Profile) -> Prediction:
    """Rule 1 for one candidate."""
    prefill = profile.base_ms + 1000.0 * prompt_tokens / profile.prefill_tokens_per_s
    q = queue_ms(c)
    return Prediction(c.site, c.rtt_ms + q + prefill, c.rtt_ms, q, prefill)


def admit(candidates: Sequence[Candidate], prompt_tokens: int, slo_ms: float,
          profiles: Mapping[str, Profile]) -> Admit | Refuse:
    """The candidate with the lowest predicted TTFT if it meets ``slo_ms``, else a refusal.

    Candidates are the router's, already within the request's RTT budget; ties go to the
    earlier (nearer) candidate.
    """
    best: Prediction | None = None
    for c in candidates:
        p = predict(c, prompt_tokens, profiles.get(c.accelerator) or Profile(accelerator=c.accelerator))
        if best is None or p.ttft_ms < best.ttft_ms:
            best = p
    if best is None:
        return Refuse("no candidate site within budget", 1.0)
    if best.ttft_ms <= slo_ms:
        return Admit(best)
    late_ms = best.ttft_ms - slo_ms
    retry_s = max(1.0, math.ceil(late_ms / 1000.0)) if math.isfinite(late_ms) else 1.0
    return Refuse(f"predicted time to first token {best.ttft_ms:.0f} ms at best ({best.site}: rtt "
                  f"{best.rtt_ms:.1f} + queue {best.queue_ms:.0f} + prefill {best.prefill_ms:.0f}) exceeds the SLO "
                  f"of {slo_ms:.0f} ms", retry_s, best)


def candidate(view: SiteView, model: str, rtt_ms: float, service_ms: float = 0.0) -> Candidate | None:
    """What the predictor needs of one site for ``model`` (None: no ready replica there).

    ``service_ms``: the model's mean service time at the site as measured from its answers
    (:func:`service_update`); 0 (not measured): the heartbeat's p50 over all its models stands in.
    Busy slots are the larger of the heartbeat's and the requests this hub has in flight there
    (fresher); a full site whose service time is not measured yet has an unknown (infinite) wait.
    The accelerator is the replica's (:func:`accelerator_of`)."""
    rep = view.replicas.get(model)
    if rep is None or rep.state != "ready":
        return None
    busy = max(rep.busy, view.sent)
    if service_ms <= 0:
        service_ms = view.service_ms_p50
    if service_ms <= 0 and (busy >= rep.slots or view.queue_depth > 0):
        service_ms = math.inf
    return Candidate(site=view.id, rtt_ms=rtt_ms, accelerator=accelerator_of(view, model),
                     slots=rep.slots, busy=busy, queue_depth=view.queue_depth, service_ms=service_ms)


def accelerator_of(view: SiteView, model: str) -> str:
    """The card type ``model``'s replica at the site runs on, as its heartbeat says, believed only
    among the types the site holds within its declaration (a site claiming a faster card than it
    has would be predicted faster and drawn traffic); from agents that do not say
    (``ReplicaStatus.accelerator`` empty) or claim another type, the site's first type by name."""
    rep = view.replicas.get(model)
    claimed = rep.accelerator if rep is not None else ""
    return claimed if claimed in view.accelerators else min(view.accelerators, default="")


def service_update(mean_ms: float, sample_ms: float, weight: float = SERVICE_WEIGHT) -> float:
    """A (site, model) mean service time moved by one answer's ``sample_ms`` (exponentially
    weighted; ``mean_ms`` 0: the first answer). A sample that is not a finite non-negative time
    (a site's report) changes nothing."""
    if not (sample_ms >= 0 and math.isfinite(sample_ms)):
        return mean_ms
    return sample_ms if mean_ms <= 0 else mean_ms + weight * (sample_ms - mean_ms)


def refusal_kind(refusal: Refuse, slo_ms: float) -> str:
    """Why a request was refused, one of :data:`REFUSAL_KINDS`: ``no_candidate`` (no site within
    budget), ``unmeasured`` (the best site is full and its service time unknown), ``prefill`` (the
    best site would be late even with a free slot: RTT + prefill exceed the SLO), ``queue`` (its
    expected queue wait makes it late)."""
    best = refusal.best
    if best is None:
        return "no_candidate"
    if not math.isfinite(best.ttft_ms):
        return "unmeasured"
    if best.rtt_ms + best.prefill_ms > slo_ms:
        return "prefill"
    return "queue"


def calibrate(profile: Profile, prompt_tokens: int, prefill_ms: float, weight: float = 0.1) -> Profile:
    """Move ``profile``'s prefill rate towards one measured prefill (a site's report)."""
    work_ms = prefill_ms - profile.base_ms
    if prompt_tokens <= 0 or work_ms <= 0:
        return profile
    rate = 1000.0 * prompt_tokens / work_ms
    return msgspec.structs.replace(profile, prefill_tokens_per_s=profile.prefill_tokens_per_s
                                   + weight * (rate - profile.prefill_tokens_per_s))
