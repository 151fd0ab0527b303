"""The agent's error types, kept apart as CONVENTIONS asks:

- the operator wrote something wrong -> :class:`ConfigError` (names the key; ``cpn agent`` exits 2);
- a peer (NATS, the hub, a local inference server) failed -> :class:`BusError` subclasses and
  :class:`BackendError`, translated at the adapter so no ``nats`` or ``aiohttp`` exception leaks;
- anything else is a bug, answered with ``ErrorReply(code="internal")`` and logged with a traceback.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """A configuration value is wrong; the message names the key (e.g. ``$.backend.sim.slots``)."""


class BusError(AgentError):
    """NATS could not carry a message."""


class NotConnected(BusError):
    """Not connected to NATS right now (or the connection is closed)."""


class RequestTimeout(BusError):
    """A request got no answer in time."""


class NoResponders(BusError):
    """Nobody subscribes to the subject (hub down, or the JetStream stream does not exist)."""


class BackendError(AgentError):
    """The inference backend could not serve a request; maps 1:1 onto a ``wire.ErrorReply``.

    ``code`` and ``message`` go to the hub (and may reach a tenant): never a URL, host name or the
    local server's own text. ``detail`` holds those, for the site's log only.
    """

    def __init__(self, code: str, message: str, *, retryable: bool = False, detail: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable
        self.detail = detail
