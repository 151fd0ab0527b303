"""``AgentConfig``: everything one site's agent needs, decoded from TOML or built from CLI flags.

Promises:

- Rule 1: the config is a frozen ``msgspec.Struct`` tree with ``forbid_unknown_fields``, so a
  misspelt key is rejected, never ignored; every error is a :class:`~edge_agent.errors.ConfigError`
  whose message names the key (``$.backend.sim.slots``) and says what is wrong.
- Rule 2: defaults are the production ones (1 s heartbeats, 1 s pings, reconnect forever); tests
  shorten them through the same fields an operator would use.
- ``deploy/site.example.toml`` documents every key; keep it in step with this file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from edge_agent import wire
from edge_agent.errors import ConfigError

Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Slots = Annotated[int, msgspec.Meta(ge=1)]

BACKENDS = ("sim", "openai-http")
EXECUTORS = ("sim", "process")


class _Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    pass


class BusConfig(_Config, frozen=True):
    """NATS connection tuning. The defaults notice a dead server within ``ping_interval_s *
    (max_outstanding_pings + 1)`` = 3 s and reconnect forever."""

    ping_interval_s: Positive = 1.0
    max_outstanding_pings: Annotated[int, msgspec.Meta(ge=1)] = 2
    connect_timeout_s: Positive = 2.0
    reconnect_wait_s: NonNegative = 1.0
    """Base wait between reconnect attempts to one server."""
    reconnect_jitter_s: NonNegative = 0.5
    """Up to this much random extra wait, so 60 sites do not reconnect in lockstep."""
    register_timeout_s: Positive = 2.0
    register_backoff_max_s: Positive = 10.0
    event_timeout_s: Positive = 2.0
    """How long to wait for JetStream's PubAck before retrying an event."""
    event_backoff_max_s: Positive = 5.0


class SimBackendConfig(_Config, frozen=True):
    ttft_ms: NonNegative = 30.0
    """Time to first token."""
    per_token_ms: NonNegative = 5.0
    """Time between later tokens."""
    slots: Slots = 4
    """Concurrent requests per replica (a replica's own ``slots`` overrides it)."""
    load_time_s: NonNegative = 0.0
    """Time a LoadModel stays in state ``loading`` before ``ready``."""
    answer_words: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Natural answer length: stop (finish_reason "stop") after this many words; 0 = always
    ``max_tokens`` words (finish_reason "length")."""


class OpenAIHttpConfig(_Config, frozen=True):
    url: str = ""
    """Base URL of the site-local OpenAI-compatible server, e.g. ``http://127.0.0.1:8000``."""
    api_key: str = ""
    timeout_s: Positive = 60.0
    models: dict[str, str] = {}
    """cpn model name -> the name the local server knows it by (identity when missing)."""
    slots: Slots = 16
    load_time_s: NonNegative = 0.0


class BackendConfig(_Config, frozen=True):
    kind: Literal["sim", "openai-http"] = "sim"
    request_timeout_s: Positive = 120.0
    """Longest a request may run when the hub gives no ``deadline_ms``."""
    sim: SimBackendConfig = SimBackendConfig()
    openai_http: OpenAIHttpConfig = msgspec.field(name="openai-http", default_factory=OpenAIHttpConfig)


class ModelConfig(_Config, frozen=True):
    """A model replica to load at start (deployment ``local``)."""

    name: str
    cards: Positive = 1.0
    slots: Annotated[int, msgspec.Meta(ge=0)] = 0
    """0: the backend's default."""


class ProcessExecutorConfig(_Config, frozen=True):
    work_dir: str = ""
    """Working directory of training commands; empty: ``<data_dir>/work``."""
    grace_s: NonNegative = 10.0
    """Time between SIGTERM and SIGKILL when an attempt is stopped."""
    stderr_lines: Annotated[int, msgspec.Meta(ge=0)] = 20
    """Last stderr lines carried in a ``user_error`` event's detail."""


class ExecutorsConfig(_Config, frozen=True):
    enabled: list[Literal["sim", "process"]] = msgspec.field(default_factory=lambda: ["sim", "process"])
    process: ProcessExecutorConfig = ProcessExecutorConfig()


class AgentConfig(_Config, frozen=True):
    """One site's agent. See ``deploy/site.example.toml`` for every key with an example."""

    site: str
    nats: str | list[str] = "nats://127.0.0.1:4222"
    user: str = ""
    password: str = ""
    tier: wire.Tier = "edge"
    city: str = ""
    provider: str = ""
    region: str = ""
    lat: float | None = None
    lon: float | None = None
    tee: bool = False
    accelerators: dict[str, Annotated[int, msgspec.Meta(ge=0)]] = {}
    heartbeat_s: Positive = 1.0
    data_dir: str = ""
    """Where the event outbox and training checkpoints live; empty: events are kept in memory only."""
    stop_grace_s: NonNegative = 5.0
    """On a draining stop, how long to wait for in-flight requests and unsent events."""
    bus: BusConfig = BusConfig()
    backend: BackendConfig = BackendConfig()
    models: list[ModelConfig] = []
    executors: ExecutorsConfig = ExecutorsConfig()
    tls_ca: str = ""
    """CA file that signed the NATS server's certificate: TLS on, the server verified (host name
    too). Empty: plain (a leaf node on the site's own loopback, or ``cpn up``)."""
    tls_cert: str = ""
    """Client certificate, with ``tls_key``, for a server that verifies clients (mutual TLS)."""
    tls_key: str = ""

    def __post_init__(self) -> None:
        # msgspec wraps these ValueErrors in a ValidationError; name the key ourselves.
        if not wire.is_valid_id(self.site):
            raise ValueError(f"$.site: {self.site!r} is not a valid site id (want {wire.ID_PATTERN})")
        if not self.servers:
            raise ValueError("$.nats: at least one server URL is needed")
        for url in self.servers:
            if "://" not in url:
                raise ValueError(f"$.nats: {url!r} is not a URL (want nats://host:port)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("$.tls_cert: tls_cert and tls_key go together")
        if self.tls_cert and not self.tls_ca:
            raise ValueError("$.tls_ca: required with tls_cert (the server must be verified too)")
        if self.lat is not None and not -90 <= self.lat <= 90:
            raise ValueError(f"$.lat: {self.lat} is outside -90..90")
        if self.lon is not None and not -180 <= self.lon <= 180:
            raise ValueError(f"$.lon: {self.lon} is outside -180..180")
        if self.backend.kind == "openai-http" and not self.backend.openai_http.url:
            raise ValueError("$.backend.openai-http.url: required when backend.kind is 'openai-http'")
        total = sum(self.accelerators.values())
        for i, model in enumerate(self.models):
            if not model.name.strip():
                raise ValueError(f"$.models[{i}].name: must not be empty")
        wanted = sum(m.cards for m in self.models)
        if wanted > total + 1e-9:
            raise ValueError(f"$.models: preloaded models need {wanted:g} cards, the site has {total}")

    def __repr__(self) -> str:
        # Configs end up in logs and tracebacks: never show the NATS password or backend key.
        shown = msgspec.structs.replace(
            self, password="***" if self.password else "",
            backend=msgspec.structs.replace(self.backend, openai_http=msgspec.structs.replace(
                self.backend.openai_http, api_key="***" if self.backend.openai_http.api_key else "")))
        fields = ", ".join(f"{f}={getattr(shown, f)!r}" for f in self.__struct_fields__)
        return f"AgentConfig({fields})"

    @property
    def servers(self) -> list[str]:
        """NATS server URLs as a list."""
        return [self.nats] if isinstance(self.nats, str) else list(self.nats)

    @property
    def data_path(self) -> Path | None:
        return Path(self.data_dir) if self.data_dir else None


def _wrap(exc: msgspec.ValidationError | msgspec.DecodeError, source: str) -> ConfigError:
    return ConfigError(f"{source}: {exc}")


def loads(text: str | bytes, source: str = "<config>") -> AgentConfig:
    """Decode TOML text into an :class:`AgentConfig`.

    Raises:
        ConfigError: naming the offending key, e.g. ``Object contains unknown field `slot` - at
            `$.backend.sim```.
    """
    data = text.encode() if isinstance(text, str) else text
    try:
        return msgspec.toml.decode(data, type=AgentConfig)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise _wrap(exc, source) from None


def load(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and decode a TOML config file (see :func:`loads`)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return loads(data, str(path))


def parse_cards(text: str) -> dict[str, int]:
    """``"H20=8,910B=4"`` -> ``{"H20": 8, "910B": 4}``; raises ConfigError naming ``--cards``."""
    cards: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, count = part.partition("=")
        try:
            value = int(count)
        except ValueError:
            value = -1
        if not sep or not name.strip() or value < 0:
            raise ConfigError(f"--cards: {part!r} is not TYPE=COUNT (e.g. H20=8)")
        cards[name.strip()] = value
    return cards


def parse_model(text: str) -> dict[str, object]:
    """``"qwen2-7b:0.5:4"`` -> ``{"name": "qwen2-7b", "cards": 0.5, "slots": 4}`` (cards, slots optional)."""
    name, *rest = text.split(":")
    if not name or len(rest) > 2:
        raise ConfigError(f"--model: {text!r} is not NAME[:cards[:slots]]")
    out: dict[str, object] = {"name": name}
    try:
        if rest:
            out["cards"] = float(rest[0])
        if len(rest) > 1:
            out["slots"] = int(rest[1])
    except ValueError:
        raise ConfigError(f"--model: {text!r} is not NAME[:cards[:slots]]") from None
    return out


def from_flags(
    *,
    site: str,
    nats: str | list[str] = "nats://127.0.0.1:4222",
    cards: str = "",
    tier: str = "edge",
    city: str = "",
    provider: str = "",
    region: str = "",
    user: str = "",
    password: str = "",
    backend: str = "sim",
    backend_url: str = "",
    models: list[str] | None = None,
    data_dir: str = "",
    heartbeat_s: float = 1.0,
) -> AgentConfig:
    """Build a config from ``cpn agent`` flags, validated exactly like a TOML file.

    Raises:
        ConfigError: naming the flag or key that is wrong.
    """
    raw: dict[str, object] = {
        "site": site,
        "nats": nats,
        "accelerators": parse_cards(cards),
        "tier": tier,
        "city": city,
        "provider": provider,
        "region": region,
        "user": user,
        "password": password,
        "heartbeat_s": heartbeat_s,
        "data_dir": data_dir,
        "backend": {"kind": backend, "openai-http": {"url": backend_url}},
        "models": [parse_model(m) for m in models or []],
    }
    return from_dict(raw, "flags")


def from_dict(raw: dict[str, object], source: str = "<dict>") -> AgentConfig:
    """Validate a plain dict (as TOML would decode) into an :class:`AgentConfig` (``cpn up`` uses it)."""
    try:
        return msgspec.convert(raw, type=AgentConfig)
    except msgspec.ValidationError as exc:
        raise _wrap(exc, source) from None


def to_dict(config: AgentConfig) -> dict[str, object]:
    """The config as plain builtins (TOML-shaped, with ``openai-http`` spelt as in files)."""
    out = msgspec.to_builtins(config)
    assert isinstance(out, dict)
    return out
