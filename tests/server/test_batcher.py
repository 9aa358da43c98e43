"""Dynamic batching: equivalence, bounded queue, deadlines, and failures confined to their batch."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from tlserve.server.batcher import Batcher, BatchingOptions
from tlserve.server.errors import DeadlineExceeded, ResourceExhausted, ServingError, Unavailable
from tlserve.server.metrics import Metrics
from tlserve.server.settings import Settings


def batching(**changes) -> BatchingOptions:
    """The server's default batching with ``changes`` (max_queue_delay in seconds)."""
    return dataclasses.replace(BatchingOptions.from_settings(Settings()), **changes)


class Recorder:
    """A model stand-in that records the batch sizes it saw; a row of -1 poisons its batch."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.sizes: list[int] = []
        self.gate = gate

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self.gate is not None:
            self.gate.wait(10)
        self.sizes.append(batch.shape[0])
        if (batch == -1).any():
            raise RuntimeError("poisoned row")
        return {"double": batch * 2, "sum": batch.reshape(batch.shape[0], -1).sum(1)}


def run_with(options: BatchingOptions, body, gate=None):
    registry = CollectorRegistry()

    async def main():
        recorder = Recorder(gate)
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher("m", recorder, options, pool, Metrics(registry))
            batcher.start()
            try:
                return await body(batcher), recorder, registry
            finally:
                if gate is not None:
                    gate.set()
                await batcher.stop()

    return asyncio.run(main())


def rows(values) -> list[np.ndarray]:
    return [np.full((n, 2), v, dtype=np.int64) for v, n in values]


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows():
    requests = rows([(i, 1 + i % 3) for i in range(20)])

    async def body(batcher):
        return await asyncio.gather(*(batcher.submit(r) for r in requests))

    results, recorder, registry = run_with(batching(max_batch_size=8, max_queue_delay=0.05), body)
    for request, result in zip(requests, results):
        np.testing.assert_array_equal(result["double"], request * 2)
        np.testing.assert_array_equal(result["sum"], request.sum(1))
    assert sum(recorder.sizes) == sum(r.shape[0] for r in requests)
    assert max(recorder.sizes) <= 8 and len(recorder.sizes) < len(requests)
    assert registry.get_sample_value("tlserve_batch_size_count", {"model": "m"}) == len(recorder.sizes)


def test_failed_batch_fails_only_its_own_requests():
    gate = threading.Event()

    async def body(batcher):
        first = asyncio.ensure_future(batcher.submit(rows([(1, 1)])[0]))  # runs alone, held at the gate
        await asyncio.sleep(0.05)
        poisoned = [asyncio.ensure_future(batcher.submit(r)) for r in rows([(-1, 1), (2, 1)])]
        await asyncio.sleep(0.05)
        gate.set()
        await first
        later = await batcher.submit(rows([(3, 1)])[0])
        return first.result(), await asyncio.gather(*poisoned, return_exceptions=True), later

    (first, poisoned, later), recorder, _ = run_with(batching(max_batch_size=4, max_queue_delay=0.01), body, gate)
    assert first["sum"].tolist() == [2] and later["sum"].tolist() == [6]
    assert all(isinstance(e, ServingError) for e in poisoned)
    assert "inference failed for this batch" in str(poisoned[0])


def test_full_queue_is_resource_exhausted_and_counted():
    gate = threading.Event()

    async def body(batcher):
        running = asyncio.ensure_future(batcher.submit(rows([(0, 1)])[0]))
        await asyncio.sleep(0.05)  # the worker now waits at the gate with that one request
        queued = [asyncio.ensure_future(batcher.submit(r)) for r in rows([(i, 1) for i in range(3)])]
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted, match="queue is full"):
            await batcher.submit(rows([(9, 1)])[0])
        gate.set()
        return await asyncio.gather(running, *queued)

    results, _, registry = run_with(batching(max_batch_size=1, max_queue_delay=0, max_queue_size=3), body, gate)
    assert len(results) == 4
    assert registry.get_sample_value("tlserve_queue_rejections_total", {"model": "m"}) == 1


def test_expired_deadline_dropped_before_compute():
    gate = threading.Event()

    async def body(batcher):
        running = asyncio.ensure_future(batcher.submit(rows([(0, 1)])[0]))
        await asyncio.sleep(0.05)
        doomed = asyncio.ensure_future(batcher.submit(rows([(5, 1)])[0], deadline=time.monotonic() + 0.01))
        alive = asyncio.ensure_future(batcher.submit(rows([(6, 1)])[0], deadline=time.monotonic() + 60))
        await asyncio.sleep(0.1)  # the first deadline passes while the worker is busy
        gate.set()
        await running
        with pytest.raises(DeadlineExceeded, match="deadline passed"):
            await doomed
        return await alive

    alive, recorder, _ = run_with(batching(max_batch_size=4, max_queue_delay=0), body, gate)
    assert alive["sum"].tolist() == [12]
    assert sum(recorder.sizes) == 2  # the expired row never reached the model


def test_stop_drains_queued_requests_then_refuses():
    async def body(batcher):
        pending = [asyncio.ensure_future(batcher.submit(r)) for r in rows([(i, 1) for i in range(5)])]
        await asyncio.sleep(0)
        await batcher.stop()
        assert all(p.done() and not p.exception() for p in pending)
        with pytest.raises(Unavailable):
            await batcher.submit(rows([(1, 1)])[0])
        return len(pending)

    count, recorder, _ = run_with(batching(max_batch_size=2, max_queue_delay=1.0), body)
    assert count == 5 and sum(recorder.sizes) == 5


def test_a_lone_caller_is_not_held_for_the_batching_window():
    async def body(batcher):
        sizes = []
        for value in range(3):  # one caller, one request at a time: nothing else is coming
            result = await asyncio.wait_for(batcher.submit(rows([(value, 1)])[0]), 30)
            sizes.append(result["sum"].tolist())
            await asyncio.sleep(0.2)
        return sizes

    # a 10-minute window: waiting it out would trip the 30 s guard above
    sums, recorder, _ = run_with(batching(max_batch_size=8, max_queue_delay=600), body)
    assert sums == [[0], [2], [4]] and recorder.sizes == [1, 1, 1]


def test_overlapping_callers_wait_for_the_window_to_fill_the_batch():
    gate = threading.Event()

    async def body(batcher):
        first = asyncio.ensure_future(batcher.submit(rows([(0, 1)])[0]))  # computes, held at the gate
        await asyncio.sleep(0.05)
        early = [asyncio.ensure_future(batcher.submit(r)) for r in rows([(1, 1), (2, 1)])]  # they overlap it
        await asyncio.sleep(0.05)
        gate.set()
        await first
        late = []
        for value in range(3, 9):  # trickle in while the worker holds the window open
            await asyncio.sleep(0.02)
            late.append(asyncio.ensure_future(batcher.submit(rows([(value, 1)])[0])))
        return await asyncio.gather(*early, *late)

    results, recorder, _ = run_with(batching(max_batch_size=8, max_queue_delay=600), body, gate)
    assert [r["sum"].tolist() for r in results] == [[2 * v] for v in range(1, 9)]
    assert recorder.sizes == [1, 8]
