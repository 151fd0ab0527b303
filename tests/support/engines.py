"""Real engines a site would use (podman, Slurm, bubblewrap): skip with the Debian package named.

``make test`` passes on a machine without them and names each skipped test and what it needs
(pytest ``-rs``); ``.ci/run`` installs the packages first, so CI runs every one of these tests.
"""

from __future__ import annotations

import shutil

import pytest


def needs(*binaries: str, package: str) -> pytest.MarkDecorator:
    """Skip unless every binary is on PATH; the reason names the Debian package that brings them."""
    missing = [b for b in binaries if shutil.which(b) is None]
    return pytest.mark.skipif(
        bool(missing), reason=f"needs {', '.join(missing)} (Debian package: {package}; .ci/run installs it)")
