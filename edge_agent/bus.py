"""The agent's only NATS code: one connection per site, translated into the agent's own terms.

Promises:

- Connection settings follow DESIGN §3: ping every ``ping_interval_s`` (0.5 s) with 2 outstanding, so
  a hung (paused, frozen) server is left within 1.5 s for another server of the cluster (never the
  one just left: :mod:`edge_agent.nats_reconnect`); reconnect forever with a jittered wait; replies come back
  on the site's own inbox prefix (``wire.inbox_prefix(site)``; a site's permissions allow no other);
  the connection is named ``cpn-agent-<site>``.
- No ``nats`` type or exception leaves this module: messages arrive as :class:`Incoming`, failures
  as :class:`~edge_agent.errors.BusError` subclasses.
- Disconnects, reconnects and errors are logged as structured lines and counted in ``counters``;
  listeners registered with :meth:`AgentBus.on_reconnected` run after every reconnect.
- Several buses live in one process without sharing anything (``cpn up`` runs ~60 agents).
- With ``tls_ca`` in the config the connection is TLS, the server verified against that CA and
  its host name (``edge_agent.tls``); a server without TLS or with another CA is not spoken to.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import nats
import nats.errors
from nats.aio.client import Client

from edge_agent import nats_reconnect, tls, wire
from edge_agent.config import AgentConfig
from edge_agent.errors import BusError, NoResponders, NotConnected, RequestTimeout
from edge_agent.logs import log
from edge_agent.nats_barrier import barrier
from edge_agent.nats_fast import publish_soon, subscribe_now


class Incoming(msgspec.Struct, frozen=True):
    """One message delivered to a subscription (a frozen msgspec Struct: one is built per message)."""

    subject: str
    data: bytes
    reply: str
    headers: dict[str, str] | None


Handler = Callable[[Incoming], Awaitable[None] | None]
"""Subscription callback, called from the connection's reader. It must not block: spawn a task for
real work. It may return an awaitable that finishes at once (e.g. publishing an answer it already
has); that runs as a task."""


class AgentBus:
    """One site's NATS connection.

    Args:
        config: the agent config (servers, credentials, bus tuning, site id).
        rng: source of reconnect jitter (seeded in tests if they care).
    """

    def __init__(self, config: AgentConfig, rng: random.Random | None = None) -> None:
        self.site = config.site
        self._config = config
        self._rng = rng or random.Random()
        self._nc: Client | None = None
        self._subs: list[Any] = []
        self._pending_tasks: set[asyncio.Future[None]] = set()
        self._reconnect_listeners: list[Callable[[], Awaitable[None] | None]] = []
        self._connected = asyncio.Event()
        self._closing = False
        self._last_error = ""
        self._repeats = 0
        self.counters: dict[str, int] = {"disconnects": 0, "reconnects": 0, "errors": 0}

    def __repr__(self) -> str:
        state = "connected" if self.is_connected else ("closed" if self._nc is None else "disconnected")
        return (
            f"<AgentBus site={self.site} {state} disconnects={self.counters['disconnects']} "
            f"reconnects={self.counters['reconnects']} errors={self.counters['errors']}>"
        )

    # ------------------------------------------------------------------ connection

    @property
    def is_connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    @property
    def server(self) -> str:
        """``host:port`` of the NATS server this site is connected to ("" while not connected)."""
        return self._server_name()

    async def wait_connected(self) -> None:
        """Return once connected (at once if connected now)."""
        await self._connected.wait()

    def on_reconnected(self, listener: Callable[[], Awaitable[None] | None]) -> None:
        """Call ``listener`` after every reconnect (not after the first connect)."""
        self._reconnect_listeners.append(listener)

    async def connect(self) -> None:
        """Connect, retrying forever (with the configured wait) until a server answers.

        Cancelling the caller abandons the attempt and releases the half-open client.
        """
        cfg = self._config.bus
        nc = Client()
        self._nc = nc
        options: dict[str, Any] = {
            "servers": self._config.servers,
            "name": f"cpn-agent-{self.site}",
            "inbox_prefix": wire.inbox_prefix(self.site),
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": cfg.reconnect_wait_s,
            "connect_timeout": cfg.connect_timeout_s,
            "ping_interval": cfg.ping_interval_s,
            "max_outstanding_pings": cfg.max_outstanding_pings,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
            "closed_cb": self._on_closed,
            "reconnect_to_server_handler": self._pick_server,
        }
        if self._config.user:
            options["user"] = self._config.user
            options["password"] = self._config.password
        if self._config.tls_ca:
            # Verified TLS: the CA alone is trusted and the host name checked; tls:// so that a
            # server offering no TLS is refused rather than spoken to in clear.
            cfg_ = self._config
            options["tls"] = tls.client_context(cfg_.tls_ca, cfg_.tls_cert or None, cfg_.tls_key or None)
            options["servers"] = ["tls://" + u.split("://", 1)[-1] for u in cfg_.servers]
        try:
            await nc.connect(**options)
        except BaseException:
            self._nc = None
            self._closing = True
            try:
                await nc.close()
            except Exception:
                pass
            raise
        self._connected.set()
        self._last_error = ""
        log(logging.INFO, "nats_connected", site=self.site, server=self._server_name())

    def _pick_server(self, servers: list[Any], info: dict[str, Any]) -> tuple[Any, float]:
        # nats-py has no reconnect jitter of its own: this handler adds it. Another server than the
        # one just left (a frozen one would hold us for connect_timeout_s); the first retry of a
        # server after a disconnect goes at once (a blip), later ones wait base + jitter.
        cfg = self._config.bus
        left = nats_reconnect.current_netloc(self._nc)
        return nats_reconnect.next_server(servers, left, wait_s=cfg.reconnect_wait_s,
                                          jitter=self._rng.uniform(0.0, cfg.reconnect_jitter_s))

    def _server_name(self) -> str:
        nc = self._nc
        url = getattr(nc, "connected_url", None) if nc is not None else None
        return getattr(url, "netloc", "") or ""

    async def _on_error(self, exc: Exception) -> None:
        self.counters["errors"] += 1
        # While a server is down the same error repeats every reconnect wait: say it once, then
        # once a minute or so, not every second.
        text = f"{type(exc).__name__}: {exc}"
        repeated = text == self._last_error
        self._repeats = self._repeats + 1 if repeated else 0
        self._last_error = text
        level = logging.WARNING if not repeated or self._repeats % 60 == 0 else logging.DEBUG
        log(level, "nats_error", site=self.site, error=type(exc).__name__, detail=str(exc) or None,
            repeated=self._repeats or None)

    async def _on_disconnected(self) -> None:
        self._connected.clear()
        if self._closing:
            return  # our own close(), not news
        self.counters["disconnects"] += 1
        log(logging.WARNING, "nats_disconnected", site=self.site)

    async def _on_closed(self) -> None:
        self._connected.clear()

    async def _on_reconnected(self) -> None:
        self._connected.set()
        self._last_error = ""
        self.counters["reconnects"] += 1
        log(logging.INFO, "nats_reconnected", site=self.site, server=self._server_name())
        for listener in list(self._reconnect_listeners):
            try:
                result = listener()
                if result is not None:
                    await result
            except Exception as exc:  # a listener's bug must not stop nats-py's reconnect task
                log(logging.ERROR, "reconnect_listener_failed", site=self.site, error=repr(exc))

    async def close(self) -> None:
        """Unsubscribe and close the connection (pending publishes are flushed if connected)."""
        nc, self._nc = self._nc, None
        self._closing = True
        self._connected.clear()
        self._subs.clear()
        if nc is None:
            return
        try:
            if nc.is_connected:
                await nc.flush(timeout=1)
        except Exception:
            pass
        try:
            await nc.close()
        except Exception as exc:
            log(logging.WARNING, "nats_close_failed", site=self.site, error=repr(exc))

    # ------------------------------------------------------------------ messaging

    def _client(self) -> Client:
        if self._nc is None or self._nc.is_closed:
            raise NotConnected(f"site {self.site}: no NATS connection")
        return self._nc

    async def subscribe(self, subject: str, handler: Handler) -> None:
        """Deliver every message on ``subject`` to ``handler`` (re-subscribed after reconnects).

        Messages are handed over at once from nats-py's reader (:class:`~edge_agent.nats_fast.Dispatch`:
        no queue, no task per message); an awaitable the handler returns runs as a task of its own."""
        nc = self._client()
        pending_tasks = self._pending_tasks

        def deliver(msg: Any) -> None:
            pending = handler(Incoming(subject=msg.subject, data=msg.data, reply=msg.reply or "", headers=msg.headers))
            if pending is not None:
                task = asyncio.ensure_future(pending)
                pending_tasks.add(task)
                task.add_done_callback(pending_tasks.discard)

        sub = await subscribe_now(nc, subject, deliver)
        self._subs.append(sub)

    async def flush(self, timeout_s: float = 2.0) -> None:
        """Wait until the server has processed everything sent so far (e.g. subscriptions)."""
        nc = self._client()
        try:
            await barrier(nc, timeout_s)  # one flush() is not enough: see nats_barrier
        except nats.errors.Error as exc:
            raise NotConnected(f"site {self.site}: flush failed: {exc or type(exc).__name__}") from None

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        """Publish one message.

        Raises:
            NotConnected: disconnected right now (nothing is queued: callers decide whether to retry).
        """
        nc = self._client()
        if not nc.is_connected:
            raise NotConnected(f"site {self.site}: disconnected from NATS")
        if headers is None and publish_soon(nc, subject, data):
            return
        try:
            await nc.publish(subject, data, headers=headers)
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError,
                nats.errors.OutboundBufferLimitError, nats.errors.ConnectionDrainingError) as exc:
            raise NotConnected(f"site {self.site}: {type(exc).__name__}") from None
        except nats.errors.Error as exc:
            raise BusError(f"site {self.site}: publish on {subject} failed: {exc}") from None

    def publish_nowait(self, subject: str, data: bytes) -> bool:
        """Queue one message to go out at the end of this pass of the event loop; False, having
        queued nothing, when the connection is not plainly up (then :meth:`publish` says why)."""
        nc = self._nc
        return nc is not None and publish_soon(nc, subject, data)

    async def request(
        self, subject: str, data: bytes, *, timeout_s: float, headers: dict[str, str] | None = None
    ) -> bytes:
        """Send a request and return the reply body.

        Raises:
            NotConnected: disconnected right now.
            NoResponders: nobody listens on ``subject``.
            RequestTimeout: no answer within ``timeout_s``.
        """
        nc = self._client()
        if not nc.is_connected:
            raise NotConnected(f"site {self.site}: disconnected from NATS")
        try:
            msg = await nc.request(subject, data, timeout=timeout_s, headers=headers)
        except nats.errors.NoRespondersError:
            raise NoResponders(f"no responders on {subject}") from None
        except nats.errors.TimeoutError:
            raise RequestTimeout(f"no reply on {subject} within {timeout_s:g} s") from None
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError,
                nats.errors.OutboundBufferLimitError, nats.errors.ConnectionDrainingError) as exc:
            raise NotConnected(f"site {self.site}: {type(exc).__name__}") from None
        except nats.errors.Error as exc:
            raise BusError(f"request on {subject} failed: {exc}") from None
        return bytes(msg.data)
