"""A lease candidate as its own process, for tests that SIGKILL or SIGSTOP a leader.

``python -m tests.support.leasecandidate --servers URL,URL,URL --identity c1`` campaigns for the
``controller`` lease and prints one JSON line per event on stdout (wall-clock ``t``):

- ``{"event": "ready"}`` once connected;
- ``{"event": "leading", "epoch": N}`` when it starts leading; while leading it commits a fenced
  write every 0.1 s (``job.tick-<identity>``) and prints ``{"event": "tick_failed", ...}`` if one fails;
- ``{"event": "stopped", "epoch": N, "reason": ..., "stale_write": "fenced" | "conflict" | "written" | ...}``
  when it stops: it then tries one more commit carrying its old epoch and reports what the record
  said (an old leader's write must never land).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from controlplane.replicated import kv
from controlplane.replicated.errors import Conflict, Fenced, NoQuorum, RecordError
from controlplane.replicated.lease import LeaderElector
from controlplane.replicated.lease_rules import LeaseConfig


def say(**fields: object) -> None:
    sys.stdout.write(json.dumps({"t": time.time(), **fields}) + "\n")
    sys.stdout.flush()


async def campaign(args: argparse.Namespace) -> None:
    # Creating the R3 bucket can take longer than one request's timeout on a loaded machine (three
    # candidates race for it): retry the opening, bounded, rather than die before campaigning.
    deadline = time.monotonic() + 30.0
    while True:
        try:
            record = await kv.Record.open(args.servers.split(","), timeout_s=1.0, name=f"candidate-{args.identity}")
            break
        except NoQuorum as exc:
            if time.monotonic() > deadline:
                raise
            say(event="open_retry", error=str(exc))
            await asyncio.sleep(0.2)  # a program's retry back-off (this runs as a candidate process, not a test)
    config = LeaseConfig(lease_duration_s=args.lease, renew_deadline_s=args.renew, retry_period_s=args.retry,
                         holder_silent_s=args.silent)
    ticker: asyncio.Task[None] | None = None
    last_fence: list[kv.Fence] = []

    async def tick() -> None:
        n = 0
        while True:
            await asyncio.sleep(0.1)  # the candidate's work: one fenced commit every 0.1 s
            fence = elector.fence
            if fence is None:
                return
            n += 1
            try:
                await record.commit([kv.Write(f"job.tick-{args.identity}", str(n).encode(), None)], fence=fence)
            except RecordError as exc:
                say(event="tick_failed", error=type(exc).__name__)

    async def started(epoch: int) -> None:
        nonlocal ticker
        last_fence[:] = [kv.Fence("controller", epoch)]
        say(event="leading", epoch=epoch, identity=args.identity)
        ticker = asyncio.create_task(tick())

    async def stopped(reason: str) -> None:
        if ticker is not None:
            ticker.cancel()
        fence = last_fence[0]
        try:
            await record.commit([kv.Write(f"job.stale-{args.identity}", b"stale", None)], fence=fence)
            outcome = "written"
        except Fenced:
            outcome = "fenced"
        except Conflict:
            outcome = "conflict"
        except NoQuorum:
            outcome = "no_quorum"
        say(event="stopped", epoch=fence.epoch, reason=reason, stale_write=outcome, identity=args.identity)

    elector = LeaderElector(record, "controller", args.identity, config, on_started_leading=started,
                            on_stopped_leading=stopped)
    say(event="ready", identity=args.identity)
    try:
        await elector.run()
    finally:
        await record.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--servers", required=True)
    parser.add_argument("--identity", required=True)
    defaults = LeaseConfig()
    parser.add_argument("--lease", type=float, default=defaults.lease_duration_s)
    parser.add_argument("--renew", type=float, default=defaults.renew_deadline_s)
    parser.add_argument("--retry", type=float, default=defaults.retry_period_s)
    parser.add_argument("--silent", type=float, default=defaults.holder_silent_s)
    args = parser.parse_args(argv)
    try:
        asyncio.run(campaign(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
