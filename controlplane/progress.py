"""Progress of long commands (``cpn sim``, ``cpn chaos``) on stderr, on a terminal or not.

On a terminal: one bar redrawn in place. Elsewhere (CI logs, ``| tee``, a pipe): a plain line at
every ``step_pct`` percent, so a log shows the command is alive without carriage-return noise.
Standard library only: a bar does not justify a dependency (rich and tqdm are not installed with cpn).
"""

from __future__ import annotations

import sys
from typing import TextIO


class Progress:
    """Call with the fraction done (0..1) and an optional short detail; prints only on a change.

    Args:
        label: what is progressing (``simulating``).
        stream: where to write (default stderr).
        tty: force terminal or plain mode (default: ``stream.isatty()``).
        step_pct: percent between plain lines.
    """

    def __init__(self, label: str, stream: TextIO | None = None, *, tty: bool | None = None, step_pct: int = 10) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.step_pct = step_pct
        self._last = -1

    def __repr__(self) -> str:
        return f"<Progress {self.label} {max(self._last, 0)}% {'tty' if self.tty else 'plain'}>"

    def __call__(self, frac: float, detail: str = "") -> None:
        pct = max(0, min(100, int(frac * 100 + 1e-9)))  # 0.29 * 100 is 28.999...: still 29%
        if self.tty:
            if pct == self._last:
                return
            self._last = pct
            filled = pct * 30 // 100
            tail = f"  {detail}" if detail else ""
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {pct:3d}%{tail}\033[K")
            if pct >= 100:
                self.stream.write("\n")
        else:
            step = pct - pct % self.step_pct if pct < 100 else 100
            if step <= self._last:
                return
            self._last = step
            self.stream.write(f"{self.label}: {step}%" + (f" ({detail})" if detail else "") + "\n")
        self.stream.flush()
