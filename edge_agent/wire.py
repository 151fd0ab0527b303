"""The hub <-> agent contract: every message, every subject, every id rule.

Promises (keep them, other tools are written against this file):

- Rule 1: every message is a ``msgspec.Struct`` with an explicit ``tag``; a direction has one
  tagged union and one typed decoder, so a body decodes to exactly one message type or fails.
- Rule 2: every field added after the first release has a default; unknown fields are ignored
  (``forbid_unknown_fields`` is *off* here, unlike config structs), so old hubs and new agents, and
  the reverse, keep talking.  ``PROTO`` goes up only on an incompatible change.
- Rule 3: subjects are built only by the functions below, never by ad-hoc f-strings. The only
  variable token in a subject is the site id; job ids, request ids and timestamps live in bodies.
- Rule 4: ids are one NATS token: ``^[a-z0-9][a-z0-9_-]{0,62}$``.

This module imports nothing but the standard library and msgspec: a site installs little.
"""

from __future__ import annotations

import hashlib
import re
from typing import Literal, Union

import msgspec

PROTO = 1
"""Wire protocol version an agent sends in :class:`Register`."""

ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_ID_RE = re.compile(ID_PATTERN)

SUBJECT_ROOT = "cpn.v1.site"
EVENTS_STREAM = "CPN_EVENTS"
"""JetStream stream holding agent events (``cpn.v1.site.*.evt``)."""

Tier = Literal["hub", "regional", "edge"]
Health = Literal["ok", "degraded"]


class WireError(ValueError):
    """A message or id that does not follow this contract."""


# --------------------------------------------------------------------------- ids and subjects


def is_valid_id(value: object) -> bool:
    """True when ``value`` is a string usable as one NATS subject token and cpn id."""
    return isinstance(value, str) and _ID_RE.match(value) is not None


def check_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is a valid id, else raise :class:`WireError` naming ``what``."""
    if not is_valid_id(value):
        raise WireError(f"{what} {value!r} is not a valid id (want {ID_PATTERN})")
    assert isinstance(value, str)
    return value


def _subject(site: str, leaf: str) -> str:
    return f"{SUBJECT_ROOT}.{check_id(site, 'site')}.{leaf}"


def register_subject(site: str) -> str:
    """Request/reply, agent -> hub: :class:`Register` -> :class:`RegisterAck` | :class:`ErrorReply`."""
    return _subject(site, "register")


def heartbeat_subject(site: str) -> str:
    """Publish, agent -> hub, every ``heartbeat_s``: :class:`Heartbeat`."""
    return _subject(site, "hb")


def infer_subject(site: str) -> str:
    """Request/reply, hub -> agent: :class:`InferRequest` -> chunks/result/error."""
    return _subject(site, "infer")


def cmd_subject(site: str) -> str:
    """Request/reply, hub -> agent: commands -> :class:`Ack` | :class:`ErrorReply`."""
    return _subject(site, "cmd")


def event_subject(site: str) -> str:
    """JetStream ``CPN_EVENTS``, agent -> hub: attempt events, message id ``job:attempt:seq``."""
    return _subject(site, "evt")


def inbox_prefix(site: str) -> str:
    """Inbox prefix a site uses for its own request replies (its permissions allow only this)."""
    return f"_INBOX.{check_id(site, 'site')}"


HUB_INBOX_PREFIX = "_INBOX.hub"

# Wildcards the hub subscribes to.
REGISTER_WILDCARD = f"{SUBJECT_ROOT}.*.register"
HEARTBEAT_WILDCARD = f"{SUBJECT_ROOT}.*.hb"
EVENT_WILDCARD = f"{SUBJECT_ROOT}.*.evt"


def site_of(subject: str) -> str | None:
    """The site id inside a ``cpn.v1.site.<site>.<leaf>`` subject, or None if it is not one."""
    parts = subject.split(".")
    if len(parts) != 5 or ".".join(parts[:3]) != SUBJECT_ROOT or not is_valid_id(parts[3]):
        return None
    return parts[3]


def event_msg_id(job: str, attempt: int, seq: int, key: str = "") -> str:
    """JetStream de-duplication id (``Nats-Msg-Id``) of one attempt event.

    All sites' events share one stream, whose duplicate window is keyed by this id alone, and a
    site may set any header it likes. With ids that anyone can work out, a site could publish junk
    under the id another site's next event will carry, and JetStream would then drop the genuine
    event as a duplicate. So the id ends in a keyed hash under ``key``, the attempt's secret that
    the hub sends only to the attempt's site (``StartAttempt.event_key``, on the site's own command
    subject). ``key=""`` (a hub that predates it) gives the plain ``job:attempt:seq``.
    """
    plain = f"{job}:{attempt}:{seq}"
    if not key:
        return plain
    return plain + ":" + hashlib.blake2b(plain.encode(), key=key.encode()[:64], digest_size=12).hexdigest()


# --------------------------------------------------------------------------- agent -> hub


class ReplicaStatus(msgspec.Struct, kw_only=True):
    """One model replica loaded at a site."""

    model: str
    deployment: str = ""
    state: Literal["loading", "ready", "failed"] = "ready"
    cards: float = 0.0
    slots: int = 1
    busy: int = 0
    accelerator: str = ""
    """The card type the replica runs on ("": an agent from before the field; the hub then assumes
    the site's first type by name)."""


class AttemptRef(msgspec.Struct, kw_only=True):
    """A training attempt the agent believes is running (lets the hub fence stale ones)."""

    job: str
    attempt: int
    progress: float = 0.0


class Register(msgspec.Struct, tag="register", kw_only=True):
    """An agent announces itself (at start and after every reconnect)."""

    site: str
    tier: Tier = "edge"
    city: str = ""
    provider: str = ""
    accelerators: dict[str, int] = {}
    """Cards by accelerator type, e.g. ``{"H20": 8}``."""
    backends: list[str] = []
    """Inference backends available (``sim``, ``openai-http``)."""
    executors: list[str] = []
    """Training executors available (``sim``, ``process``)."""
    models: list[ReplicaStatus] = []
    attempts: list[AttemptRef] = []
    tee: bool = False
    lat: float | None = None
    lon: float | None = None
    agent_version: str = ""
    proto: int = PROTO
    infer_acks: bool = False
    """The agent answers ``InferRequest.ack`` with :class:`InferAccepted` (hubs may then fail over
    from a site that stays silent after ``site_ack_timeout_s`` instead of its full timeout)."""


class RegisterAck(msgspec.Struct, tag="register_ack", kw_only=True):
    hub: str
    heartbeat_s: float = 1.0
    known: bool = True
    """False when the site is not in the hub's layout (it is accepted, placed by its city)."""


class Heartbeat(msgspec.Struct, tag="hb", kw_only=True):
    """Soft state, published every ``heartbeat_s``; the hub rebuilds its view from these."""

    site: str
    seq: int
    free_cards: dict[str, float] = {}
    models: list[ReplicaStatus] = []
    attempts: list[AttemptRef] = []
    queue_depth: int = 0
    inflight: int = 0
    service_ms_p50: float = 0.0
    service_ms_p99: float = 0.0
    health: Health = "ok"
    draining: bool = False
    failed_cards: dict[str, int] = {}


class AttemptStarted(msgspec.Struct, tag="attempt_started", kw_only=True):
    job: str
    attempt: int
    seq: int
    site: str
    at: float
    resumed_from: str = ""


class Checkpointed(msgspec.Struct, tag="checkpointed", kw_only=True):
    job: str
    attempt: int
    seq: int
    site: str
    at: float
    progress: float
    """Fraction of the job's work done at this checkpoint, 0..1."""
    checkpoint: str
    """Where the checkpoint is (a path or URI the next attempt gets as ``CPN_RESUME_FROM``)."""


ExitReason = Literal["completed", "user_error", "infra_failure", "stopped"]


class AttemptExited(msgspec.Struct, tag="attempt_exited", kw_only=True):
    job: str
    attempt: int
    seq: int
    site: str
    at: float
    reason: ExitReason
    exit_code: int | None = None
    progress: float = 0.0
    detail: str = ""


AgentMessage = Union[Register, Heartbeat]
AttemptEvent = Union[AttemptStarted, Checkpointed, AttemptExited]

# --------------------------------------------------------------------------- hub -> agent


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str


class Sampling(msgspec.Struct, kw_only=True, omit_defaults=True):
    """How to sample, as the tenant asked (OpenAI's parameters; None: the backend's default).

    A backend that samples (``openai-http``) passes these on; the ``sim`` backend is deterministic
    and ignores them.
    """

    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class InferRequest(msgspec.Struct, tag="infer", kw_only=True):
    request_id: str
    model: str
    prompt: str = ""
    messages: list[ChatMessage] | None = None
    max_tokens: int = 16
    stream: bool = False
    tenant: str = ""
    deadline_ms: float = 0.0
    """Time the agent may spend before giving up (0: its own default)."""
    sampling: Sampling | None = None
    """None when the tenant set no sampling parameter (agents before this field ignore it)."""
    ack: bool = False
    """Send :class:`InferAccepted` once the request holds a slot, unless the answer itself goes out
    at once. Lets the hub tell a site that never got the request (a partition) from a slow one."""
    ack_after_ms: float = 0.0
    """With ``ack``: send :class:`InferAccepted` only if neither the answer nor a first chunk went
    out within this many milliseconds of the request taking its slot (0: at once, as agents before
    this field do). A fast answer then costs two messages, not three; the hub still hears from a
    slow site well within its acknowledgement timeout."""
    tail_ok: bool = False
    """A streaming answer's last text may ride in :attr:`InferResult.tail` instead of a chunk of
    its own (one message fewer when the model's last tokens and its end come together). Hubs
    before this field never set it, so they always get that text as chunks."""


class InferChunk(msgspec.Struct, tag="chunk", kw_only=True, omit_defaults=True):
    """One piece of a streamed answer, published to the request's reply inbox."""

    request_id: str
    index: int
    text: str
    site_ms: float | None = None
    """The first chunk only: the site's own time from taking the request to this chunk (ms), so the
    hub can tell its own time to the first chunk from the site's; None: not stated (older agents,
    later chunks)."""


class InferAccepted(msgspec.Struct, tag="accepted", kw_only=True):
    """The site has the request and a slot for it; the answer (or the first chunk) follows.

    Encoded with its tag first (msgspec always does), so the hub recognises it by its first bytes:
    :data:`ACCEPTED_PREFIX`.
    """

    request_id: str


ACCEPTED_PREFIX = b'{"type":"accepted"'

CHUNK_PREFIX = b'{"type":"chunk"'
"""The first bytes of an encoded :class:`InferChunk` (its tag comes first): the hub tells a stream
that comes in pieces from one answered whole by them, before decoding anything."""


class InferResult(msgspec.Struct, tag="result", kw_only=True):
    """The final answer (after the chunks, when streaming)."""

    request_id: str
    site: str
    model: str
    output: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    service_ms: float = 0.0
    finish_reason: str = "stop"
    tail: str = ""
    """Streamed text sent in no chunk (only when the request said ``tail_ok``): relayed after the
    chunks, before the end. ``output`` holds the whole text all the same."""


class ErrorReply(msgspec.Struct, tag="error", kw_only=True):
    """Every handler's answer when it cannot do what was asked."""

    code: str
    """Short machine-readable reason: ``bad_message``, ``unknown_model``, ``busy``, ``backend``,
    ``backend_unavailable``, ``backend_error``, ``timeout``, ``stale_attempt``, ``stale_epoch``,
    ``internal`` ...
    Hubs show tenants only the code (from a known list) and the site id, never ``message``."""
    message: str
    retryable: bool = False


class StartAttempt(msgspec.Struct, tag="start_attempt", kw_only=True):
    job: str
    attempt: int
    cards: int
    accelerator: str
    executor: str = "sim"
    command: list[str] = []
    """argv of the ``process`` executor; for ``container``, arguments after the image (empty: the
    image's own command)."""
    work_s: float = 3600.0
    """Work the job needs in total, in seconds of running on its cards."""
    progress: float = 0.0
    """Fraction already done (from the checkpoint being resumed)."""
    resume_from: str = ""
    checkpoint_interval_s: float = 600.0
    checkpoint_cost_s: float = 0.0
    restart_s: float = 0.0
    failure_rate_per_card_hour: float = 0.0
    time_scale: float = 1.0
    """Simulated seconds per wall second for the ``sim`` executor (demos run days in minutes)."""
    seed: int = 0
    tenant: str = ""
    event_key: str = ""
    """The attempt's secret for its events' JetStream ids (see :func:`event_msg_id`); the hub
    picks a fresh one per attempt. Sent only on the site's own command subject."""
    image: str = ""
    """The image reference the ``container`` executor runs ("" for other executors); the site
    allow-lists images."""
    epoch: int = 0
    """The sending controller's leader epoch (0: a hub without leader election). Agents refuse a
    command whose epoch is lower than the highest they have seen (``stale_epoch``)."""


class StopAttempt(msgspec.Struct, tag="stop_attempt", kw_only=True):
    job: str
    attempt: int
    checkpoint: bool = True
    reason: str = ""
    epoch: int = 0
    """The sending controller's leader epoch (0: a hub without leader election). Agents refuse a
    command whose epoch is lower than the highest they have seen (``stale_epoch``)."""


class LoadModel(msgspec.Struct, tag="load_model", kw_only=True):
    model: str
    deployment: str
    cards: float = 1.0
    slots: int = 4
    accelerator: str = ""
    """The accelerator type the hub planned the replica on ("": the agent picks the one with the
    most free cards). A site without enough free cards of it answers ``no_capacity``."""
    epoch: int = 0
    """The sending controller's leader epoch (0: a hub without leader election). Agents refuse a
    command whose epoch is lower than the highest they have seen (``stale_epoch``)."""


class UnloadModel(msgspec.Struct, tag="unload_model", kw_only=True):
    model: str
    deployment: str
    epoch: int = 0
    """The sending controller's leader epoch (0: a hub without leader election). Agents refuse a
    command whose epoch is lower than the highest they have seen (``stale_epoch``)."""


class Drain(msgspec.Struct, tag="drain", kw_only=True):
    on: bool = True
    epoch: int = 0
    """The sending controller's leader epoch (0: a hub without leader election). Agents refuse a
    command whose epoch is lower than the highest they have seen (``stale_epoch``)."""


class CancelInfer(msgspec.Struct, tag="cancel_infer", kw_only=True):
    """The tenant went away mid-stream: stop generating ``request_id``."""

    request_id: str


class Reregister(msgspec.Struct, tag="reregister", kw_only=True):
    """The hub heard a heartbeat from a site it holds no registration for (e.g. after the hub
    restarted): send :class:`Register` again."""

    hub: str = ""


class LeaderEpoch(msgspec.Struct, tag="leader_epoch", kw_only=True):
    """A controller that has just taken the lead says its epoch to every site at once, published
    (no reply) on each site's command subject: the agent raises the highest epoch it has seen, so
    a deposed leader's command is refused even before the new leader sent the site anything. An
    older agent counts it as a bad message and goes on."""

    epoch: int
    hub: str = ""


class Ack(msgspec.Struct, tag="ack", kw_only=True):
    detail: str = ""


Command = Union[StartAttempt, StopAttempt, LoadModel, UnloadModel, Drain, CancelInfer, Reregister, LeaderEpoch]
EPOCH_COMMANDS = (StartAttempt, StopAttempt, LoadModel, UnloadModel, Drain, LeaderEpoch)
"""The commands that carry the sending controller's leader ``epoch``."""
InferReply = Union[InferChunk, InferResult, InferAccepted, ErrorReply]
CommandReply = Union[Ack, ErrorReply]
RegisterReply = Union[RegisterAck, ErrorReply]

# --------------------------------------------------------------------------- codecs

ENCODER = msgspec.json.Encoder()
encode = ENCODER.encode

agent_message_decoder: msgspec.json.Decoder[AgentMessage] = msgspec.json.Decoder(AgentMessage)
event_decoder: msgspec.json.Decoder[AttemptEvent] = msgspec.json.Decoder(AttemptEvent)
infer_request_decoder = msgspec.json.Decoder(InferRequest)
infer_reply_decoder: msgspec.json.Decoder[InferReply] = msgspec.json.Decoder(InferReply)
command_decoder: msgspec.json.Decoder[Command] = msgspec.json.Decoder(Command)
command_reply_decoder: msgspec.json.Decoder[CommandReply] = msgspec.json.Decoder(CommandReply)
register_reply_decoder: msgspec.json.Decoder[RegisterReply] = msgspec.json.Decoder(RegisterReply)


def error_reply(code: str, message: str, *, retryable: bool = False) -> bytes:
    """Encoded :class:`ErrorReply`, for handlers answering a request they could not serve."""
    return encode(ErrorReply(code=code, message=message, retryable=retryable))
