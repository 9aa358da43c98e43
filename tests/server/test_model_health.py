"""Model health: batches that keep failing (a sticky CUDA error) and a session.run that hangs turn a
model NOT_SERVING; a probe brings it back. A real ONNX session whose run a test can make fail or
hang (handed to ServedModel through its constructor), and a real model file that fails on real photos."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from serving_helpers import MODEL, photo_bytes

from tlserve.manifest import Manifest
from tlserve.server.batcher import BatchingOptions
from tlserve.server.errors import ServingError, Unavailable
from tlserve.server.metrics import Metrics
from tlserve.server.model import ServedModel
from tlserve.server.model_health import HealthOptions
from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb
from tlserve.server.runtime import Runtime, RuntimeOptions
from tlserve.server.settings import Settings

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Faulty(Runtime):
    """The exported model's real session; ``mode`` makes its run fail (as after a sticky CUDA error)
    or hang until ``release`` is set (as a hung kernel)."""

    def __init__(self, path, options) -> None:
        super().__init__(path, options)
        self.mode = "ok"
        self.release = threading.Event()

    def run(self, input_name, batch):
        if self.mode == "fail":
            raise RuntimeError("CUDA failure 700: an illegal memory access was encountered")
        if self.mode == "hang":
            self.release.wait(60)
        return super().run(input_name, batch)


def run_model(exported_version, health: HealthOptions, body):
    """``body(model, runtime, registry, changes)`` on a started ServedModel over a Faulty runtime."""
    options = RuntimeOptions.from_settings(Settings(device="cpu", intra_op_threads=1))
    runtime = Faulty(exported_version / "model.onnx", options)
    manifest = Manifest.from_metadata(runtime.metadata())
    registry = CollectorRegistry()
    batching = BatchingOptions.from_settings(Settings(max_queue_delay_ms=0))

    async def main():
        with ThreadPoolExecutor(2) as pool:
            model = ServedModel(MODEL, "1", runtime, manifest, batching, pool, Metrics(registry), health)
            changes: list[bool] = []
            model.start(lambda m: changes.append(m.ready))
            try:
                return await body(model, runtime, registry, changes)
            finally:
                runtime.mode = "ok"
                runtime.release.set()
                await model.unload(5)

    return asyncio.run(main())


def batch(model) -> np.ndarray:
    size = model.manifest.preprocessing.input_size
    return np.full((1, 3, size, size), 128, dtype=np.uint8)


async def infer(model):
    with model.lease():
        return await model.infer(batch(model))


async def until(predicate, limit: float = 30) -> bool:
    for _ in range(int(limit / 0.01)):
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


def test_consecutive_failed_batches_turn_a_model_unhealthy_and_a_probe_brings_it_back(exported_version):
    async def body(model, runtime, registry, changes):
        runtime.mode = "fail"
        for _ in range(2):
            with pytest.raises(ServingError, match="inference failed"):
                await infer(model)
        assert model.ready and changes == []  # two failures in a row: still serving
        with pytest.raises(ServingError):
            await infer(model)
        assert not model.ready and changes == [False]
        with pytest.raises(Unavailable, match="unhealthy"):
            await infer(model)  # refused before any work
        runtime.mode = "ok"  # the device recovers: the next probe succeeds
        assert await until(lambda: model.ready)
        assert changes == [False, True]
        assert (await infer(model))["probabilities"].shape == (1, len(model.manifest.labels))

    run_model(exported_version, HealthOptions(unhealthy_after_failures=3, probe_interval=0.05), body)


def test_a_success_resets_the_count_of_failures(exported_version):
    async def body(model, runtime, registry, changes):
        for mode in ("fail", "fail", "ok", "fail", "fail"):
            runtime.mode = mode
            try:
                await infer(model)
            except ServingError:
                pass
        assert model.ready and changes == []

    run_model(exported_version, HealthOptions(unhealthy_after_failures=3, probe_interval=0.05), body)


def test_a_stuck_run_is_answered_unavailable_counted_and_recovered(exported_version):
    async def body(model, runtime, registry, changes):
        runtime.mode = "hang"
        stuck, queued = await asyncio.gather(infer(model), infer(model), return_exceptions=True)
        assert isinstance(stuck, Unavailable) and "did not finish within 0.2s" in str(stuck)
        assert isinstance(queued, Unavailable)  # it would have waited behind the stuck run
        assert not model.ready and changes == [False]
        assert registry.get_sample_value("tlserve_inference_stuck_total", {"model": MODEL}) == 1
        with pytest.raises(Unavailable):
            await infer(model)
        runtime.mode = "ok"
        runtime.release.set()  # the run returns at last; the probe succeeds
        assert await until(lambda: model.ready)
        assert (await infer(model))["probabilities"].shape[0] == 1

    run_model(exported_version, HealthOptions(inference_timeout=0.2, probe_interval=0.05), body)


def test_unloading_does_not_wait_for_a_run_that_never_returns(exported_version):
    async def body(model, runtime, registry, changes):
        runtime.mode = "hang"
        with pytest.raises(Unavailable):
            await infer(model)
        await model.unload(0.1)
        assert model.unloaded and model.abandoned_run

    run_model(exported_version, HealthOptions(inference_timeout=0.2, probe_interval=3600), body)


def fails_on_real_photos(src, dst):
    """A copy of ``src`` whose probabilities go through a Gather that is out of bounds unless every
    pixel is 0: the warm-up (zeros) works, every real photo fails in ONNX Runtime."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    model = onnx.load(str(src))
    graph = model.graph
    for node in graph.node:
        node.output[:] = ["probabilities_raw" if o == "probabilities" else o for o in node.output]
    graph.initializer.append(helper.make_tensor("one_zero", TensorProto.FLOAT, [1], [0.0]))
    graph.node.extend(
        [
            helper.make_node("ReduceMax", ["images"], ["brightest"], keepdims=0),
            helper.make_node("Cast", ["brightest"], ["index"], to=TensorProto.INT64),
            helper.make_node("Gather", ["one_zero", "index"], ["zero"]),
            helper.make_node("Add", ["probabilities_raw", "zero"], ["probabilities"]),
        ]
    )
    dst.parent.mkdir(parents=True)
    onnx.save(model, str(dst))


def test_a_model_whose_batches_keep_failing_is_reported_not_serving(exported_version, tmp_path, make_server):
    fails_on_real_photos(exported_version / "model.onnx", tmp_path / MODEL / "1" / "model.onnx")
    server = make_server(tmp_path, unhealthy_after_failures=3, health_probe_seconds=3600)
    request = pb.ClassifyRequest(images=[pb.Image(encoded=photo_bytes("coffee.png"))])
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as err:
            server.stub.Classify(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.INTERNAL and "out of data bounds" not in err.value.details()
    health = health_pb2_grpc.HealthStub(server.channel)
    check = health_pb2.HealthCheckRequest(service=f"tlserve.model.{MODEL}")
    watch = health.Watch(check, timeout=30)
    while next(watch).status != NOT_SERVING:  # the repository tells health as soon as it can
        pass
    watch.cancel()
    assert health.Check(health_pb2.HealthCheckRequest(service="tlserve.v1.Inference"), timeout=5).status == NOT_SERVING
    assert server.metric("tlserve_model_ready", model=MODEL, version="1") == 0
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Classify(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_unloading_while_a_run_hangs_returns_once_the_watchdog_gives_up_on_it(exported_version):
    async def body(model, runtime, registry, changes):
        runtime.mode = "hang"
        request = asyncio.ensure_future(infer(model))
        await asyncio.sleep(0.05)
        await model.unload(0.01)  # stops the batcher before the run is known to be stuck
        assert model.unloaded and model.abandoned_run
        with pytest.raises(Unavailable):
            await request

    run_model(exported_version, HealthOptions(inference_timeout=0.3, probe_interval=3600), body)
