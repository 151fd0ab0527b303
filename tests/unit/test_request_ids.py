"""The hub's request ids (``RequestIds``): drawn from a pool of kernel random bits, never repeated,
and never shared with a forked child."""

from __future__ import annotations

import os
import re

from controlplane.services.inference import RequestIds


def test_ids_across_several_pool_refills_are_distinct_128_bit_hex() -> None:
    ids = RequestIds()
    drawn = [ids.next() for _ in range(3 * RequestIds.POOL_BYTES // 16 + 7)]  # 3 refills and some
    assert all(re.fullmatch(r"r[0-9a-f]{32}", i) for i in drawn)
    assert len(set(drawn)) == len(drawn)


def test_a_forked_child_does_not_hand_out_its_parents_next_ids() -> None:
    ids = RequestIds()
    ids.next()  # the pool is filled in the parent
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        try:
            os.write(write, "".join(ids.next() for _ in range(4)).encode())
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 4096).decode()
    os.close(read)
    os.waitpid(pid, 0)
    parent = "".join(ids.next() for _ in range(4))
    assert len(child) == len(parent) == 4 * 33
    assert not {child[i:i + 33] for i in range(0, len(child), 33)} & {parent[i:i + 33] for i in range(0, len(parent), 33)}
