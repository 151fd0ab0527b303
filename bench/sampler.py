"""Where a Python process spends its CPU: a stack sampler run around a module (no py-spy needed).

``python bench/sampler.py OUT -m controlplane.cli hub ...`` runs the module as ``python -m`` would,
with a thread that every ``CPN_SAMPLE_MS`` (default 2) ms reads every other thread's stack
(``sys._current_frames``) and counts it, unless that thread is idle (waiting in ``selectors``'s
poll or a lock's ``wait``): the counts approximate where the process burns CPU, all threads
included. At exit (a SIGTERM the process handles, or its normal end) it writes ``OUT``: one line
per distinct stack, ``frame;frame;... count`` (the collapsed format flame-graph tools read), and
``OUT.top``: the functions with the most samples, self and inclusive.

``cpn bench submissions --profile DIR`` starts its hub processes this way.
"""

from __future__ import annotations

import atexit
import collections
import os
import runpy
import sys
import threading
import time
from types import FrameType

IDLE = {("selectors.py", "select"), ("threading.py", "wait"), ("queue.py", "get"), ("threading.py", "_wait_for_tstate_lock")}


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

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval_s):
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
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


def main() -> None:
    out, flag, module, *rest = sys.argv[1:]
    if flag != "-m":
        raise SystemExit("usage: python -m bench.sampler OUT -m MODULE [ARGS...]")
    sampler = Sampler(float(os.environ.get("CPN_SAMPLE_MS", "2")) / 1000)
    atexit.register(sampler.write, out)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]  # run as a script: not bench/ first
    sys.argv = [module, *rest]
    sampler.start()
    started = time.process_time()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        sys.stderr.write(f"sampler: {time.process_time() - started:.2f} CPU s\n")


if __name__ == "__main__":
    main()
