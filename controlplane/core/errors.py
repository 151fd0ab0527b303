"""The hub's error types. Three kinds, kept apart (CONVENTIONS, Errors):

- the caller sent something wrong -> :class:`RequestError` subclasses, 4xx naming the field;
- a peer (agent, NATS) failed or sent garbage -> :class:`PeerError` subclasses, counted, 502/503;
- we have a bug -> anything else, 500 with a request id, logged with its traceback.
"""

from __future__ import annotations

from typing import Any


class CpnError(Exception):
    """Base of every error cpn raises on purpose."""


class RequestError(CpnError):
    """The caller sent something wrong. ``status`` is the HTTP status, ``field`` the offending path."""

    status = 400
    code = "invalid_request"

    def __init__(self, message: str, *, field: str | None = None, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


class Unauthorized(RequestError):
    status = 401
    code = "invalid_api_key"


class Forbidden(RequestError):
    status = 403
    code = "forbidden"


class NotFound(RequestError):
    status = 404
    code = "not_found"


class Conflict(RequestError):
    status = 409
    code = "conflict"


class Unprocessable(RequestError):
    status = 422
    code = "unprocessable"


class TooLarge(RequestError):
    status = 413
    code = "body_too_large"


class RateLimited(RequestError):
    status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SloUnmeetable(RateLimited):
    """No candidate site's predicted time to first token meets the request's SLO (429, at once)."""

    code = "ttft_slo_unmeetable"


class Refused(RequestError):
    """A refusal with a body already written in the error shape plus figures (the market's 402
    ``budget_exceeded`` and 403 ``model_not_filed``): the gateway sends ``body`` as it is."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        error = body.get("error") or {}
        super().__init__(str(error.get("message", "")), field=error.get("param"), status=status,
                         code=str(error.get("code", "refused")))
        self.body = body


class NoCapacity(RequestError):
    """Nothing can serve the request within its constraints (503 with the reason)."""

    status = 503
    code = "no_capacity"


class RecordConflict(Conflict):
    """The replicated record changed under a write (another process wrote first): nothing was
    written; read again and retry (409)."""

    code = "record_conflict"


class RecordFenced(RecordConflict):
    """A write fenced by this process's leader epoch found a newer one: the process no longer leads
    (it has not heard yet). Nothing was written; a tenant's write may go again unfenced (409)."""


class RecordUnavailable(RequestError):
    """The replicated record has no quorum (too few NATS nodes up): the write was refused and its
    outcome is unknown; retry later with the same idempotency key (503 naming the reason)."""

    status = 503
    code = "record_unavailable"


class RecordNoQuorum(RecordUnavailable):
    """No quorum of the record answers this process: NATS nodes down, or this process cut off from
    the record's region (a gateway names where it stands in the 503)."""


class PeerError(CpnError):
    """A site or the bus failed us."""


class SiteUnreachable(PeerError):
    """Timeout or no responders on a site's subject."""


class SiteSilent(SiteUnreachable):
    """A site that acknowledges requests did not acknowledge one in time: it likely never got it."""


class SiteAbsent(SiteSilent):
    """Nobody listens on the site's subject ("no responders"): its agent is not connected right now
    (it died, or is moving to another NATS node). Passed over as a silent site is, until heard from."""


class SiteRefused(PeerError):
    """The site answered with an ErrorReply."""

    def __init__(self, code: str, message: str, retryable: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable


class BusUnavailable(PeerError):
    """Not connected to NATS right now."""


class StoreError(CpnError):
    """The database cannot be used as required (pragmas, migrations)."""
