"""bench/sampler.py: a module run under the stack sampler writes where its threads spent their time
(collapsed stacks and a top list), the idle ones left out, and the module runs as under ``-m``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SAMPLER = Path(__file__).resolve().parents[2] / "bench" / "sampler.py"

BUSY = '''
import sys, threading, time

def spin(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(range(200))

def idle():
    threading.Event().wait(0.6)

t = threading.Thread(target=idle)
t.start()
spin(0.5)
t.join()
print("ran as", __name__, sys.argv[1:])
'''


def test_a_busy_function_shows_in_the_samples_and_an_idle_thread_does_not(tmp_path: Path) -> None:
    (tmp_path / "busy_mod.py").write_text(BUSY)
    out = tmp_path / "busy.stacks"
    done = subprocess.run([sys.executable, str(SAMPLER), str(out), "-m", "busy_mod", "x"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(tmp_path), "CPN_SAMPLE_MS": "1"})
    assert done.returncode == 0, done.stderr
    assert "ran as __main__ ['x']" in done.stdout
    stacks = out.read_text().splitlines()
    assert stacks and all(line.rsplit(" ", 1)[1].isdigit() for line in stacks)
    assert any("busy_mod.py:spin" in line for line in stacks)
    assert not any("busy_mod.py:idle" in line for line in stacks)  # a thread waiting is not counted
    top = (tmp_path / "busy.stacks.top").read_text()
    assert "busy_mod.py:spin" in top and top.startswith("busy samples ")
