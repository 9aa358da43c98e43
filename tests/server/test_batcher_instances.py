"""Model instances (``--model-instances``): up to N batches run at once, every batcher guarantee kept per
run, separate sessions really are N sessions with the same outputs, and a live server with two instances
answers ModelInfer correctly under concurrency."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client import CollectorRegistry
from serving_helpers import MODEL, LiveServer, server_settings

from tlserve.server.batcher import Batcher, BatchingOptions
from tlserve.server.cpus import available_cpus
from tlserve.server.errors import ServingError, Unavailable
from tlserve.server.loader import LoadOptions, load_version
from tlserve.server.metrics import Metrics
from tlserve.server.pb.inference import grpc_service_pb2_grpc
from tlserve.server.pb.inference import messages_pb2 as oip
from tlserve.server.pb.inference import model_config_pb2 as config_pb
from tlserve.server.runtime import RuntimeOptions
from tlserve.server.settings import Settings

WAIT = 30.0  # generous: the machine may be loaded


def batching(**changes) -> BatchingOptions:
    return dataclasses.replace(BatchingOptions.from_settings(Settings()), **changes)


class Gated:
    """A model stand-in whose runs block until ``release`` is set; it counts the runs in progress.
    A row of -1 poisons its batch; a row of -2 hangs until ``unhang`` is set (a stuck kernel)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.unhang = threading.Event()
        self.lock = threading.Lock()
        self.running = 0
        self.most_running = 0
        self.started: list[int] = []
        self.two_running = threading.Event()

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        with self.lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            self.started.append(int(batch[0, 0]))
            if self.running >= 2:
                self.two_running.set()
        try:
            if (batch == -2).any():
                self.unhang.wait(WAIT)
            self.release.wait(WAIT)
            if (batch == -1).any():
                raise RuntimeError("poisoned row")
            return {"double": batch * 2}
        finally:
            with self.lock:
                self.running -= 1


class Monitor:
    """Hears batch outcomes (the BatchMonitor protocol ModelHealth implements); each run reads the next of
    ``timeouts`` (the last one repeats), so one run can be stuck while another has all the time it needs."""

    def __init__(self, *timeouts: float) -> None:
        self.timeouts = list(timeouts)
        self.outcomes: list[str] = []

    @property
    def inference_timeout(self) -> float:
        return self.timeouts.pop(0) if len(self.timeouts) > 1 else self.timeouts[0]

    def succeeded(self) -> None:
        self.outcomes.append("ok")

    def failed(self) -> None:
        self.outcomes.append("failed")

    def stuck(self, seconds: float) -> None:
        self.outcomes.append("stuck")


def run_with(options: BatchingOptions, body, monitor: Monitor | None = None):
    """``body(batcher, model)`` on a started batcher over a Gated model and a 4-thread executor."""
    model = Gated()
    registry = CollectorRegistry()

    async def main():
        with ThreadPoolExecutor(4) as pool:
            batcher = Batcher("m", model, options, pool, Metrics(registry), monitor=monitor)
            batcher.start()
            try:
                return await body(batcher, model), model, registry
            finally:
                model.release.set()
                model.unhang.set()
                await batcher.stop()

    return asyncio.run(main())


def row(value: int) -> np.ndarray:
    return np.full((1, 2), value, dtype=np.int64)


async def until(condition, what: str) -> None:
    """Wait (on the loop) until ``condition()`` holds; fail after WAIT seconds."""
    for _ in range(int(WAIT / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_two_instances_run_two_batches_at_once():
    async def body(batcher, model):
        first = asyncio.ensure_future(batcher.submit(row(1)))
        await until(lambda: model.started == [1], "the first batch to start")
        second = asyncio.ensure_future(batcher.submit(row(2)))  # the first still blocks at its gate
        overlapped = await asyncio.to_thread(model.two_running.wait, WAIT)
        model.release.set()
        return overlapped, await first, await second

    (overlapped, first, second), model, registry = run_with(batching(instances=2, max_queue_delay=0), body)
    assert overlapped and model.most_running == 2
    assert first["double"].tolist() == [[2, 2]] and second["double"].tolist() == [[4, 4]]
    assert registry.get_sample_value("tlserve_batch_size_count", {"model": "m"}) == 2


def test_one_instance_never_overlaps_and_gathers_while_it_computes():
    async def body(batcher, model):
        first = asyncio.ensure_future(batcher.submit(row(0)))
        await until(lambda: model.started == [0], "the first batch to start")
        queued = [asyncio.ensure_future(batcher.submit(row(v))) for v in range(1, 7)]
        await asyncio.sleep(0.05)
        not_started = list(model.started)  # the executor has three idle threads, but one instance
        model.release.set()
        return not_started, await asyncio.gather(first, *queued)

    (not_started, results), model, registry = run_with(batching(instances=1, max_batch_size=8), body)
    assert not_started == [0] and model.most_running == 1
    assert [r["double"].tolist() for r in results] == [[[2 * v, 2 * v]] for v in range(7)]
    assert registry.get_sample_value("tlserve_batch_size_count", {"model": "m"}) == 2  # the six queued joined


def test_a_failing_batch_among_concurrent_ones_fails_only_its_requests():
    async def body(batcher, model):
        poisoned = asyncio.ensure_future(batcher.submit(row(-1)))
        await until(lambda: model.started == [-1], "the poisoned batch to start")
        good = asyncio.ensure_future(batcher.submit(row(3)))
        await asyncio.to_thread(model.two_running.wait, WAIT)
        model.release.set()
        outcomes = await asyncio.gather(poisoned, good, return_exceptions=True)
        return outcomes, await batcher.submit(row(4))

    ((poisoned, good), later), _, _ = run_with(batching(instances=2, max_queue_delay=0), body)
    assert isinstance(poisoned, ServingError) and "inference failed for this batch" in str(poisoned)
    assert good["double"].tolist() == [[6, 6]] and later["double"].tolist() == [[8, 8]]


def test_stop_waits_for_every_running_batch_and_drains_the_queue():
    async def body(batcher, model):
        running = [asyncio.ensure_future(batcher.submit(row(v))) for v in (1, 2)]  # one row a batch
        assert await asyncio.to_thread(model.two_running.wait, WAIT)
        queued = asyncio.ensure_future(batcher.submit(row(3)))  # both instances busy: it waits its turn
        await asyncio.sleep(0)
        stopping = asyncio.ensure_future(batcher.stop())
        await asyncio.sleep(0.1)
        early = stopping.done() or any(f.done() for f in running)
        with pytest.raises(Unavailable, match="unloading"):
            await batcher.submit(row(9))
        model.release.set()
        abandoned = await stopping
        assert batcher.stopped
        return early, abandoned, [f.result()["double"][0, 0] for f in (*running, queued)]

    (early, abandoned, values), _, _ = run_with(batching(instances=2, max_batch_size=1, max_queue_delay=0), body)
    assert not early and not abandoned and values == [2, 4, 6]


def test_a_stuck_run_among_two_instances_is_answered_and_the_other_keeps_its_batch():
    monitor = Monitor(WAIT, 0.3)  # the first run may take its time; the second is stuck after 0.3 s

    async def body(batcher, model):
        fine = asyncio.ensure_future(batcher.submit(row(5)))  # held at the gate, on one instance
        await until(lambda: model.started == [5], "the first run to start")
        stuck = asyncio.ensure_future(batcher.submit(row(-2)))  # on the other one, until unhang
        with pytest.raises(Unavailable, match="did not finish within"):
            await asyncio.wait_for(stuck, WAIT)
        with pytest.raises(Unavailable, match="is stuck"):
            await batcher.submit(row(6))
        model.release.set()  # the other run was never failed: it answers its own request
        fine_result = await asyncio.wait_for(fine, WAIT)
        model.unhang.set()  # the stuck run returns: new work is taken again

        async def accepted():
            try:
                return await batcher.submit(row(7))
            except Unavailable:
                return None

        for _ in range(int(WAIT / 0.05)):
            after = await accepted()
            if after is not None:
                return fine_result, after
            await asyncio.sleep(0.05)
        raise AssertionError("the batcher never took work again after the stuck run returned")

    (fine, after), _, _ = run_with(batching(instances=2, max_queue_delay=0), body, monitor)
    assert fine["double"].tolist() == [[10, 10]] and after["double"].tolist() == [[14, 14]]
    assert monitor.outcomes.count("stuck") == 1 and "failed" not in monitor.outcomes


def test_stop_with_a_stuck_run_reports_it_abandoned():
    monitor = Monitor(0.3)

    async def body(batcher, model):
        model.release.set()
        stuck = asyncio.ensure_future(batcher.submit(row(-2)))
        with pytest.raises(Unavailable):
            await asyncio.wait_for(stuck, WAIT)
        return await asyncio.wait_for(batcher.stop(), WAIT)

    abandoned, model, _ = run_with(batching(instances=2, max_queue_delay=0), body, monitor)
    assert abandoned is True


# --- sessions ---------------------------------------------------------------------------------


def load(exported_version, pool, **settings):
    s = Settings(device="cpu", **settings)
    options = LoadOptions(
        runtime=RuntimeOptions.from_settings(s),
        batching=BatchingOptions.from_settings(s),
        separate_sessions=s.instance_sessions == "separate",
    )
    return load_version(MODEL, "1", exported_version, options, pool, Metrics(CollectorRegistry()))


def test_separate_sessions_are_distinct_and_agree_with_one_session(exported_version):
    with ThreadPoolExecutor(2) as pool:
        one = load(exported_version, pool, intra_op_threads=1)
        two = load(exported_version, pool, model_instances=2)
        shared = load(exported_version, pool, model_instances=2, instance_sessions="shared")
    sessions = [r.session for r in two.instances.runtimes]
    assert len(sessions) == 2 and sessions[0] is not sessions[1] and two.runtime is two.instances.runtimes[0]
    assert all(r.options.intra_op_threads == max(1, available_cpus() // 2) for r in two.instances.runtimes)
    assert shared.instances.sessions == 1 and shared.runtime.options.intra_op_threads == available_cpus()
    size = one.manifest.preprocessing.input_size
    batch = np.random.default_rng(3).integers(0, 256, (3, 3, size, size), dtype=np.uint8)
    expected = one.runtime.run(one.input_name, batch)
    for runtime in (*two.instances.runtimes, shared.runtime):
        got = runtime.run(one.input_name, batch)
        for name, value in expected.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6)


def test_instance_settings_are_checked():
    with pytest.raises(ValueError, match="--model-instances must be >= 1"):
        Settings(model_instances=0)
    with pytest.raises(ValueError, match="--instance-sessions must be one of"):
        Settings(instance_sessions="pooled")
    assert RuntimeOptions.from_settings(Settings(model_instances=4, intra_op_threads=3)).intra_op_threads == 3


# --- a live server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_instances(repo_copy):
    server = LiveServer(server_settings(repo_copy, model_instances=2, max_queue_delay_ms=1.0)).start()
    yield server
    server.close()


def test_live_server_with_two_instances_answers_model_infer_under_concurrency(two_instances, exported_version):
    server = two_instances
    stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(server.channel)
    config = stub.ModelConfig(oip.ModelConfigRequest(name=MODEL), timeout=WAIT).config
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, config_pb.ModelInstanceGroup.KIND_CPU)]
    model = server.handle.repository.get(MODEL)
    assert model.instances.sessions == 2
    size = model.manifest.preprocessing.input_size
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, (1 + i % 3, 3, size, size), dtype=np.uint8) for i in range(24)]
    reference = ort.InferenceSession(str(exported_version / "model.onnx"), providers=["CPUExecutionProvider"])
    futures = []
    for batch in images:  # all in flight at once: batches form and run on both instances
        request = oip.ModelInferRequest(model_name=MODEL, raw_input_contents=[batch.tobytes()])
        request.inputs.add(name=model.input_name, datatype="UINT8", shape=list(batch.shape))
        request.outputs.add(name="probabilities")
        futures.append(stub.ModelInfer.future(request, timeout=120))
    for batch, future in zip(images, futures):
        response = future.result()
        got = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(list(response.outputs[0].shape))
        (expected,) = reference.run(["probabilities"], {model.input_name: batch})
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    batches = server.metric("tlserve_batch_size_count", model=MODEL)
    assert batches is not None and batches >= 1
    with pytest.raises(grpc.RpcError) as refused:  # the server stays strict with two instances
        bad = oip.ModelInferRequest(model_name=MODEL, raw_input_contents=[b"x"])
        bad.inputs.add(name=model.input_name, datatype="UINT8", shape=[1, 3, size, size])
        stub.ModelInfer(bad, timeout=WAIT)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
