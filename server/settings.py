"""Server settings: one frozen dataclass whose fields carry their default, help text and environment variable.

Each field is declared as ``name: type = setting(default, "help")``; that one line is the flag
``--name`` (``bool`` fields are switches), the environment variable ``TLSERVE_NAME``, the default and
the help text of the CLI and of docs/server-contract.md's table (``make docs`` regenerates it).
``add_arguments`` registers every field on a parser, reading the environment when the parser is
built (never at import time), and ``Settings.from_args`` turns the parsed namespace into the one
object that is passed down.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass
from typing import Any, TypeVar, overload

T = TypeVar("T")
SETTING = "tlserve.setting"  # the field-metadata key that setting() fills
MIB = 1 << 20
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")  # a KServe InferenceService name fits


@dataclass(frozen=True)
class SettingInfo:
    """What ``setting()`` records about a field (names left ``None`` are derived from the field name)."""

    help: str
    env: str | None = None
    flag: str | None = None
    choices: tuple[Any, ...] | None = None
    metavar: str | None = None


@overload
def setting(
    default: T,
    help: str,
    *,
    env: str | None = None,
    flag: str | None = None,
    choices: Sequence[Any] | None = None,
    metavar: str | None = None,
) -> T: ...
@overload
def setting(
    *,
    help: str,
    default_factory: Callable[[], T],
    env: str | None = None,
    flag: str | None = None,
    choices: Sequence[Any] | None = None,
    metavar: str | None = None,
) -> T: ...
def setting(
    default: Any = MISSING,
    help: str = "",
    *,
    default_factory: Any = MISSING,
    env: str | None = None,
    flag: str | None = None,
    choices: Sequence[Any] | None = None,
    metavar: str | None = None,
) -> Any:
    """A Settings field: its default, its help text (code in backticks), env (``TLSERVE_<NAME>``) and flag."""
    if not help:
        raise TypeError("every setting needs its help text")
    info = SettingInfo(help, env, flag, None if choices is None else tuple(choices), metavar)
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={SETTING: info})
    return dataclasses.field(default=default, metadata={SETTING: info})


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model to serve: the latest N, all, or a fixed list."""

    kind: str = "latest"
    count: int = 1
    versions: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        kind, _, arg = text.strip().partition(":")
        if kind == "all" and not arg:
            return cls(kind="all")
        if kind == "latest":
            count = int(arg or 1)
            if count < 1:
                raise ValueError("latest:N needs N >= 1")
            return cls(kind="latest", count=count)
        if kind == "specific" and arg:
            return cls(kind="specific", versions=tuple(v.strip() for v in arg.split(",") if v.strip()))
        raise ValueError(f"version policy must be latest:N, all or specific:V1,V2; got {text!r}")

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest:{self.count}"
        return "all" if self.kind == "all" else f"specific:{','.join(self.versions)}"

    def select(self, versions: list[str]) -> list[str]:
        """The versions this policy serves out of ``versions`` (newest first)."""
        ordered = sorted(versions, key=version_key, reverse=True)
        if self.kind == "all":
            return ordered
        if self.kind == "latest":
            return ordered[: self.count]
        return [v for v in ordered if v in self.versions]


def version_key(version: str) -> tuple[int, int, str]:
    """Sort key: integer versions numerically, and after any non-integer names."""
    return (1, int(version), "") if version.isascii() and version.isdigit() else (0, 0, version)


@dataclass(frozen=True)
class Settings:
    """Everything `tlserve serve` can be told; docs/server-contract.md's flag table is generated from it."""

    repository: str = setting("models", "serve every `DIR/<name>/<version>/model.onnx`", metavar="DIR")
    model_dir: str = setting(
        "",
        "single-model mode (KServe's `/mnt/models`), instead of `--repository`: serve the one model in DIR, a "
        "`model.onnx` (with its variants and `manifest.json`, if any), `<version>/model.onnx` or "
        "`<name>/<version>/model.onnx`; any other layout, or a model that does not load, refuses to start",
        metavar="DIR",
    )
    model_name: str = setting(
        "",
        "with `--model-dir`: serve the model under this name (KServe passes the InferenceService name); unset: "
        "its folder name in a repository, else the name in its embedded manifest",
        metavar="NAME",
    )
    host: str = setting("0.0.0.0", "bind address for gRPC and metrics")
    port: int = setting(50051, "gRPC port (task API, OIP, health, reflection); 0 picks a free port")
    metrics_port: int = setting(8080, "Prometheus `/metrics` HTTP port; 0 picks a free port")
    device: str = setting("auto", "`auto`, `cpu`, `cuda` or `cuda:N`")
    require_gpu: bool = setting(False, "refuse to start if CUDA was asked for and ONNX Runtime fell back to CPU")
    max_batch_size: int = setting(32, "dynamic batching: largest batch")
    max_queue_delay_ms: float = setting(2.0, "dynamic batching: longest wait to fill a batch, in milliseconds")
    max_queue_size: int = setting(256, "bounded queue per model; full -> RESOURCE_EXHAUSTED")
    max_queue_bytes: int = setting(
        64 * MIB, "bytes of input tensors waiting in one model's batch queue; more -> RESOURCE_EXHAUSTED"
    )
    intra_op_threads: int = setting(
        0,
        "ONNX Runtime intra-op threads per session (0 = one per available CPU; with `--model-instances` N and "
        "separate sessions, the available CPUs / N)",
    )
    inter_op_threads: int = setting(0, "ONNX Runtime inter-op threads (0 = ORT default)")
    model_instances: int = setting(
        1,
        "executions of one model version that may run at once (Triton's instance count): the batcher runs up to "
        "this many batches together while the next one gathers",
    )
    instance_sessions: str = setting(
        "separate",
        "with `--model-instances` N > 1: `separate` opens N ONNX Runtime sessions of the file (each with "
        "`--intra-op-threads`, or the available CPUs / N when 0), `shared` calls one session from N threads",
        choices=("separate", "shared"),
    )
    ort_spinning: str = setting(
        "run",
        "ONNX Runtime's worker threads spin while waiting for work: `on` always (ORT's own default), `run` only "
        "while a run is active (they stop the moment it returns, so idle spinning takes no CPU from the front "
        "end), or `off` (they sleep, even between a run's operators)",
        choices=("on", "run", "off"),
    )
    version_policy: VersionPolicy = setting(VersionPolicy(), "`latest:N`, `all`, or `specific:V1,V2`")
    poll_interval: float = setting(0.0, "seconds between repository scans for new versions (0 = off; SIGHUP rescans)")
    max_message_bytes: int = setting(4 * MIB, "gRPC max message size, received and sent")
    max_request_fields: int = setting(
        4096,
        "most fields (inputs, outputs, parameters, images, repeated values) in one request, counted before parsing",
    )
    max_concurrent_rpcs: int = setting(
        64, "calls in progress at once, every service counted (0 = unlimited); more -> RESOURCE_EXHAUSTED from gRPC"
    )
    max_concurrent_streams: int = setting(100, "HTTP/2 streams (calls) open at once on one connection")
    max_message_memory: int = setting(
        192 * MIB,
        "memory for parsing and converting the request messages being handled, server-wide (7 bytes per message "
        "byte, reserved before parsing); more -> RESOURCE_EXHAUSTED; one message is always admitted",
    )
    keepalive_min_ping_interval_ms: int = setting(
        10_000, "shortest interval between a client's keepalive pings without data; faster ones count as strikes"
    )
    keepalive_permit_without_calls: bool = setting(
        False, "accept keepalive pings on a connection without calls (off: such pings count as strikes)"
    )
    keepalive_max_ping_strikes: int = setting(2, "too-frequent pings tolerated before the connection is closed")
    max_connection_age_ms: int = setting(
        300_000, "close each connection after this long (with jitter), so L4 load balancers rebalance (0 = never)"
    )
    max_connection_age_grace_ms: int = setting(30_000, "time in-flight calls get after a connection reaches its age")
    max_image_bytes: int = setting(4 * MIB, "largest encoded image")
    max_pixels: int = setting(16_000_000, "largest image (width x height), read from its header before decoding")
    max_request_pixels: int = setting(
        128_000_000, "most pixels in one request, summed over its encoded images, checked before decoding"
    )
    max_decode_bytes: int = setting(
        256 * MIB,
        "memory admitted for decoding at once, server-wide (estimated from image headers); more -> RESOURCE_EXHAUSTED",
    )
    max_images: int = setting(64, "most images per request")
    drain_seconds: float = setting(10.0, "graceful-shutdown grace period after SIGTERM")
    unhealthy_after_failures: int = setting(
        5, "consecutive failed batches that turn a model NOT_SERVING until a probe succeeds (0 = never)"
    )
    inference_timeout_seconds: float = setting(
        30.0, "a session.run taking longer is stuck: its requests get UNAVAILABLE, the model NOT_SERVING (0 = off)"
    )
    health_probe_seconds: float = setting(5.0, "seconds between warm-up probes of an unhealthy model")
    decode_threads: int = setting(0, "image decoding threads (0 = one per available CPU)")
    fast_decode: bool = setting(
        False,
        "decode a JPEG at least 4x the resize target at 1/2, 1/4 or 1/8 scale in the DCT domain (no smaller than "
        "2x the target), then resize (3-5x faster at 12 MP; pixels then differ from the trainer's eval transform, "
        "top-1 parity in docs/serving.md); off: every JPEG at full size, bit-exact",
    )
    tls_cert: str = setting(
        "",
        "PEM server certificate chain; enables TLS on the gRPC port. Re-read when the file changes (checked at most "
        "once a second, at a new connection): new connections get the new certificate, open ones keep theirs",
        metavar="FILE",
    )
    tls_key: str = setting("", "PEM (unencrypted) private key of `--tls-cert`", metavar="FILE")
    tls_client_ca: str = setting(
        "",
        "PEM CA bundle: clients must present a certificate it signed (mTLS); reloaded like the certificate",
        metavar="FILE",
    )
    metrics_tls: bool = setting(
        False, "serve `/metrics` over HTTPS with `--tls-cert`/`--tls-key` (no client certificate asked)"
    )
    token_file: str = setting(
        "",
        "bearer tokens and their scopes, one `<token> <scope>[,<scope>]` a line (`infer`, `admin`); enables token "
        "auth; re-read within a second of a change",
        metavar="FILE",
    )
    reflection: bool = setting(True, "serve gRPC server reflection (`--no-reflection` turns it off)")
    public_reflection: bool = setting(False, "with `--token-file`, reflection answers without a token")
    max_label_metrics: int = setting(
        64,
        "export `tlserve_predictions_total` (one series per label) only for models with at most this many labels "
        "(0 = never); the confidence histogram is exported for every model",
    )
    health_port: int = setting(
        -1,
        "an extra plaintext port serving only `grpc.health.v1.Health`, for kubelet gRPC probes (they cannot speak "
        "TLS); -1 off, 0 picks a free port",
    )

    tracing: bool = setting(
        False,
        "OpenTelemetry tracing: a span per RPC (W3C `traceparent` from the call's metadata), exported over OTLP/gRPC "
        "to `OTEL_EXPORTER_OTLP_ENDPOINT` as `OTEL_SERVICE_NAME`; needs the `tracing` extra",
    )
    log_format: str = setting(
        "text", "log lines as `text` or `json` (one JSON object a line)", choices=("text", "json")
    )
    log_requests: str = setting(
        "failed",
        "request log lines (request id, trace id, model, version, code, duration): `failed` calls, `all`, or `none`",
        choices=("none", "failed", "all"),
    )

    def __post_init__(self) -> None:
        if isinstance(self.version_policy, str):
            object.__setattr__(self, "version_policy", VersionPolicy.parse(self.version_policy))
        device = self.device
        if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N; got {device!r}")
        positive = "max_batch_size max_queue_size max_queue_bytes max_message_bytes max_image_bytes max_pixels"
        positive += " max_request_pixels max_decode_bytes max_images max_concurrent_streams max_request_fields"
        positive += " model_instances max_message_memory"
        for name in positive.split():
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        not_negative = "max_concurrent_rpcs keepalive_min_ping_interval_ms keepalive_max_ping_strikes"
        not_negative += " max_connection_age_ms max_connection_age_grace_ms decode_threads intra_op_threads"
        not_negative += " unhealthy_after_failures inference_timeout_seconds drain_seconds max_label_metrics"
        for name in not_negative.split():
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0; got {getattr(self, name)}")
        if self.model_name and not self.model_dir:
            raise ValueError("--model-name needs --model-dir (in a repository, the folder names the model)")
        if self.model_name and not MODEL_NAME.fullmatch(self.model_name):
            raise ValueError(
                f"--model-name must be 1-253 letters, digits, '.', '_' or '-', starting with a letter or digit; "
                f"got {self.model_name[:100]!r}"
            )
        for name in ("log_format", "log_requests", "instance_sessions", "ort_spinning"):
            choices = self.__dataclass_fields__[name].metadata[SETTING].choices
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be one of {', '.join(choices)}; got {getattr(self, name)!r}"
                )
        if self.health_probe_seconds <= 0:
            raise ValueError(f"--health-probe-seconds must be > 0; got {self.health_probe_seconds}")

    @property
    def max_queue_delay(self) -> float:
        """The batching window in seconds."""
        return self.max_queue_delay_ms / 1000.0

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})


@dataclass(frozen=True)
class SettingSpec:
    """One Settings field as the CLI and the docs see it."""

    name: str
    kind: type  # bool, int, float or str (other types arrive as text and Settings parses them)
    default: Any
    help: str  # code in backticks (the docs keep them, the CLI drops them)
    env: str
    flag: str
    choices: tuple[Any, ...] | None
    metavar: str | None

    @property
    def default_text(self) -> str:
        if self.kind is bool:
            return "on" if self.default else "off"
        if isinstance(self.default, float):
            return format(self.default, "g")
        return str(self.default) if self.default != "" else "unset"


def _flag_type(hint: Any) -> type:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # `str | None`: the non-None part
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint if hint in (bool, int, float, str) else str


def setting_specs(cls: type[Any] = Settings) -> list[SettingSpec]:
    """Every field of ``cls`` (a dataclass of setting() fields), in declaration order, env and flag filled in."""
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        info = f.metadata.get(SETTING)
        if not isinstance(info, SettingInfo):
            raise TypeError(f"{cls.__name__}.{f.name} must be declared with setting(default, help)")
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        flag = info.flag or f"--{f.name.replace('_', '-')}"
        env = info.env or f"TLSERVE_{f.name.upper()}"
        specs.append(
            SettingSpec(f.name, _flag_type(hints[f.name]), default, info.help, env, flag, info.choices, info.metavar)
        )
    return specs


class _FromEnv(str):
    """A default read from the environment; argparse converts it at parse time, naming the variable on error."""


def _parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in TRUE or word in FALSE:
        return word in TRUE
    raise ValueError(text)


def _converter(spec: SettingSpec) -> Callable[[str], Any]:
    parse: Callable[[str], Any] = _parse_bool if spec.kind is bool else spec.kind

    def convert(text: str) -> Any:
        source = f" (from {spec.env})" if isinstance(text, _FromEnv) else ""
        try:
            value = parse(text)
        except ValueError:
            want = (
                f"{'/'.join(TRUE)} or {'/'.join(FALSE[:-1])}" if spec.kind is bool else f"a valid {spec.kind.__name__}"
            )
            raise argparse.ArgumentTypeError(f"{text!r}{source} is not {want}") from None
        if spec.choices is not None and value not in spec.choices:
            choices = ", ".join(map(str, spec.choices))
            raise argparse.ArgumentTypeError(f"{text!r}{source} is not one of {choices}")
        return value

    return convert


class _Switch(argparse.Action):
    """``--x`` / ``--no-x`` that also converts a string default (from the environment) with its ``type``."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, not (option_string or "").startswith("--no-"))


def add_arguments(
    parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None, cls: type[Any] = Settings
) -> None:
    """Register every setting of ``cls`` as a flag; its default comes from its environment variable when set."""
    env = os.environ if env is None else env
    for spec in setting_specs(cls):
        text = env.get(spec.env)
        default = spec.default if text is None else _FromEnv(text)
        source = f"env {spec.env}" if text is None else f"set by {spec.env}"
        shown = spec.default_text if text is None else repr(text)
        help = f"{spec.help.replace('`', '')} (default: {shown}; {source})".replace("%", "%%")
        common: dict[str, Any] = dict(dest=spec.name, type=_converter(spec), default=default, help=help)
        if spec.kind is bool:
            parser.add_argument(spec.flag, f"--no-{spec.flag.removeprefix('--')}", action=_Switch, **common)
        else:
            parser.add_argument(spec.flag, choices=spec.choices, metavar=spec.metavar, **common)
