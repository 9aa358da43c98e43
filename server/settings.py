"""Server settings: one frozen dataclass, built once from CLI flags (each also from env TLSERVE_<FLAG>).

The flag names and defaults are those of docs/server-contract.md. ``add_arguments`` registers
them on a parser (reading the environment when the parser is built, never at import time) and
``Settings.from_args`` turns the parsed namespace into the object passed down explicitly.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def setting(default: Any, help: str) -> Any:  # merged with the settings refactor
    return field(default=default, metadata={"help": help})  # merged with the settings refactor


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
    return (1, int(version), "") if version.isdigit() else (0, 0, version)


@dataclass(frozen=True)
class Settings:
    """Everything `tlserve serve` can be told; see docs/server-contract.md for each flag."""

    repository: str = "models"
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int = 8080
    device: str = "auto"
    require_gpu: bool = False
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    max_queue_size: int = 256
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    poll_interval: float = 0.0
    max_message_bytes: int = 16 * 1024 * 1024
    max_image_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_images: int = 64
    drain_seconds: float = 10.0
    decode_threads: int = 0
    tls_cert: str = setting("", "PEM server certificate chain; enables TLS")
    tls_key: str = setting("", "PEM private key of --tls-cert")
    tls_client_ca: str = setting("", "PEM CA bundle; clients must present a certificate it signed (mTLS)")
    metrics_tls: bool = setting(False, "serve /metrics over HTTPS with --tls-cert and --tls-key")
    token_file: str = setting("", "bearer tokens, one '<token> <scope>[,<scope>]' a line (infer, admin); enables auth")
    reflection: bool = setting(True, "serve gRPC server reflection")
    public_reflection: bool = setting(False, "with --token-file, reflection answers without a token")
    health_port: int = setting(-1, "plaintext port serving only grpc.health.v1, for probes under TLS (-1 off, 0 any)")

    def __post_init__(self) -> None:
        if isinstance(self.version_policy, str):
            object.__setattr__(self, "version_policy", VersionPolicy.parse(self.version_policy))
        device = self.device
        if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N; got {device!r}")
        if self.max_batch_size < 1 or self.max_queue_size < 1 or self.max_images < 1:
            raise ValueError("max batch size, queue size and images per request must be >= 1")

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


def _flag_env(name: str, env: Mapping[str, str], default: Any) -> Any:
    return env.get(f"TLSERVE_{name.upper()}", default)


def _truthy(text: str | bool) -> bool:
    return text if isinstance(text, bool) else str(text).strip().lower() in ("1", "true", "yes", "on")


def add_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None) -> None:
    """Register every serve flag; a flag's default comes from env TLSERVE_<FLAG> when set."""
    env = os.environ if env is None else env
    d = Settings()
    help_of = {
        "repository": "serve every DIR/<name>/<version>/model.onnx",
        "host": "bind address for gRPC and metrics",
        "port": "gRPC port (0 picks a free one)",
        "metrics_port": "Prometheus /metrics HTTP port (0 picks a free one)",
        "device": "auto, cpu, cuda or cuda:N",
        "max_batch_size": "dynamic batching: largest batch",
        "max_queue_delay_ms": "dynamic batching: longest wait to fill a batch (ms)",
        "max_queue_size": "bounded queue per model; full -> RESOURCE_EXHAUSTED",
        "intra_op_threads": "ONNX Runtime intra-op threads (0 = ORT default)",
        "inter_op_threads": "ONNX Runtime inter-op threads (0 = ORT default)",
        "version_policy": "latest:N, all, or specific:V1,V2",
        "poll_interval": "seconds between repository scans (0 = off; SIGHUP always rescans)",
        "max_message_bytes": "gRPC max receive message size",
        "max_image_bytes": "largest encoded image",
        "max_pixels": "largest decoded image (width x height), checked before decoding",
        "max_images": "most images per request",
        "drain_seconds": "graceful-shutdown grace period after SIGTERM",
        "decode_threads": "image decoding threads (0 = one per CPU)",
        "tls_cert": "PEM server certificate chain; enables TLS",
        "tls_key": "PEM private key of --tls-cert",
        "tls_client_ca": "PEM CA bundle; clients must present a certificate it signed (mTLS)",
        "metrics_tls": "serve /metrics over HTTPS with --tls-cert and --tls-key",
        "token_file": "bearer tokens, one '<token> <scope>[,<scope>]' a line (infer, admin); enables auth",
        "reflection": "serve gRPC server reflection",
        "public_reflection": "with --token-file, reflection answers without a token",
        "health_port": "plaintext port serving only grpc.health.v1, for probes under TLS (-1 off, 0 any)",
    }
    for f in dataclasses.fields(Settings):
        if f.name == "require_gpu":
            continue
        default = getattr(d, f.name)
        if isinstance(default, bool):
            parser.add_argument(
                f"--{f.name.replace('_', '-')}",
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=_truthy(_flag_env(f.name, env, default)),
                help=f"{help_of[f.name]} (default: %(default)s)",
            )
            continue
        kind = type(default) if isinstance(default, (int, float)) else str
        if f.name == "version_policy":
            default = "latest:1"
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            type=kind,
            default=kind(_flag_env(f.name, env, default)),
            help=f"{help_of[f.name]} (default: %(default)s)",
        )
    parser.add_argument(
        "--require-gpu",
        dest="require_gpu",
        action="store_true",
        default=_truthy(_flag_env("require_gpu", env, False)),
        help="refuse to start if CUDA was asked for and ONNX Runtime fell back to CPU",
    )
