"""Garbage-collector settings for long-running cpn processes (the hub, each agent).

A hub or agent allocates tens of thousands of long-lived objects at start-up (the layout, the RTT
index, imported modules) and then mostly short-lived ones per request, freed by reference counting.
With CPython's defaults, requests in flight keep tripping generation-0 collections, and every so
often a full collection walks the whole start-up heap again: measured at 7-12 µs per request on
the hub at 32 concurrent connections (``cpn bench gateway``).

:func:`settle_after_startup` moves everything allocated so far into the permanent generation
(``gc.freeze``: never scanned again) and raises the generation-0 threshold, so collections run
rarely and look only at what was allocated since. Reference cycles are still collected.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 10_000
"""Net container allocations between young collections (CPython's default is 700)."""


def settle_after_startup() -> None:
    """Collect once, freeze the survivors, and make young collections rarer (idempotent)."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
