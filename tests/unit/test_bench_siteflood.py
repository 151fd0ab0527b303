"""``bench.siteflood`` starts ``cpn up`` on port 0 for the gateway and NATS and reads the ports it got
from its banner (a port picked free and closed before ``cpn up`` binds it can be taken meanwhile)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from bench import siteflood

BANNER = ("\ncpn is up: 3 sites, hub gateway at http://127.0.0.1:41234\n  admin key:   k\n"
          "  NATS:        nats://127.0.0.1:45678\n\nCtrl-C drains and stops everything.\n")


def _child(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def test_the_urls_are_read_from_the_banner_and_the_rest_is_drained() -> None:
    # After the banner the child writes far more than a pipe holds: it would block if nobody read.
    up = _child(f"import sys; sys.stdout.write({BANNER!r}); sys.stdout.flush(); print('x' * 1_000_000)")
    try:
        assert siteflood.read_banner(up, time.time() + 30) == ("http://127.0.0.1:41234", "nats://127.0.0.1:45678")
        assert up.wait(30) == 0
    finally:
        up.kill()


def test_an_exit_before_the_banner_is_an_error_naming_the_code() -> None:
    up = _child("print('starting'); raise SystemExit(3)")
    with pytest.raises(SystemExit, match="code 3"):
        siteflood.read_banner(up, time.time() + 30)
