"""``AgentConfig``: everything one site's agent needs, decoded from TOML or built from CLI flags.

Promises:

- Rule 1: the config is a frozen ``msgspec.Struct`` tree with ``forbid_unknown_fields``, so a
  misspelt key is rejected, never ignored; every error is a :class:`~edge_agent.errors.ConfigError`
  whose message names the key (``$.backend.sim.slots``) and says what is wrong.
- Rule 2: defaults are the production ones (1 s heartbeats, 0.5 s pings, reconnect forever); tests
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
EXECUTORS = ("sim", "process", "container")


class _Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    pass


class BusConfig(_Config, frozen=True):
    """NATS connection tuning. The defaults notice a dead or frozen server within ``ping_interval_s *
    (max_outstanding_pings + 1)`` = 1.5 s (a PING of a few bytes every 0.5 s per idle connection),
    move to another server of the cluster and reconnect forever."""

    ping_interval_s: Positive = 0.5
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
    probe_s: NonNegative = 5.0
    """How often to check that the server answers (``GET probe_path``); while it does not, the
    site reports its replicas not ready. 0: never check (and never mark it down)."""
    probe_timeout_s: Positive = 2.0
    """How long one check may take before it counts as a failure."""
    probe_path: str = "/v1/models"
    """Path checked; any 2xx answer means the server is up (vLLM and SGLang also serve ``/health``)."""


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
    """The ``process`` executor (development): allow-listed commands in a bubblewrap sandbox."""

    commands: list[str] = []
    """Programs a job may run, as absolute paths; a job's ``argv[0]`` is resolved (``PATH`` and
    symlinks) and must be one of them (each resolved the same way). Empty: every command is refused."""
    user: str = "nobody"
    """Unprivileged user (name or uid) the command runs as; its primary group is used."""
    work_dir: str = ""
    """Directory the command starts in (read-only in the sandbox); empty: its checkpoint dir."""
    grace_s: NonNegative = 10.0
    """Time between SIGTERM and SIGKILL when an attempt is stopped."""
    stderr_lines: Annotated[int, msgspec.Meta(ge=0)] = 20
    """Last stderr lines carried in a ``user_error`` event's detail."""
    memory_mib: Annotated[int, msgspec.Meta(ge=16)] = 4096
    """Address-space limit (RLIMIT_AS) of each process of an attempt."""
    nproc: Annotated[int, msgspec.Meta(ge=1)] = 256
    """Process limit (RLIMIT_NPROC, counted per user across the host)."""
    nofile: Annotated[int, msgspec.Meta(ge=16)] = 1024
    """Open-files limit (RLIMIT_NOFILE)."""
    hide: list[str] = []
    """Further host paths to cover with an empty tmpfs (the agent's data dir, ``/root`` and
    ``/home`` always are)."""
    bwrap: str = "bwrap"
    """The bubblewrap binary (name on ``PATH`` or absolute path)."""


class DeviceConfig(_Config, frozen=True):
    """Device nodes of one accelerator type, passed to a container only for the cards it was given."""

    per_card: str
    """Pattern with ``{index}``, e.g. ``/dev/nvidia{index}`` or ``/dev/davinci{index}``."""
    shared: list[str] = []
    """Nodes every attempt on this accelerator needs, e.g. ``/dev/nvidiactl``, ``/dev/nvidia-uvm``."""


class ContainerExecutorConfig(_Config, frozen=True):
    """The ``container`` executor: allow-listed images under podman, one sandbox per attempt."""

    images: list[str] = []
    """Images a job may name: exact references (``registry.example/team/train:1``) or prefixes
    ending in ``*`` (``localhost/*``). Empty: every image is refused."""
    user: str = "65534:65534"
    """``uid:gid`` the job runs as inside the container (never root)."""
    memory_mib_per_card: Annotated[int, msgspec.Meta(ge=8)] = 16384
    """Memory limit (cgroup) per card the attempt holds; exceeding it kills the job."""
    cpus_per_card: Positive = 4.0
    """CPU limit per card (capped at the host's CPU count)."""
    pids_limit: Annotated[int, msgspec.Meta(ge=8)] = 1024
    """Processes and threads per attempt."""
    checkpoint_mount: str = "/cpn/checkpoint"
    """Where the job's checkpoint dir appears inside the container (the only writable mount)."""
    devices: dict[str, DeviceConfig] = {}
    """Accelerator type -> its device nodes. A type without an entry gets no device."""
    pull: Literal["never", "missing", "newer", "always"] = "never"
    """podman ``--pull`` policy; "never": the site pulls the images it allows ahead of time."""
    grace_s: NonNegative = 10.0
    """``podman stop -t``: time between SIGTERM and SIGKILL when an attempt is stopped."""
    stderr_lines: Annotated[int, msgspec.Meta(ge=0)] = 20
    podman: str = "podman"
    containers_conf: str = ""
    """A containers.conf for podman (``CONTAINERS_CONF``); empty: podman's own default."""
    root: str = ""
    """podman ``--root`` (image and container storage); empty: podman's default."""
    runroot: str = ""
    """podman ``--runroot``; empty: podman's default."""
    podman_args: list[str] = []
    """Extra global podman arguments, e.g. ``["--storage-driver", "overlay"]``."""

    def __post_init__(self) -> None:
        uid, sep, gid = self.user.partition(":")
        if not (uid.isdigit() and (not sep or gid.isdigit())) or int(uid) == 0:
            raise ValueError(f"$.executors.container.user: {self.user!r} is not a non-root uid[:gid]")
        if not self.checkpoint_mount.startswith("/") or self.checkpoint_mount == "/":
            raise ValueError("$.executors.container.checkpoint_mount: want an absolute path below /")
        for name, dev in self.devices.items():
            if "{index}" not in dev.per_card:
                raise ValueError(f"$.executors.container.devices.{name}.per_card: needs '{{index}}'")


class SlurmExecutorConfig(_Config, frozen=True):
    """Command jobs submitted to the site's own Slurm (see docs/agent.md, "The slurm executor")."""

    commands: list[str] = []
    """Allowed ``argv[0]`` values, matched exactly; empty: every command job is refused."""
    partition: str = ""
    account: str = ""
    qos: str = ""
    gres: dict[str, str] = {}
    """Accelerator -> Slurm GRES name (``"gpu"``, ``"gpu:h20"``, ``"npu"``); the job asks for
    ``--gres=<name>:<cards per node>``. An accelerator missing here uses ``"gpu"``; ``""`` asks for no GRES."""
    cards_per_node: Annotated[int, msgspec.Meta(ge=1)] = 8
    """A gang of more cards spans ``cards / cards_per_node`` whole nodes (one Slurm job)."""
    cpus_per_task: Annotated[int, msgspec.Meta(ge=0)] = 0
    """``--cpus-per-task`` (0: Slurm's default)."""
    time_limit_factor: NonNegative = 2.0
    """``--time`` = the attempt's remaining estimated work x this (whole minutes, at least 1); 0: no ``--time``."""
    extra_args: list[str] = []
    """More ``sbatch`` options, verbatim (e.g. ``["--mem-per-gpu=80G", "--exclusive"]``)."""
    export_env: list[str] = msgspec.field(default_factory=lambda: ["PATH"])
    """Agent environment variables passed into the job besides ``CPN_*`` (``--export`` names)."""
    work_dir: str = ""
    """The jobs' working directory, on the shared filesystem; empty: ``<data_dir>/slurm/work``."""
    checkpoint_dir: str = ""
    """Per-job checkpoint dirs are made under it (shared filesystem); empty: ``<data_dir>/checkpoints``."""
    attempts_dir: str = ""
    """Each attempt's batch script, stdout and stderr (shared filesystem); empty: ``<data_dir>/slurm/attempts``."""
    slurm_conf: str = ""
    """``SLURM_CONF`` for the Slurm commands; empty: the commands' own default."""
    sbatch: str = "sbatch"
    squeue: str = "squeue"
    scancel: str = "scancel"
    scontrol: str = "scontrol"
    sacct: str = "sacct"
    """Asked for a job's final state once ``scontrol`` no longer knows it; empty: never."""
    jobcomp_file: str = ""
    """A ``jobcomp/filetxt`` log (``JobCompLoc``) read as the last resort for a final state."""
    poll_s: Positive = 2.0
    """How often ``squeue`` is asked for each attempt's state and its stdout file is read."""
    grace_s: NonNegative = 10.0
    """Time between ``scancel --signal=TERM`` and ``scancel`` when an attempt is stopped."""
    stderr_lines: Annotated[int, msgspec.Meta(ge=0)] = 20
    """Last stderr lines carried in a ``user_error`` event's detail."""
    command_timeout_s: Positive = 30.0
    """Longest one Slurm command may take; then it is killed (sbatch: the attempt fails; squeue: asked again)."""


class ExecutorsConfig(_Config, frozen=True):
    enabled: list[Literal["sim", "process", "container", "slurm"]] = []
    """Executors this site runs; empty (the default): no training at all, every StartAttempt is
    refused with reason ``unsupported``."""
    process: ProcessExecutorConfig = ProcessExecutorConfig()
    container: ContainerExecutorConfig = ContainerExecutorConfig()
    slurm: SlurmExecutorConfig = SlurmExecutorConfig()


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


def read_creds(path: str | os.PathLike[str]) -> dict[str, object]:
    """Config keys from a site's credentials file (``creds/<site>.json`` of ``cpn deploy nats-config``):
    ``site``, ``nats``, ``user``, ``password``, ``tls_ca``, ``tls_cert``, ``tls_key`` (empty ones left out).

    Raises:
        ConfigError: the file cannot be read, is not JSON, or is not a site's credentials.
    """
    try:
        doc = msgspec.json.decode(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"--creds {path}: cannot read: {exc.strerror or exc}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"--creds {path}: not JSON: {exc}") from None
    if not isinstance(doc, dict) or not doc.get("site") or not doc.get("user"):
        raise ConfigError(f"--creds {path}: not a site's credentials file (want site, user, password, nats)")
    keys = ("site", "nats", "user", "password", "tls_ca", "tls_cert", "tls_key")
    return {k: doc[k] for k in keys if doc.get(k)}


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
