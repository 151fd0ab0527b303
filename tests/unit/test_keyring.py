"""The hub's in-memory key ring is a cache of the store believed for at most ``recheck_s`` and never
past a key's expiry (an injected clock, no sleeping)."""

from __future__ import annotations

from controlplane.core import auth


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def principal(key: str, expires_at: float | None = None) -> auth.Principal:
    return auth.Principal(role="tenant", tenant_id="acme", key_hash=auth.hash_key(key), key_id="key_1", expires_at=expires_at)


def test_entry_answers_only_while_fresh() -> None:
    clock = Clock()
    ring = auth.KeyRing(clock=clock)
    key = auth.new_key("acme")
    ring.add(principal(key))
    assert ring.lookup(key) is not None
    clock.now += auth.RECHECK_S
    assert ring.lookup(key) is not None
    clock.now += 0.001
    assert ring.lookup(key) is None  # stale: the caller must read the store again
    ring.add(principal(key))
    assert ring.lookup(key) is not None


def test_entry_never_answers_past_expiry() -> None:
    clock = Clock()
    ring = auth.KeyRing(clock=clock, recheck_s=3600)
    key = auth.new_key("acme")
    ring.add(principal(key, expires_at=clock.now + 0.5))
    assert ring.lookup(key) is not None
    clock.now += 0.5
    assert ring.lookup(key) is None


def test_unknown_and_removed_keys() -> None:
    ring = auth.KeyRing(clock=lambda: 0.0)
    key = auth.new_key("acme")
    assert ring.lookup(key) is None
    ring.add(principal(key))
    ring.remove(auth.hash_key(key))
    assert ring.lookup(key) is None


def test_shown_prefix_is_who_plus_four_characters() -> None:
    key = auth.new_key("acme")
    assert auth.shown_prefix(key) == key[: len("cpn_acme_") + 4]
    assert len(key) - len("cpn_acme_") == auth.SECRET_CHARS
