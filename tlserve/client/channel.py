"""One gRPC channel to a tlserve server: TLS or mTLS credentials, the bearer token, message limits, and
retries on UNAVAILABLE and RESOURCE_EXHAUSTED done by gRPC itself (a ``retryPolicy`` in the channel's
service config), never by a loop of ours."""

from __future__ import annotations

import json
from collections import namedtuple
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import grpc

from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb

Pem = Union[str, Path, bytes]  # a PEM file's path, or its contents
INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name  # "tlserve.v1.Inference"
OIP_SERVICE = "inference.GRPCInferenceService"
MESSAGE_BYTES = 64 << 20  # the client's own limit on messages sent and received; the server has its own
RETRYABLE = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")


@dataclass(frozen=True)
class ChannelSecurity:
    """How to reach a protected server: PEM files (paths or contents), a bearer token, a TLS name override."""

    tls: bool = False  # TLS with the system's roots; implied by any of ca, cert, key
    ca: Pem = ""  # CA bundle the server's certificate must chain to
    cert: Pem = ""  # client certificate chain (mTLS), with key
    key: Pem = ""
    token: str = ""  # sent as "authorization: Bearer <token>" on every call
    server_name: str = ""  # check the server's certificate for this name instead of the target's host

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls or self.ca or self.cert or self.key)

    def credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert) != bool(self.key):
            raise ValueError("a client certificate (mTLS) needs both cert and key")
        return grpc.ssl_channel_credentials(
            root_certificates=read_pem(self.ca), private_key=read_pem(self.key), certificate_chain=read_pem(self.cert)
        )

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What every call sends: the token, if any."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def read_pem(pem: Pem) -> bytes | None:
    if not pem:
        return None
    return pem if isinstance(pem, bytes) else Path(pem).read_bytes()


def read_token_file(path: str | Path) -> str:
    """The first field of the first line that is neither blank nor a ``#`` comment (a server token line works)."""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return line.split()[0]
    raise ValueError(f"{path} holds no token")


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC's retry policy for every method of the task API and the Open Inference Protocol (gRFC A6).

    An attempt that fails with one of ``codes`` is tried again after a random pause of up to
    ``initial_backoff`` seconds, that bound growing by ``multiplier`` per attempt up to ``max_backoff``;
    at most ``max_attempts`` attempts in all (gRPC caps it at 5), all within the call's deadline. A call
    whose response has begun is never retried. ``max_attempts=1`` turns retries off.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    codes: tuple[str, ...] = RETRYABLE

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= 5:
            raise ValueError(f"max_attempts must be 1 to 5 (gRPC's limit), got {self.max_attempts}")
        if not (0 < self.initial_backoff <= self.max_backoff and self.multiplier > 0):
            raise ValueError("need 0 < initial_backoff <= max_backoff and multiplier > 0")
        unknown = [c for c in self.codes if c not in grpc.StatusCode.__members__]
        if unknown:
            raise ValueError(f"unknown status code {unknown[0]!r}")

    def service_config(self) -> str:
        """The channel's ``grpc.service_config`` JSON."""
        config: dict[str, Any] = {"name": [{"service": INFERENCE_SERVICE}, {"service": OIP_SERVICE}]}
        if self.max_attempts > 1:
            config["retryPolicy"] = {
                "maxAttempts": self.max_attempts,
                "initialBackoff": f"{self.initial_backoff:.3f}s",
                "maxBackoff": f"{self.max_backoff:.3f}s",
                "backoffMultiplier": self.multiplier,
                "retryableStatusCodes": list(self.codes),
            }
        return json.dumps({"methodConfig": [config]})


NO_RETRIES = RetryPolicy(max_attempts=1)


def channel_options(
    security: ChannelSecurity, retry: RetryPolicy, extra: Sequence[tuple[str, Any]] = ()
) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MESSAGE_BYTES),
        ("grpc.max_send_message_length", MESSAGE_BYTES),
        ("grpc.enable_retries", 1 if retry.max_attempts > 1 else 0),
        # gRPC keeps a call's request to send it again, but only up to 256 KiB by default: a bigger request
        # (one photo can be) would be committed at once and never retried
        ("grpc.per_rpc_retry_buffer_size", MESSAGE_BYTES),
        ("grpc.service_config", retry.service_config()),
    ]
    if security.server_name:
        options.append(("grpc.ssl_target_name_override", security.server_name))
    return options + list(extra)


class _CallDetails(
    namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


class _Metadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds fixed metadata (the bearer token) to every call of a blocking-API channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _with_metadata(self, continuation: Callable, details: grpc.ClientCallDetails, request: object) -> object:
        metadata = (*(details.metadata or ()), *self._metadata)
        fields = (details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)
        return continuation(_CallDetails(*fields, getattr(details, "compression", None)), request)

    intercept_unary_unary = intercept_unary_stream = _with_metadata
    intercept_stream_unary = intercept_stream_stream = _with_metadata


def open_channel(
    target: str,
    security: ChannelSecurity = ChannelSecurity(),
    retry: RetryPolicy = RetryPolicy(),
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A blocking-API channel to ``target``: plaintext, or TLS/mTLS as ``security`` says, sending its token
    (if any) on every call, retrying as ``retry`` says."""
    opts = channel_options(security, retry, options)
    if not security.uses_tls:
        channel = grpc.insecure_channel(target, options=opts)
    else:
        channel = grpc.secure_channel(target, security.credentials(), options=opts)
    if security.token:
        channel = grpc.intercept_channel(channel, _Metadata(security.metadata))
    return channel


def open_aio_channel(
    target: str,
    security: ChannelSecurity = ChannelSecurity(),
    retry: RetryPolicy = RetryPolicy(),
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """:func:`open_channel` for asyncio, but the token is not part of the channel: send ``security.metadata``
    with each call (:class:`tlserve.client.AsyncClient` does)."""
    opts = channel_options(security, retry, options)
    if not security.uses_tls:
        return grpc.aio.insecure_channel(target, options=opts)
    return grpc.aio.secure_channel(target, security.credentials(), options=opts)
