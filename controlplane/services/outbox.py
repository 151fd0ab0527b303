"""Delivering commands to sites from the SQLite outbox (``store/outbox.py``).

Decide, commit, then send: the training service writes each ``StartAttempt`` / ``StopAttempt`` into
the outbox inside the transaction that makes the decision, then calls :meth:`CommandOutbox.kick`.
This module sends them.

Promises:

- Rule 1: a command is sent only after the decision causing it is committed, and it stays
  ``pending`` until the site answers; a hub killed in between re-sends it on start (the loop reads
  pending entries from the store, not from memory). Agents treat the commands idempotently.
- Rule 2: per site, entries go out one at a time in the order they were decided; sites are served
  concurrently, so one unreachable site does not hold up the others.
- Rule 3: an unreachable site (timeout, no responders, hub disconnected) is retried with a doubling
  backoff (``backoff_base_s`` .. ``backoff_max_s``); entries for a site the registry holds ``lost``
  wait without trying. A ``StartAttempt`` that still cannot be delivered after
  ``start_deadline_s`` is given up and reported as refused (the job restarts elsewhere); a
  ``StopAttempt`` expires after ``stop_ttl_s``.
- Rule 4: before each send the owner's ``obsolete`` check runs; an obsolete entry (e.g. the attempt
  is no longer current) is dropped with a log line and never sent.
- Rule 5: an answer is reported to the owner (``on_ack`` / ``on_refused``) after the entry is marked
  done, synchronously, so the owner's own writes follow in order.
- Rule 6: while the bus says this process does not lead (``bus.deciding()``, read from the clock:
  a leader frozen past its lease knows on waking), nothing is sent and nothing is given up; the
  entries wait for the next leader of this process (the new leader elsewhere rebuilds what it must
  send from the record, ``services/handover.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

import msgspec

from controlplane.core.errors import BusUnavailable, SiteRefused, SiteUnreachable
from controlplane.runtime import BackgroundTasks, cancel_and_wait
from controlplane.store import outbox as store_outbox
from controlplane.store.outbox import OutboxRow
from edge_agent import wire

log = logging.getLogger("cpn.outbox")

START = "start_attempt"
STOP = "stop_attempt"
LOAD = "load_model"
UNLOAD = "unload_model"
ATTEMPT_KINDS = frozenset({START, STOP})
"""What the training service's sender delivers (the default: it predates ``kinds``)."""
MODEL_KINDS = frozenset({LOAD, UNLOAD})
"""What the deployments service's sender delivers."""

Obsolete = Callable[[OutboxRow, Any, float], "str | None"]
OnAck = Callable[[OutboxRow, Any, wire.Ack, float], object]
"""May return an awaitable: the entry's sender awaits it (Rule 5)."""
OnRefused = Callable[[OutboxRow, Any, str, float], object]
"""May return an awaitable too: a refusal's sender awaits it; an entry given up in the schedule's
pass has it awaited in a task of the sender's group."""


def kind_of(cmd: Any) -> str:
    """The wire tag of a command struct (what the ``kind`` column holds)."""
    return str(type(cmd).__struct_config__.tag)


class CommandOutbox:
    """Sends pending outbox entries to their sites over the hub's bus.

    Args:
        db: the hub's database.
        bus: anything with ``async command(site, cmd, timeout_s) -> wire.Ack`` (``HubBus``).
        is_lost: True when the registry holds the site lost (its entries wait).
        obsolete: returns why an entry should not be sent any more, or None.
        on_ack / on_refused: told about answers (refused also covers a start given up).
        kinds: the command kinds (wire tags) this sender delivers. Each owner of commands runs one
            sender over the shared table for its kinds (training: ``ATTEMPT_KINDS``, deployments:
            ``MODEL_KINDS``), so an entry is only ever sent by its owner and told to its callbacks.
    """

    def __init__(
        self,
        db: Any,
        bus: Any,
        *,
        is_lost: Callable[[str], bool] = lambda site: False,
        obsolete: Obsolete = lambda row, cmd, now: None,
        on_ack: OnAck = lambda row, cmd, ack, now: None,
        on_refused: OnRefused = lambda row, cmd, why, now: None,
        clock: Callable[[], float],
        kinds: frozenset[str] = ATTEMPT_KINDS,
        timeout_s: float = 2.0,
        backoff_base_s: float = 0.25,
        backoff_max_s: float = 5.0,
        start_deadline_s: float = 15.0,
        stop_ttl_s: float = 600.0,
    ) -> None:
        self.db = db
        self.bus = bus
        self.is_lost = is_lost
        self.obsolete = obsolete
        self.on_ack = on_ack
        self.on_refused = on_refused
        self.clock = clock
        self.timeout_s = timeout_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.start_deadline_s = start_deadline_s
        self.stop_ttl_s = stop_ttl_s
        self.kinds = kinds
        self.counters = {"sent": 0, "refused": 0, "dropped": 0, "retries": 0}
        self._wake = asyncio.Event()
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._group: asyncio.TaskGroup | None = None
        self._reports = BackgroundTasks("outbox")

    def __repr__(self) -> str:
        c = self.counters
        return (f"<CommandOutbox sent={c['sent']} refused={c['refused']} dropped={c['dropped']} "
                f"retries={c['retries']} sending_to={len(self._workers)}>")

    # ------------------------------------------------------------------ writing (caller's transaction)

    def add(self, site: str, cmd: Any, now: float, *, dedupe: bool = False) -> int | None:
        """Write ``cmd`` for ``site`` (joins the caller's transaction). Call :meth:`kick` after commit.

        With ``dedupe``, an identical pending command for the same attempt is not added twice
        (returns None).
        """
        kind = kind_of(cmd)
        job = str(getattr(cmd, "job", "") or getattr(cmd, "deployment", ""))
        attempt = int(getattr(cmd, "attempt", 0))
        if dedupe and store_outbox.has_pending(self.db, site, kind, job, attempt):
            return None
        return store_outbox.enqueue(self.db, site, kind, job, attempt, wire.encode(cmd), now)

    def kick(self) -> None:
        """New entries were committed (or a site came back): look now, not at the next timer."""
        self._wake.set()

    # ------------------------------------------------------------------ sending

    async def run(self) -> None:
        """Deliver until cancelled (pending entries from before a restart included).

        The per-site senders are children of this call (a ``TaskGroup``): whoever runs it (the
        process's task owner) owns them too; cancelling it cancels and awaits them, and a finished
        sender is dropped at once. The outbox owns no task of its own.
        """
        async with asyncio.TaskGroup() as group:
            self._group = group
            try:
                await self._deliver()
            finally:
                self._group = None

    async def _deliver(self) -> None:
        while True:
            self._wake.clear()
            try:
                self._schedule(self.clock())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event=outbox_pass_failed")
            nxt = None
            with contextlib.suppress(Exception):
                nxt = store_outbox.next_due_at(self.db, self.kinds)
            delay = 1.0 if nxt is None else min(1.0, max(0.2, nxt - self.clock()))
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _schedule(self, now: float) -> None:
        for row in store_outbox.due(self.db, now, kinds=self.kinds):
            if row.site in self._workers:
                continue
            cmd = self._decode(row, now)
            if cmd is None or self._dropped_if_obsolete(row, cmd, now):
                continue
            if self.is_lost(row.site):
                self._expire(row, cmd, now, "site is lost")
                continue
            if self._group is None:  # not running (a pass outside run(), tests): sent by the next run
                return
            self._workers[row.site] = self._group.create_task(self._drain(row.site), name=f"outbox-{row.site}")

    async def _drain(self, site: str) -> None:
        try:
            while True:
                rows = store_outbox.due(self.db, self.clock(), site=site, limit=50, kinds=self.kinds)
                if not rows:
                    return
                for row in rows:
                    if not await self._send(row):
                        return  # the site is unreachable: keep the order, try again later
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("event=outbox_worker_failed site=%s", site)
        finally:
            self._workers.pop(site, None)

    def _decode(self, row: OutboxRow, now: float) -> Any:
        try:
            return wire.command_decoder.decode(row.body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:  # a bug or a hand-edited row
            store_outbox.mark_dropped(self.db, row.id, now, f"undecodable: {exc}")
            self.counters["dropped"] += 1
            log.error("event=outbox_dropped id=%d site=%s kind=%s reason=undecodable error=%s", row.id, row.site, row.kind, exc)
            return None

    def _dropped_if_obsolete(self, row: OutboxRow, cmd: Any, now: float) -> bool:
        why = self.obsolete(row, cmd, now)
        if why is None:
            return False
        if store_outbox.mark_dropped(self.db, row.id, now, f"obsolete: {why}"):
            self.counters["dropped"] += 1
            log.info("event=outbox_dropped id=%d site=%s kind=%s job=%s attempt=%d reason=%s",
                     row.id, row.site, row.kind, row.job_id, row.attempt, why)
        return True

    def _expire(self, row: OutboxRow, cmd: Any, now: float, error: str) -> bool:
        """Give up on an entry that waited too long; True if it was given up."""
        age_s = now - row.created_at
        if row.kind == START and age_s > self.start_deadline_s:
            why = f"undeliverable for {age_s:.0f} s: {error}"
            if store_outbox.mark_dropped(self.db, row.id, now, why):
                self.counters["dropped"] += 1
                log.warning("event=outbox_gave_up id=%d site=%s kind=%s job=%s attempt=%d error=%s",
                            row.id, row.site, row.kind, row.job_id, row.attempt, error)
                self._report(self.on_refused, row, cmd, why, now)
            return True
        if row.kind != START and age_s > self.stop_ttl_s:
            if store_outbox.mark_dropped(self.db, row.id, now, f"expired after {age_s:.0f} s: {error}"):
                self.counters["dropped"] += 1
                log.warning("event=outbox_expired id=%d site=%s kind=%s job=%s attempt=%d error=%s",
                            row.id, row.site, row.kind, row.job_id, row.attempt, error)
            return True
        return False

    def _backoff_s(self, tries: int) -> float:
        factor: float = 2 ** min(tries, 16)  # typeshed types int ** int as Any (a negative power is a float)
        return min(self.backoff_max_s, self.backoff_base_s * factor)

    async def _send(self, row: OutboxRow) -> bool:
        """Send one entry; False when the site is unreachable (stop sending to it for now)."""
        deciding = getattr(self.bus, "deciding", None)
        if deciding is not None and not deciding():
            return False  # this process no longer leads (Rule 6): send nothing, give up nothing
        now = self.clock()
        cmd = self._decode(row, now)
        if cmd is None or self._dropped_if_obsolete(row, cmd, now):
            return True
        if self.is_lost(row.site):
            return self._expire(row, cmd, now, "site is lost")
        try:
            ack = await self.bus.command(row.site, cmd, timeout_s=self.timeout_s)
        except (SiteUnreachable, BusUnavailable) as exc:
            return self._unreachable(row, cmd, str(exc))
        except SiteRefused as exc:
            now = self.clock()
            if exc.retryable and row.kind != START:
                return self._unreachable(row, cmd, f"{exc.code}: {exc.message}")
            if store_outbox.mark_dropped(self.db, row.id, now, f"refused: {exc.code}: {exc.message}"):
                self.counters["refused"] += 1
                log.warning("event=outbox_refused id=%d site=%s kind=%s job=%s attempt=%d code=%s error=%s",
                            row.id, row.site, row.kind, row.job_id, row.attempt, exc.code, exc.message)
                await self._report_awaited(self.on_refused, row, cmd, f"{exc.code}: {exc.message}", now)
            return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug below us: keep the entry, try again later
            log.exception("event=outbox_send_failed id=%d site=%s", row.id, row.site)
            return self._unreachable(row, cmd, repr(exc))
        now = self.clock()
        if store_outbox.mark_sent(self.db, row.id, now, ack.detail):
            self.counters["sent"] += 1
            log.info("event=outbox_sent id=%d site=%s kind=%s job=%s attempt=%d detail=%s",
                     row.id, row.site, row.kind, row.job_id, row.attempt, ack.detail)
            await self._report_awaited(self.on_ack, row, cmd, ack, now)
        return True

    def _unreachable(self, row: OutboxRow, cmd: Any, error: str) -> bool:
        now = self.clock()
        if self._expire(row, cmd, now, error):
            return True
        self.counters["retries"] += 1
        store_outbox.retry_later(self.db, row.id, now + self._backoff_s(row.tries), error)
        if row.tries == 0 or row.tries % 10 == 0:  # one line per entry now and then, not per retry
            log.info("event=outbox_retry id=%d site=%s kind=%s job=%s attempt=%d tries=%d error=%s",
                     row.id, row.site, row.kind, row.job_id, row.attempt, row.tries + 1, error)
        return False

    @staticmethod
    async def _report_awaited(callback: Callable[..., object], *args: Any) -> None:
        """:meth:`_report` for a callback that may return an awaitable (an owner committing to the
        replicated record awaits its quorum; this entry's sender waits, the loop does not)."""
        try:
            result = callback(*args)
            if inspect.isawaitable(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("event=outbox_callback_failed")

    def _report(self, callback: Callable[..., object], *args: Any) -> None:
        """Tell the owner without waiting: an awaitable it returns (a write to the replicated
        record) is awaited in a task of the senders' group (or of the outbox, outside :meth:`run`)."""
        try:
            result = callback(*args)
        except Exception:
            log.exception("event=outbox_callback_failed")
            return
        if inspect.isawaitable(result):
            awaited = self._report_awaited(lambda: result)
            if self._group is not None:
                self._group.create_task(awaited, name="outbox-report")
            else:
                self._reports.spawn(awaited, name="report")

    async def close(self) -> None:
        """Cancel the per-site senders (their entries stay pending for the next start)."""
        await cancel_and_wait(list(self._workers.values()))
        self._workers.clear()
        await self._reports.close()
