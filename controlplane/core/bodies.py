"""Decoding request bodies: one rule for every endpoint.

- an empty body or malformed JSON is a 400 (``empty_body`` / ``malformed_json``);
- a field cpn does not take is a 422 naming it (``unknown_field``), and a cpn-internal one
  (``tenant``, ``site``, ...) a 422 saying where its value comes from instead (``forbidden_field``);
- a missing field or a bad value is a 400 naming the field path (``invalid_field``).

Pure: msgspec only. The gateway, the OpenAI shapes and the deployment spec all decode through
:func:`decode`, so the same mistake gets the same answer everywhere.
"""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec

from controlplane.core.errors import RequestError, Unprocessable

T = TypeVar("T")

INTERNAL_FIELDS = {
    "tenant": "it is taken from your API key",
    "origin": "send the X-CPN-Origin header",
    "tenant_id": "it is taken from your API key",
    "attempt": "the hub numbers attempts",
    "budget_ms": "send the X-CPN-Budget-Ms header",
    "site": "the router chooses the site",
    "request_id": "the gateway assigns it",
    "deadline_ms": "it follows from the latency budget",
}
"""Body fields that belong to cpn, not the tenant, and where their value comes from instead."""

_AT_RE = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_UNKNOWN_RE = re.compile(r"^Object contains unknown field `(?P<name>[^`]+)`$")
_MISSING_RE = re.compile(r"^Object missing required field `(?P<name>[^`]+)`$")
_PREFIX_RE = re.compile(r"^(?P<name>[a-z_][a-z0-9_.\[\]]*): ")


def error_parts(exc: msgspec.ValidationError) -> tuple[str, str | None]:
    """Turn a msgspec validation error into ``(message, field path)`` for a 4xx body.

    Works for any msgspec-decoded body (also used by ``replicas.decode_spec``).  The path is in
    OpenAI's ``param`` style (``messages[0].role``); it is None when the error concerns the whole
    body.  The message starts with the path so a human sees the field without the ``param`` key.
    """
    m = _AT_RE.match(str(exc))
    assert m is not None  # the pattern matches any string
    msg, path = m.group("msg"), (m.group("path") or "").lstrip(".")
    field: str | None = path or None
    if (u := _UNKNOWN_RE.match(msg)) is not None:
        name = u.group("name")
        field = f"{path}.{name}" if path else name
        hint = INTERNAL_FIELDS.get(name) if not path else None
        if hint is not None:
            return f"{field}: cpn-internal field, not accepted in the body ({hint})", field
        return f"{field}: unknown field", field
    if (r := _MISSING_RE.match(msg)) is not None:
        name = r.group("name")
        field = f"{path}.{name}" if path else name
        return f"{field}: required field missing", field
    if field is None and (p := _PREFIX_RE.match(msg)) is not None:
        return msg, p.group("name")  # a __post_init__ check that named its field
    return (f"{field}: {msg}" if field else msg), field


_DECODERS: dict[type, msgspec.json.Decoder] = {}  # type: ignore[type-arg]
"""A decoder per body type, built once (cheaper per call than ``msgspec.json.decode(type=...)``)."""


def decode(body: bytes, decoder: msgspec.json.Decoder[T] | type[T]) -> T:
    """Decode ``body`` with ``decoder`` (a typed Decoder or a type) under the rule above.

    Raises:
        RequestError: 400 for empty or malformed bodies and bad values, 422 (Unprocessable) for
            unknown or cpn-internal fields; ``field`` names the path.
    """
    if not body:
        raise RequestError("request body is empty; expected a JSON object", code="empty_body")
    if not isinstance(decoder, msgspec.json.Decoder):
        cached = _DECODERS.get(decoder)
        if cached is None:
            cached = _DECODERS[decoder] = msgspec.json.Decoder(decoder)
        decoder = cached
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        message, field = error_parts(exc)
        if "cpn-internal" in message:
            raise Unprocessable(message, field=field, code="forbidden_field") from None
        if message.endswith("unknown field"):
            raise Unprocessable(message, field=field, code="unknown_field") from None
        raise RequestError(message, field=field, status=400, code="invalid_field") from None
    except msgspec.DecodeError as exc:
        raise RequestError(f"malformed JSON: {exc}", status=400, code="malformed_json") from None
