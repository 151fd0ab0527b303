"""Where a Python process spends its CPU: a stack sampler run around a module (no py-spy needed).

``python bench/sampler.py OUT -m controlplane.cli hub ...`` runs the module as ``python -m`` would,
with a thread that every ``CPN_SAMPLE_MS`` (default 2) ms reads every other thread's stack
(``sys._current_frames``) and counts it, unless that thread is idle (waiting in ``selectors``'s
poll or a lock's ``wait``): the counts approximate where the process burns CPU, all threads
included. At exit (a SIGTERM the process handles, or its normal end) it writes ``OUT``: one line
per distinct stack, ``frame;frame;... count`` (the collapsed format flame-graph tools read), and
``OUT.top``: the functions with the most samples, self and inclusive.

It also times the event loop (the hub's, made by ``controlplane.runtime.new_event_loop``): a
probe every ``PROBE_S`` notes how late it runs, and while it is more than ``STALL_S`` overdue
the loop thread's stack is counted apart. ``OUT.lag`` gets the lateness histogram and the stacks
that held the loop (what stalled it, for a tail latency). Lateness on a loaded host is mostly the
host's (the loop thread waits for a core), so the probe also reads the loop thread's own CPU
clock: the CPU it burned between two probes, and the stacks sampled while it had burned more
than ``STALL_S`` since the last probe, are the loop's own holds, whatever the host's load.

``cpn bench submissions --profile DIR`` starts its hub processes this way.
"""

from __future__ import annotations

import asyncio
import atexit
import math
import collections
import os
import runpy
import sys
import threading
import time
from typing import TextIO
from types import FrameType

IDLE = {("selectors.py", "select"), ("threading.py", "wait"), ("queue.py", "get"), ("threading.py", "_wait_for_tstate_lock"),
        ("thread.py", "_worker"),  # an executor's worker blocked in its queue's get (C, no frame of its own)
        ("runtime.py", "run_until_signalled")}  # uvloop's loop between callbacks (C: polling, or its own work)
PROBE_S = 0.005
STALL_S = 0.020
HOLD_S = float(os.environ.get("CPN_HOLD_MS", "20")) / 1000
"""How much of the loop thread's own CPU since the last probe counts as a hold (``CPN_HOLD_MS``)."""
LAG_EDGES_MS = (5, 10, 20, 50, 100, 200)


def _stack(frame: FrameType | None) -> tuple[str, ...]:
    out = []
    while frame is not None:
        code = frame.f_code
        out.append(f"{os.path.basename(code.co_filename)}:{code.co_name}")
        frame = frame.f_back
    return tuple(reversed(out))


class Sampler:
    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.counts: collections.Counter[tuple[str, ...]] = collections.Counter()
        self.idle = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self.probe_due = math.inf
        """When the loop probe should run next (monotonic); inf until the loop runs."""
        self.lags_ms: list[float] = []
        self.stalls: collections.Counter[tuple[str, ...]] = collections.Counter()
        self.loop_ident = threading.main_thread().ident
        self.loop_clock: int | None = None
        """The loop thread's CPU clock (``time.pthread_getcpuclockid``), once the loop runs."""
        self.probe_cpu = math.inf
        """The loop thread's CPU time when the probe last ran."""
        self.holds_ms: list[float] = []
        self.cpu_stalls: collections.Counter[tuple[str, ...]] = collections.Counter()
        self.gc_ms: dict[int, list[float]] = collections.defaultdict(list)
        """The garbage collector's pauses, by generation (any thread)."""
        self._gc_started = 0.0

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_ms[info["generation"]].append((time.perf_counter() - self._gc_started) * 1000.0)

    def probe(self, loop: asyncio.AbstractEventLoop) -> None:
        """Runs on the loop every PROBE_S: how late it is says how long the loop was held."""
        now, cpu = time.monotonic(), time.thread_time()
        if self.probe_due != math.inf:
            self.lags_ms.append(max(0.0, now - self.probe_due) * 1000.0)
            self.holds_ms.append(max(0.0, cpu - self.probe_cpu) * 1000.0)
        self.probe_due, self.probe_cpu = now + PROBE_S, cpu
        loop.call_later(PROBE_S, self.probe, loop)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval_s):
            stalled = time.monotonic() - self.probe_due > STALL_S
            held = self.loop_clock is not None and time.clock_gettime(self.loop_clock) - self.probe_cpu > HOLD_S
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                if stalled and ident == self.loop_ident:
                    self.stalls[_stack(frame)] += 1
                if held and ident == self.loop_ident:
                    self.cpu_stalls[_stack(frame)] += 1
                leaf = frame.f_code
                if (os.path.basename(leaf.co_filename), leaf.co_name) in IDLE:
                    self.idle += 1
                    continue
                self.counts[_stack(frame)] += 1

    def write(self, path: str) -> None:
        self._stop.set()
        with open(path, "w") as out:
            for stack, n in self.counts.most_common():
                out.write(";".join(stack) + f" {n}\n")
        inclusive: collections.Counter[str] = collections.Counter()
        own: collections.Counter[str] = collections.Counter()
        total = sum(self.counts.values())
        for stack, n in self.counts.items():
            own[stack[-1]] += n
            for name in set(stack):
                inclusive[name] += n
        with open(path + ".top", "w") as out:
            out.write(f"busy samples {total}, idle {self.idle}\n\n-- self --\n")
            for name, n in own.most_common(60):
                out.write(f"{100 * n / max(total, 1):6.2f}% {name}\n")
            out.write("\n-- inclusive --\n")
            for name, n in inclusive.most_common(150):
                out.write(f"{100 * n / max(total, 1):6.2f}% {name}\n")
        lags = sorted(self.lags_ms)
        with open(path + ".lag", "w") as out:
            out.write(f"loop probes {len(lags)} (every {PROBE_S * 1000:.0f} ms), max lateness "
                      f"{lags[-1] if lags else 0.0:.1f} ms\n")
            _histogram(out, "late", lags)
            _stacks(out, f"stacks of the loop thread while it was > {STALL_S * 1000:.0f} ms overdue", self.stalls)
            holds = sorted(self.holds_ms)
            out.write(f"\n-- the loop thread's own CPU between two probes (load-independent): max "
                      f"{holds[-1] if holds else 0.0:.1f} ms --\n")
            _histogram(out, "cpu", holds)
            _stacks(out, f"stacks of the loop thread once it had burned > {HOLD_S * 1000:.0f} ms of CPU "
                    "since the last probe", self.cpu_stalls)
            out.write("\n-- garbage collections (wall ms) --\n")
            for gen, pauses in sorted(self.gc_ms.items()):
                out.write(f"  generation {gen}: {len(pauses)}, total {sum(pauses):.1f} ms, max {max(pauses):.1f} ms, "
                          f"over 5 ms: {sum(1 for p in pauses if p > 5)}\n")


def main() -> None:
    out, flag, module, *rest = sys.argv[1:]
    if flag != "-m":
        raise SystemExit("usage: python -m bench.sampler OUT -m MODULE [ARGS...]")
    sampler = Sampler(float(os.environ.get("CPN_SAMPLE_MS", "2")) / 1000)
    atexit.register(sampler.write, out)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]  # run as a script: not bench/ first
    sys.argv = [module, *rest]
    try:  # time the hub's event loop (see the module's docstring)
        from controlplane import runtime

        made = runtime.new_event_loop

        def new_event_loop() -> asyncio.AbstractEventLoop:
            loop = made()
            sampler.loop_ident = threading.get_ident()
            sampler.loop_clock = time.pthread_getcpuclockid(sampler.loop_ident)
            loop.call_soon(sampler.probe, loop)
            return loop

        runtime.new_event_loop = new_event_loop
    except ImportError:
        pass
    sampler.start()
    import gc

    gc.callbacks.append(sampler.on_gc)
    started = time.process_time()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        sys.stderr.write(f"sampler: {time.process_time() - started:.2f} CPU s\n")


def _histogram(out: TextIO, what: str, values: list[float]) -> None:
    for edge in LAG_EDGES_MS:
        out.write(f"  {what} > {edge:3d} ms: {sum(1 for x in values if x > edge)}\n")


def _stacks(out: TextIO, title: str, stacks: collections.Counter[tuple[str, ...]]) -> None:
    out.write(f"\n-- {title} ({sum(stacks.values())} samples) --\n")
    for stack, n in stacks.most_common(25):
        out.write(f"{n:6d} {';'.join(stack[-12:])}\n")


if __name__ == "__main__":
    main()

