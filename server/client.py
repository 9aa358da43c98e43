"""A small gRPC client for the task API: open a (TLS, mTLS, token) channel, wait for health,
classify files in batches."""

from __future__ import annotations

import time
from collections import deque, namedtuple
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tlserve.server.health import INFERENCE_SERVICE, model_service
from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb
from tlserve.server.pb.tlserve.v1 import tlserve_pb2_grpc

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
MESSAGE_OPTIONS = (("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20))


@dataclass(frozen=True)
class ChannelSecurity:
    """How to reach a protected server: PEM file paths, a bearer token, a TLS name override."""

    tls: bool = False  # TLS with the system's roots; implied by any of ca, cert, key
    ca: str = ""  # CA bundle the server's certificate must chain to
    cert: str = ""  # client certificate chain (mTLS), with key
    key: str = ""
    token: str = ""  # sent as "authorization: Bearer <token>" on every call
    server_name: str = ""  # check the server's certificate for this name instead of the target's host

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls or self.ca or self.cert or self.key)


def read_token_file(path: str | Path) -> str:
    """The first field of the first line that is neither blank nor a ``#`` comment (a server token line works)."""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return line.split()[0]
    raise ValueError(f"{path} holds no token")


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
    """Adds fixed metadata (the bearer token) to every call."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _with_metadata(self, continuation: Callable, details: grpc.ClientCallDetails, request: object) -> object:
        metadata = (*(details.metadata or ()), *self._metadata)
        fields = (details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)
        return continuation(_CallDetails(*fields, getattr(details, "compression", None)), request)

    intercept_unary_unary = intercept_unary_stream = _with_metadata
    intercept_stream_unary = intercept_stream_stream = _with_metadata


def open_channel(target: str, security: ChannelSecurity = ChannelSecurity(), options=MESSAGE_OPTIONS) -> grpc.Channel:
    """A channel to ``target``: plaintext, or TLS/mTLS as ``security`` says, sending its token if any."""
    options = list(options)
    if not security.uses_tls:
        channel = grpc.insecure_channel(target, options=options)
    else:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(security.ca).read_bytes() if security.ca else None,
            private_key=Path(security.key).read_bytes() if security.key else None,
            certificate_chain=Path(security.cert).read_bytes() if security.cert else None,
        )
        if security.server_name:
            options.append(("grpc.ssl_target_name_override", security.server_name))
        channel = grpc.secure_channel(target, credentials, options=options)
    if security.token:
        channel = grpc.intercept_channel(channel, _Metadata((("authorization", f"Bearer {security.token}"),)))
    return channel


@dataclass(frozen=True)
class LabelledFile:
    path: Path
    label: str | None  # the ImageFolder class folder, when there is one


@dataclass(frozen=True)
class Result:
    file: LabelledFile
    predictions: list[tuple[str, float]]  # (label, score), best first


def find_images(paths: Iterable[str | Path]) -> list[LabelledFile]:
    """Files as given; a folder of class sub-folders (ImageFolder) yields labelled files."""
    found: list[LabelledFile] = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(LabelledFile(path, None))
            continue
        for file in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
            label = file.parent.name if file.parent != path else None
            found.append(LabelledFile(file, label))
    return found


def wait_ready(channel: grpc.Channel, timeout: float, model: str | None = None) -> None:
    """Poll grpc.health.v1 until the service reports SERVING; TimeoutError after ``timeout`` s."""
    stub = health_pb2_grpc.HealthStub(channel)
    service = model_service(model) if model else INFERENCE_SERVICE
    give_up = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < give_up:
        try:
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        except grpc.RpcError as exc:
            last = f"{exc.code().name}: {exc.details()}"
        time.sleep(0.25)
    raise TimeoutError(f"{service} not SERVING after {timeout:.0f}s (last: {last})")


def classify_files(
    channel: grpc.Channel,
    files: list[LabelledFile],
    top_k: int = 3,
    batch_size: int = 32,
    model: str = "",
    version: str = "",
    window: int = 4,
    timeout: float = 60.0,
) -> Iterator[Result]:
    """Classify ``files`` in batches, keeping ``window`` requests in flight; results in file order."""
    stub = tlserve_pb2_grpc.InferenceStub(channel)
    ref = pb.ModelRef(name=model, version=version)
    pending: deque = deque()

    def collect() -> Iterator[Result]:
        chunk, future = pending.popleft()
        for file, result in zip(chunk, future.result().results):
            yield Result(file, [(p.label, p.score) for p in result.predictions])

    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        request = pb.ClassifyRequest(
            model=ref, top_k=top_k, images=[pb.Image(encoded=f.path.read_bytes()) for f in chunk]
        )
        pending.append((chunk, stub.Classify.future(request, timeout=timeout)))
        if len(pending) >= window:
            yield from collect()
    while pending:
        yield from collect()
