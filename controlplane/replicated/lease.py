"""``LeaderElector``: one process's part in electing a leader, by a lease in the record.

It carries out :mod:`.lease_rules` against :class:`~.kv.Record` (it does not import ``nats``):

- the lease lives under ``sys.lease.<name>``, the fence under ``sys.fence.<name>``; acquiring is one
  atomic commit of both, each a compare-and-set on the revision this candidate read, so at most one
  candidate wins and the winner's epoch is the fence's new revision;
- a leader renews every ``retry_period_s`` (compare-and-set on its own last revision); a renewal
  that cannot be acknowledged before ``renewed_at + renew_deadline_s`` is abandoned, and the leader
  stops (``on_stopped_leading``) at that moment, before anyone else may acquire;
- :meth:`is_leading` reads the clock each time, so a process that was frozen past its deadline
  knows it lost before its loop has run again; :attr:`fence` is what its commits carry, so what it
  writes after a newer leader took over fails with ``Fenced``;
- while it holds the lease it answers liveness probes over core NATS (``kv.Record.answer_alive``),
  so it rides out the record stream's re-election (no renewal can land for 4-9 s) without being
  taken over; a candidate probes the holder every retry period and, when the holder has neither
  answered nor renewed for the holder's ``holder_silent_s``, acquires early (rules 5 and 6 of
  :mod:`.lease_rules`); :meth:`may_decide` is true only while no such early takeover can have
  happened (``holder_silent_s`` after the last acknowledged renewal);
- :meth:`release` steps down on purpose (clean stop): the lease is marked released and another
  candidate takes over at once instead of after a full lease.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec

from controlplane.replicated import lease_rules as rules
from controlplane.replicated.errors import Conflict, NotFound, RecordError
from controlplane.replicated.kv import FENCE_PREFIX, Fence, Record, Write

_log = logging.getLogger("cpn.replicated.lease")

LEASE_PREFIX = "sys.lease."

LOSS_REASONS = {"renew deadline passed": "deadline", "lease taken": "taken", "released": "released",
                "stopping": "stopped"}
"""Why a term ended, as the bounded label ``LeaderElector.losses`` counts it by."""

Callback = Callable[..., Awaitable[None] | None]


class LeaderElector:
    """Campaign for the lease ``name`` as ``identity`` until :meth:`stop`.

    Args:
        record: the record holding the lease.
        name: the lease's name (``controller``).
        identity: this process's identity, unique per process life.
        config: lease timings.
        on_started_leading: called with the epoch when this process starts leading.
        on_stopped_leading: called (with a reason) when it stops, before any other may lead.
            Both run inside the election loop: keep them short (start or cancel tasks), since
            no renewal is sent while they run.
        clock: monotonic seconds (injected; ``time.monotonic`` live).
    """

    def __init__(self, record: Record, name: str, identity: str, config: rules.LeaseConfig | None = None, *,
                 on_started_leading: Callback | None = None, on_stopped_leading: Callback | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.record = record
        self.name = name
        self.identity = identity
        self.config = config or rules.LeaseConfig()
        self.on_started_leading = on_started_leading
        self.on_stopped_leading = on_stopped_leading
        self.clock = clock
        self.lease_key = LEASE_PREFIX + name
        self.fence_key = FENCE_PREFIX + name
        self._held: rules.Held | None = None
        self._observed: rules.Observed | None = None
        self._task: asyncio.Task[None] | None = None
        self.terms = 0
        self.last_epoch = 0
        self.reconnects = 0
        """Renewals sent again through another server after one went unanswered for a retry period
        and the server did not answer a ping either."""
        self.probes = 0
        self.probes_unanswered = 0
        self.early_takeovers = 0
        """Acquisitions of a lease whose holder was silent (Rule 5), before a full lease ran out."""
        self.rode_out = 0
        """Renewals that landed after ``holder_silent_s`` without one (a stream election, a stall):
        the leader held its commands back meanwhile, kept its lease and epoch, and went on."""
        self.losses: dict[str, int] = {}
        """Terms that ended, by reason (``deadline``, ``taken``, ``released``, ``stopped``)."""

    def __repr__(self) -> str:
        state = "candidate"
        if self.is_leading() and self._held:
            state = f"leading epoch={self._held.epoch}" + ("" if self.may_decide() else " waiting")
        return (f"<LeaderElector {self.name} {self.identity} {state} terms={self.terms} probes={self.probes} "
                f"unanswered={self.probes_unanswered} early={self.early_takeovers}>")

    # ------------------------------------------------------------------ what the rest of the process asks

    def is_leading(self) -> bool:
        """Does this process hold the lease (until its renew deadline)?"""
        held = self._held
        return held is not None and rules.still_leading(held, self.clock(), self.config)

    def may_decide(self) -> bool:
        """May it send the leader's commands now? False from ``holder_silent_s`` after its last
        acknowledged renewal (a stream election, a freeze) until a renewal lands again: no other
        process can have taken the lease over early while this is true (Rule 6)."""
        held = self._held
        return held is not None and rules.may_decide(held, self.clock(), self.config)

    @property
    def epoch(self) -> int:
        """The current epoch while leading, else 0."""
        return self._held.epoch if self._held is not None and self.is_leading() else 0

    @property
    def fence(self) -> Fence | None:
        """What a leader's commits carry (None when not leading)."""
        return Fence(self.name, self._held.epoch) if self._held is not None and self.is_leading() else None

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"lease-{self.name}")

    async def stop(self, release: bool = True) -> None:
        """Stop campaigning; if leading, step down (``release``: tell others they may take over now)."""
        if self._task is not None:
            task, self._task = self._task, None
            # Cancelled again until it ends: a cancel that lands as an inner ``wait_for`` times out
            # is swallowed on Python 3.11, and a campaign mid-request would then run on (a stop
            # that awaited it once hung for good). Abandoned, logged, after ten tries.
            for _ in range(10):
                task.cancel()
                done, _ = await asyncio.wait({task}, timeout=1.0)
                if done:
                    if not task.cancelled():
                        task.exception()  # retrieved: a failure was logged where it happened
                    break
            else:
                _log.warning("lease_task_abandoned name=%s (it ignored ten cancels)", self.name)
        if self._held is not None:
            if release:
                await self.release()
            else:
                await self._stopped("stopping")

    async def release(self) -> None:
        held = self._held
        if held is None:
            return
        await self._stopped("released")  # stop deciding first, then tell the others
        value = self._value(epoch=held.epoch, renewals=held.renewals, released=True)
        try:
            await self.record.update(self.lease_key, value, held.revision)
        except RecordError as exc:
            _log.info("lease_release_failed name=%s error=%s", self.name, exc)

    async def run(self) -> None:
        """Campaign, lead, and campaign again after losing; forever (cancel to end)."""
        responder = None
        try:
            while True:
                if responder is None and self.config.holder_silent_s > 0:
                    try:  # before the first acquisition, so a holder always answers
                        responder = await self.record.answer_alive(self.identity, self.is_leading)
                    except RecordError as exc:
                        _log.info("lease_responder_retry name=%s error=%s", self.name, exc)
                        await asyncio.sleep(self.config.retry_period_s)
                        continue
                await self._campaign()
                await self._lead()
        finally:
            if responder is not None:
                await responder.stop()

    def _value(self, *, epoch: int = 0, renewals: int = 0, released: bool = False) -> bytes:
        return msgspec.json.encode(rules.LeaseRecord(
            holder=self.identity, epoch=epoch, lease_duration_s=self.config.lease_duration_s, renewals=renewals,
            released=released, holder_silent_s=self.config.holder_silent_s))

    # ------------------------------------------------------------------ candidate

    async def _campaign(self) -> None:
        self._observed = None
        while True:
            try:
                if await self._try_acquire():
                    return
            except RecordError as exc:  # no quorum: keep trying; a Conflict: someone else won
                self._observed = rules.unsure(self._observed)  # our own link may be what failed
                _log.debug("lease_acquire_retry name=%s error=%s", self.name, exc)
            await asyncio.sleep(self._campaign_sleep_s())

    def _probe_timeout_s(self) -> float:
        # an answer comes in a millisecond or two; a probe must not hold the round past a retry period
        return max(0.05, self.config.retry_period_s * 0.75)

    def _campaign_sleep_s(self) -> float:
        retry = self.config.retry_period_s
        if self._observed is None:
            return retry
        # wake up when the lease can be tried, not up to a retry period later
        return max(0.01, min(retry, rules.acquire_at(self._observed) - self.clock()))

    async def _read_lease(self) -> tuple[int, rules.LeaseRecord | None]:
        try:
            entry = await self.record.get(self.lease_key)
        except NotFound:
            return 0, None
        try:
            return entry.revision, msgspec.json.decode(entry.value, type=rules.LeaseRecord)
        except msgspec.DecodeError:
            return entry.revision, rules.LeaseRecord(holder="?", lease_duration_s=self.config.lease_duration_s)

    async def _try_acquire(self) -> bool:
        revision, lease = await self._read_lease()
        self._observed = rules.observe(self._observed, revision, lease, self.clock())
        if not rules.may_acquire(self._observed, self.clock()) and rules.wants_probe(self._observed, self.identity):
            sent_at = self.clock()
            answered = await self.record.probe_alive(self._observed.holder, self._probe_timeout_s())
            self.probes += 1
            self.probes_unanswered += not answered
            self._observed = rules.probed(self._observed, answered, sent_at)
        observed = self._observed
        if not rules.may_acquire(observed, self.clock()):
            return False
        early = observed.revision != 0 and not observed.released and \
            self.clock() < observed.seen_at + observed.lease_duration_s
        try:
            fence_revision = (await self.record.get(self.fence_key)).revision
        except NotFound:
            fence_revision = 0
        sent_at = self.clock()
        try:
            epoch, lease_revision = await self.record.commit([
                Write(self.fence_key, self.identity.encode(), fence_revision),
                Write(self.lease_key, self._value(), revision),
            ])
        except Conflict:
            self._observed = None  # someone moved it: time the new revision afresh
            return False
        self._held = rules.Held(epoch=epoch, revision=lease_revision, renewed_at=sent_at)
        self.terms += 1
        self.last_epoch = epoch
        self.early_takeovers += early
        silent = f" silent_s={sent_at - observed.silent_since:.2f}" if early and observed.silent_since is not None else ""
        # an early takeover means a holder process went silent (died, froze, or lost NATS): worth a warning
        _log.log(logging.WARNING if early else logging.INFO,
                 "lease_acquired name=%s identity=%s epoch=%d early=%s previous=%s%s probes_unanswered=%d", self.name,
                 self.identity, epoch, early, observed.holder or "-", silent, self.probes_unanswered)
        await self._call(self.on_started_leading, epoch)
        return True

    # ------------------------------------------------------------------ leader

    async def _lead(self) -> None:
        config = self.config
        while True:
            held = self._held
            if held is None:
                return
            now = self.clock()
            if not rules.still_leading(held, now, config):
                await self._stopped("renew deadline passed")
                return
            await asyncio.sleep(max(0.0, min(rules.next_renewal_at(held, config), rules.stop_at(held, config)) - now))
            sent_at = self.clock()
            budget_s = rules.renewal_budget_s(held, sent_at, config)
            if budget_s <= 0:
                continue
            value = self._value(epoch=held.epoch, renewals=held.renewals + 1)
            try:
                revision = await self._renew(value, held.revision, budget_s)
            except Conflict:
                if not await self._still_ours(held):
                    await self._stopped("lease taken")
                    return
                continue
            except (RecordError, TimeoutError) as exc:
                _log.info("lease_renew_failed name=%s epoch=%d error=%s", self.name, held.epoch, exc or "timeout")
                continue
            acked_at = self.clock()
            if not rules.may_decide(held, acked_at, config):  # a stream election, a stall: ridden out
                self.rode_out += 1
                _log.warning("lease_rode_out name=%s epoch=%d without_renewal_s=%.2f (its commands were held back)",
                             self.name, held.epoch, acked_at - held.renewed_at)
            self._held = rules.renewed(held, revision, sent_at)

    async def _renew(self, value: bytes, revision: int, budget_s: float) -> int:
        """One renewal within ``budget_s``: a send unanswered after a retry period is sent again
        through another server if the one this connection uses does not answer a ping either (it
        may be paused, which the connection's own pings notice only after seconds; a server that
        answers is fine, and the stream is electing a leader: moving would only silence this
        process's liveness answers while it reconnects)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget_s
        first_s = max(self.config.retry_period_s, 0.25)
        async with asyncio.timeout(budget_s):
            if budget_s > 2 * first_s:
                try:
                    async with asyncio.timeout(first_s):
                        return await self.record.update(self.lease_key, value, revision)
                except TimeoutError:
                    if loop.time() + 0.05 >= deadline:
                        raise
                    if not await self.record.server_answers(min(first_s, 0.25)):
                        self.reconnects += 1
                        _log.info("lease_renew_slow name=%s after_s=%.2f: through another server", self.name, first_s)
                        await self.record.reconnect()
            return await self.record.update(self.lease_key, value, revision)

    async def _still_ours(self, held: rules.Held) -> bool:
        """After a lost renewal CAS: was it our own earlier renewal that landed unacknowledged?"""
        try:
            revision, lease = await self._read_lease()
        except RecordError:
            return True  # cannot tell: the deadline decides
        if lease is not None and lease.holder == self.identity and lease.epoch == held.epoch and not lease.released:
            self._held = rules.Held(epoch=held.epoch, revision=revision, renewed_at=held.renewed_at,
                                    renewals=lease.renewals)
            return True
        return False

    async def _stopped(self, reason: str) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        label = LOSS_REASONS.get(reason, "other")
        self.losses[label] = self.losses.get(label, 0) + 1
        _log.warning("lease_lost name=%s identity=%s epoch=%d reason=%s", self.name, self.identity, held.epoch, reason)
        await self._call(self.on_stopped_leading, reason)

    async def _call(self, callback: Callback | None, *args: object) -> None:
        if callback is None:
            return
        try:
            result = callback(*args)
            if inspect.isawaitable(result):
                await result
        except Exception:
            _log.exception("lease_callback_failed name=%s", self.name)
