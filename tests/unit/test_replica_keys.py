"""Record keys of replicated rows (controlplane/store/replica.py): one NATS KV key per row, valid
whatever the key columns hold, distinct for distinct rows."""

from __future__ import annotations

import re

from controlplane.store.replica import TABLES, key_token, record_key

KV_KEY = re.compile(r"[-/_=.a-zA-Z0-9]+")


def test_plain_ids_are_kept_and_others_become_digests() -> None:
    assert record_key("jobs", ["job-1f2e"]) == "job.job-1f2e"
    assert record_key("attempts", ["job-1f2e", 2]) == "attempt.job-1f2e.2"
    odd = ["acme", "Qwen/Qwen2.5-7B", "sh edge.1"]
    key = record_key("usage", odd, "hub-a")
    assert key.startswith("usage.hub-a.acme.=") and KV_KEY.fullmatch(key) and ".." not in key
    assert record_key("idempotency", ["acme", "run 1"]) != record_key("idempotency", ["acme", "run 2"])
    assert key_token("a.b") != key_token("a_b") and key_token("") != key_token(" ")


def test_every_replicated_table_has_a_distinct_kind() -> None:
    kinds = [kind for kind, _ in TABLES.values()]
    assert len(set(kinds)) == len(kinds) and all(KV_KEY.fullmatch(k) and "." not in k for k in kinds)
