"""Helpers for the server tests: a live in-process server, and real photos as file bytes
(scikit-image's bundled images, matplotlib's grace_hopper.jpg)."""

from __future__ import annotations

import asyncio
import io
import threading
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from tlserve.server.app import ServerHandle, create_server
from tlserve.server.pb.tlserve.v1 import tlserve_pb2_grpc
from tlserve.server.settings import Settings

MODEL = "fashion"

PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "camera.png", "logo.png")


def photo_path(name: str) -> Path:
    if name == "grace_hopper.jpg":
        matplotlib = pytest.importorskip("matplotlib")
        return Path(matplotlib.get_data_path()) / "sample_data" / name
    skimage_data = pytest.importorskip("skimage.data")
    return Path(skimage_data.data_dir) / name


def photo_bytes(name: str) -> bytes:
    return photo_path(name).read_bytes()


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class LiveServer:
    """A started server on its own event-loop thread; ``call`` runs a coroutine there."""

    def __init__(self, settings: Settings) -> None:
        self.registry = CollectorRegistry()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.handle: ServerHandle = self.call(self._create(settings))
        self.report = None
        self.channel: grpc.Channel | None = None

    async def _create(self, settings: Settings) -> ServerHandle:
        return create_server(settings, self.registry)

    def call(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> LiveServer:
        self.report = self.call(self.handle.start())
        self.channel = grpc.insecure_channel(f"localhost:{self.handle.port}")
        return self

    @property
    def stub(self) -> tlserve_pb2_grpc.InferenceStub:
        return tlserve_pb2_grpc.InferenceStub(self.channel)

    def metric(self, name: str, **labels) -> float | None:
        return self.registry.get_sample_value(name, labels)

    def reload(self):
        return self.call(self.handle.repository.reload())

    def close(self) -> None:
        """Stop the server and its loop (a second call does nothing)."""
        if self.loop.is_closed():
            return
        if self.channel is not None:
            self.channel.close()
        try:
            self.call(self.handle.stop(grace=1))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


def server_settings(repository: Path, **overrides) -> Settings:
    base = dict(
        repository=str(repository),
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        device="cpu",
        max_queue_delay_ms=2.0,
        drain_seconds=2.0,
        decode_threads=2,
        intra_op_threads=1,
    )
    base.update(overrides)
    return Settings(**base)


def copy_version(src: Path, dst: Path) -> Path:
    """Publish a copy of a version folder the way export does: write aside, then rename into place."""
    import shutil

    tmp = dst.parent / f".{dst.name}.tmp"
    shutil.copytree(src, tmp)
    tmp.rename(dst)
    return dst


def write_with_manifest(src_model: Path, dst_model: Path, **changes) -> Path:
    """A copy of ``src_model`` whose embedded manifest has ``changes`` applied (needs onnx)."""
    onnx = pytest.importorskip("onnx")
    from tlserve.manifest import METADATA_KEY, Manifest

    model = onnx.load(str(src_model))
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            manifest = Manifest.from_json(prop.value)
            if "labels" in changes and "baseline" not in changes:
                changes["baseline"] = relabelled(manifest, changes["labels"])
            prop.value = manifest.replace(**changes).to_json()
    dst_model.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst_model))
    return dst_model


def relabelled(manifest, labels):
    """The manifest's baseline with its class shares under new labels (by index); None for another label count."""
    import dataclasses

    baseline = manifest.baseline
    if baseline is None or len(labels) != manifest.num_classes:
        return None
    shares = [baseline.class_share[label] for label in manifest.labels]
    return dataclasses.replace(baseline, class_share=dict(zip(labels, shares)))


class Hammer:
    """Keeps classifying from a background thread; collects every status code seen."""

    def __init__(self, server: LiveServer, images) -> None:
        from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb

        self._request = pb.ClassifyRequest(images=images, top_k=1)
        self._stub = server.stub
        self._stop = threading.Event()
        self.codes: list[str] = []
        self.versions: set[str] = set()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.versions.add(self._stub.Classify(self._request, timeout=30).version)
                self.codes.append("OK")
            except grpc.RpcError as exc:
                self.codes.append(exc.code().name)

    def __enter__(self) -> Hammer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)


class Callers:
    """``workers`` threads, each on its own channel to ``address``, classifying ``images`` back to back
    until stopped (a client retries at once after UNAVAILABLE); every status code is counted."""

    def __init__(self, address: str, images, workers: int = 4) -> None:
        from collections import Counter

        from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb

        self._request = pb.ClassifyRequest(images=images, top_k=1)
        self._address = address
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.codes: Counter[str] = Counter()
        self.details: set[str] = set()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]

    def _run(self) -> None:
        with grpc.insecure_channel(self._address) as channel:
            classify = tlserve_pb2_grpc.InferenceStub(channel).Classify
            while not self._stop.is_set():
                try:
                    classify(self._request, timeout=30)
                    code, detail = "OK", ""
                except grpc.RpcError as exc:
                    code, detail = exc.code().name, exc.details() or ""
                with self._lock:
                    self.codes[code] += 1
                    if code != "OK":
                        self.details.add(f"{code}: {detail}")

    def count(self) -> int:
        with self._lock:
            return sum(self.codes.values())

    def wait_for(self, calls: int, timeout: float = 60) -> None:
        """Wait until ``calls`` more calls have been answered (or ``timeout`` s)."""
        import time

        target, give_up = self.count() + calls, time.monotonic() + timeout
        while self.count() < target and time.monotonic() < give_up:
            time.sleep(0.02)

    def __enter__(self) -> Callers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


class HeldLease:
    """A lease on a model, taken and given back on the server's loop (as a request would hold it)."""

    def __init__(self, server, model) -> None:
        self._server, self._lease = server, model.lease()

    async def _enter(self):
        self._lease.__enter__()

    async def _exit(self):
        self._lease.__exit__(None, None, None)

    def __enter__(self):
        self._server.call(self._enter())
        return self

    def __exit__(self, *exc):
        self._server.call(self._exit())
