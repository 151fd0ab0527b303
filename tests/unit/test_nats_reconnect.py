"""Which server a connection that lost its own tries next (edge_agent/nats_reconnect.py)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlparse

import pytest

from edge_agent.nats_reconnect import current_netloc, next_server


@dataclass
class Server:  # the shape of nats-py's Server snapshot the handler is given
    url: str
    reconnects: int = 0

    @property
    def uri(self):  # type: ignore[no-untyped-def]
        return urlparse(self.url)


POOL = [Server("nats://a:1"), Server("nats://b:2"), Server("nats://c:3")]


@pytest.mark.parametrize("left", ["a:1", "b:2", "c:3"])
def test_never_the_server_just_left_while_another_is_there(left: str) -> None:
    server, delay = next_server(POOL, left, wait_s=1.0)
    assert server.uri.netloc != left and delay == 0.0


def test_the_one_server_is_tried_again_after_the_wait_once_it_failed() -> None:
    only = [Server("nats://a:1", reconnects=2)]
    assert next_server(only, "a:1", wait_s=1.0, jitter=0.25) == (only[0], 1.25)


def test_of_the_others_the_one_that_failed_least_since_it_last_worked() -> None:
    pool = [Server("nats://a:1"), Server("nats://b:2", reconnects=3), Server("nats://c:3", reconnects=1)]
    server, delay = next_server(pool, "a:1", wait_s=0.5)
    assert server.uri.netloc == "c:3" and delay == 0.5


def test_current_netloc_reads_the_clients_server_or_nothing() -> None:
    class Client:
        _current_server = POOL[1]

    assert current_netloc(Client()) == "b:2"
    assert current_netloc(None) == "" and current_netloc(object()) == ""
