"""A small gRPC client for the task API: wait for health, classify files in batches."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tlserve.server.health import INFERENCE_SERVICE, model_service
from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb
from tlserve.server.pb.tlserve.v1 import tlserve_pb2_grpc

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


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
