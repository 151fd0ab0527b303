"""The hub's state as Prometheus families, read when ``/metrics`` is scraped (never on a hot path).

From the site registry (soft state): sites up/draining per site, free and busy cards by site and
accelerator, queue depth and in-flight requests per site, replicas by model and state. From the
record (controlplane/store/stats.py): jobs by state, the oldest queued job's wait, card-seconds of training,
deployments by state, planned replicas by state. From the bus: NATS errors, malformed messages and
permission violations as counters. And the process itself: ``cpn_hub_info`` (id, role),
``cpn_leader`` and ``cpn_ready``.

Promise: a failing read (a record that is closed or not SQLite) drops that group of families from
this scrape and is counted in ``cpn_scrape_errors_total``; it never fails the scrape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controlplane.store import stats as store_stats
from controlplane.store.replica import Replica, ReplicatedDatabase

if TYPE_CHECKING:
    from controlplane.config import HubConfig
    from controlplane.core.clock import Clock
    from controlplane.core.registry import SiteRegistry
    from controlplane.metrics import HubMetrics
    from controlplane.nats.bus import HubBus
    from controlplane.readiness import Readiness
    from controlplane.services.inference import InferenceService
    from controlplane.store.handle import Store

log = logging.getLogger("cpn.metrics")

NATS_ERROR_KINDS = (
    ("connection", "errors"), ("timeout", "timeouts"), ("ack_timeout", "ack_timeouts"),
    ("no_responders", "no_responders"), ("disconnect", "disconnects"), ("resent", "resent"),
)
"""(label, BusStats attribute) pairs exported as ``cpn_nats_errors_total{kind=...}``."""


class _NoElection:
    early_takeovers = rode_out = terms = reconnects = 0
    losses: dict[str, int] = {}


_NO_ELECTION = _NoElection()

QUORUM_HELP = "0 while writes to the replicated record are being refused (no quorum)"


class LeadershipState(Collector):
    """The controller election as seen by this process (``services/leadership.py``, the elector of
    ``replicated/lease.py``), read at scrape time; on a process that does not campaign
    (a single hub on SQLite, a gateway) they stay 0. Counters since this process started:

    - ``cpn_leader_early_takeovers_total``: leads taken before the holder's lease ran out, because
      the holder was silent for ``holder_silent_s`` (died, froze or lost NATS);
    - ``cpn_leader_rideouts_total``: renewals that landed only after ``holder_silent_s`` (a stream
      election of the record, a stalled loop): the leader held its commands back, then went on;
    - ``cpn_leadership_changes_total{change, reason}``: ``acquired`` (``early`` or ``vacant``: no
      live holder, a released or expired lease) and ``lost`` (``deadline``: no renewal landed by
      the renew deadline; ``taken``: another process holds it; ``released``/``stopped``: on stop);
    - ``cpn_leader_renewals_resent_total``: renewals sent again through another NATS server after
      the first went unanswered and its server did not answer a ping (a paused node).
    """

    def __init__(self, elector: Callable[[], Any]) -> None:
        self.elector = elector

    def collect(self) -> Iterator[Metric]:
        e = self.elector()
        if e is None:  # never campaigned (a single hub, a gateway): nothing happened, all 0
            e = _NO_ELECTION
        yield CounterMetricFamily("cpn_leader_early_takeovers", "Leads this process took before the holder's lease ran "
                                  "out (the holder was silent)", value=e.early_takeovers)
        yield CounterMetricFamily("cpn_leader_rideouts", "Renewals that landed only after holder_silent_s: commands held "
                                  "back, then decided again", value=e.rode_out)
        changes = CounterMetricFamily("cpn_leadership_changes", "This process's leadership changes, by change and reason",
                                      labels=["change", "reason"])
        changes.add_metric(["acquired", "early"], e.early_takeovers)
        changes.add_metric(["acquired", "vacant"], e.terms - e.early_takeovers)
        for reason in ("deadline", "taken", "released", "stopped", "other"):
            changes.add_metric(["lost", reason], e.losses.get(reason, 0))
        yield changes
        yield CounterMetricFamily("cpn_leader_renewals_resent", "Lease renewals sent again through another NATS server "
                                  "(the first one's did not answer)", value=e.reconnects)


class HubState(Collector):
    """Collects one hub's state at scrape time (see the module docstring), from the parts it is built with.

    Args:
        permission_violations: the count of NATS permission violations seen so far (``cpn up`` watches
            the server's log).
        role / is_leader: what this process is (a single hub: ``hub``, always leading).
    """

    def __init__(self, *, config: HubConfig, bus: HubBus, registry: SiteRegistry, store: Store, readiness: Readiness,
                 inference: InferenceService, clock: Clock, permission_violations: Callable[[], int] = lambda: 0,
                 role: str = "hub", is_leader: Callable[[], bool] = lambda: True) -> None:
        self.config = config
        self.bus = bus
        self.registry = registry
        self.store = store
        self.readiness = readiness
        self.inference = inference
        self.clock = clock
        self.permission_violations = permission_violations
        self.role = role
        self.is_leader = is_leader
        self.errors = 0

    def __repr__(self) -> str:
        return f"<HubState scrape_errors={self.errors}>"

    def collect(self) -> Iterator[Metric]:
        yield from self._process()
        yield from self._bus()
        yield from self._sites()
        if self.store.is_open:
            try:
                families = list(self._record())
            except Exception as exc:  # a closed or different record: skip this group, keep the scrape
                self.errors += 1
                log.debug("event=scrape_record_failed error=%r", exc)
            else:
                yield from families
        if self.store.is_open and isinstance(self.store.db, ReplicatedDatabase) and self.store.db.write_hook is not None:
            yield from self._replicated(self.store.db.write_hook)
        else:  # SQLite alone refuses no write for want of a quorum (the alert's family exists everywhere)
            yield GaugeMetricFamily("cpn_record_quorum", QUORUM_HELP, value=1)
        yield CounterMetricFamily("cpn_scrape_errors", "Groups of hub-state metrics that could not be read at a scrape",
                                  value=self.errors)

    def _process(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("cpn_hub_info", "This process: hub id and role (hub = gateway and controller)",
                                 labels=["hub", "role"])
        info.add_metric([self.config.hub_id, self.role], 1)
        yield info
        yield GaugeMetricFamily("cpn_leader", "1 when this process leads the controllers (a single hub always does)",
                                value=1 if self.is_leader() else 0)
        yield GaugeMetricFamily("cpn_ready", "1 when /readyz answers 200", value=1 if self.readiness.ready() else 0)

    def _bus(self) -> Iterator[Metric]:
        s = self.bus.stats
        errors = CounterMetricFamily("cpn_nats_errors", "NATS errors seen by the hub, by kind", labels=["kind"])
        for label, attr in NATS_ERROR_KINDS:
            errors.add_metric([label], getattr(s, attr, 0))
        yield errors
        malformed = CounterMetricFamily("cpn_malformed_messages", "Malformed messages from agents, dropped, by kind",
                                        labels=["kind"])
        for kind, n in sorted(s.by_kind.items()):
            malformed.add_metric([kind], n)
        if not s.by_kind:
            malformed.add_metric(["none"], 0)
        yield malformed
        dropped = CounterMetricFamily("cpn_nats_dropped_messages",
                                      "Messages from sites dropped before decoding, by kind and reason (rate, oversize, reply_spoof)",
                                      labels=["kind", "reason"])
        for (kind, reason), n in sorted(getattr(s, "dropped", {}).items()):
            dropped.add_metric([kind, reason], n)
        yield dropped
        yield CounterMetricFamily("cpn_nats_permission_violations", "Permission violations reported by the NATS server "
                                  "(a site publishing where it may not)", value=self.permission_violations())
        yield GaugeMetricFamily("cpn_nats_connected", "1 while the hub's NATS connection is up",
                                value=1 if self.bus.connected else 0)
        yield CounterMetricFamily("cpn_inference_failovers", "Inference requests moved to another site after one failed",
                                  value=self.inference.failovers)

    def _sites(self) -> Iterator[Metric]:
        now = self.clock.time()
        up = GaugeMetricFamily("cpn_site_up", "1 while the site is heard from (0: lost)", labels=["site", "tier"])
        draining = GaugeMetricFamily("cpn_site_draining", "1 while the site is draining", labels=["site"])
        silence = GaugeMetricFamily("cpn_site_last_seen_seconds", "Seconds since the site's last heartbeat", labels=["site"])
        cards = GaugeMetricFamily("cpn_cards", "Accelerator cards by site, accelerator and state (free, busy)",
                                  labels=["site", "tier", "accelerator", "state"])
        queue = GaugeMetricFamily("cpn_site_queue_depth", "Requests queued at the site (its last heartbeat)", labels=["site"])
        inflight = GaugeMetricFamily("cpn_site_inflight", "Requests in flight at the site (its last heartbeat)", labels=["site"])
        replicas: dict[tuple[str, str], int] = {}
        for view in self.registry:
            up.add_metric([view.id, view.tier], 1 if view.state == "up" else 0)
            draining.add_metric([view.id], 1 if view.draining else 0)
            silence.add_metric([view.id], max(0.0, now - view.last_seen) if view.last_seen else 0.0)
            for acc, total in sorted(view.accelerators.items()):
                free = max(0.0, min(float(total), float(view.free_cards.get(acc, total)))) if view.state == "up" else 0.0
                cards.add_metric([view.id, view.tier, acc, "free"], free)
                cards.add_metric([view.id, view.tier, acc, "busy"], float(total) - free if view.state == "up" else 0.0)
            queue.add_metric([view.id], view.queue_depth)
            inflight.add_metric([view.id], view.inflight)
            if view.state == "up":
                for model, rep in view.replicas.items():
                    key = (model, rep.state)
                    replicas[key] = replicas.get(key, 0) + 1
        yield from (up, draining, silence, cards, queue, inflight)
        live = GaugeMetricFamily("cpn_replicas", "Model replicas reported by sites that are up, by model and state",
                                 labels=["model", "state"])
        for (model, state), n in sorted(replicas.items()):
            live.add_metric([model, state], n)
        yield live

    def _replicated(self, replica: Replica) -> Iterator[Metric]:
        """The replicated record under the store (``record = "nats"``, controlplane/store/replica.py)."""
        bridge = replica.bridge
        yield CounterMetricFamily("cpn_record_rows_published", "Rows this process wrote to the replicated record "
                                  "(acknowledged by a quorum)", value=replica.published)
        yield CounterMetricFamily("cpn_record_rows_applied", "Rows from the replicated record applied to this process's "
                                  "SQLite projection", value=replica.applied)
        yield CounterMetricFamily("cpn_record_conflicts", "Write transactions refused because another process wrote "
                                  "their rows first (409)", value=replica.conflicts)
        yield CounterMetricFamily("cpn_record_no_quorum", "Write transactions refused without a quorum of the record (503)",
                                  value=replica.no_quorum)
        yield GaugeMetricFamily("cpn_record_quorum", QUORUM_HELP,
                                value=0 if getattr(bridge, "degraded_since", None) is not None else 1)
        yield GaugeMetricFamily("cpn_record_revision", "The last revision of the replicated record this process applied",
                                value=getattr(bridge, "revision", 0))
        yield GaugeMetricFamily("cpn_record_writes_in_flight", "Pipelined write transactions of this process awaiting "
                                "the record's quorum", value=replica.in_flight)
        yield CounterMetricFamily("cpn_record_write_waits", "Pipelined writes that ran again after a batch in flight "
                                  "with one of their keys", value=replica.write_waits)
        projection = getattr(bridge, "projection", None)
        yield CounterMetricFamily("cpn_record_projection_fills", "Checks that found this process's projection missing "
                                  "writes its watch had not delivered, read from the record instead",
                                  value=getattr(projection, "fills", 0))
        yield CounterMetricFamily("cpn_record_watch_restarts", "Watches of the record started again after they went "
                                  "silent", value=getattr(projection, "restarts", 0))

    def _record(self) -> Iterator[Metric]:
        snap = store_stats.snapshot(self.store.db, now=self.clock.time())
        jobs = GaugeMetricFamily("cpn_jobs", "Training jobs by state", labels=["state"])
        for state in store_stats.JOB_STATES:
            jobs.add_metric([state], snap.jobs.get(state, 0))
        yield jobs
        yield GaugeMetricFamily("cpn_job_queue_oldest_seconds", "How long the oldest queued job has waited (0: none queued)",
                                value=snap.oldest_queued_s)
        yield GaugeMetricFamily("cpn_job_queue_cards", "Cards asked for by queued jobs", value=snap.queued_cards)
        # Prometheus' base unit is the second: card-seconds (divide by 3600 for card-hours).
        yield CounterMetricFamily("cpn_training_card_seconds", "Card-seconds of training recorded on jobs",
                                  value=snap.card_hours * 3600.0)
        deployments = GaugeMetricFamily("cpn_deployments", "Deployments by state", labels=["state"])
        for state in store_stats.DEPLOYMENT_STATES:
            deployments.add_metric([state], snap.deployments.get(state, 0))
        yield deployments
        planned = GaugeMetricFamily("cpn_planned_replicas", "Replicas the deployments placed, by state", labels=["state"])
        for state in store_stats.REPLICA_STATES:
            planned.add_metric([state], snap.replicas.get(state, 0))
        yield planned

