"""A served model version: manifest + ONNX Runtime session(s) + dynamic batcher, no transport.

Each request holds one *lease* while it works (the data plane takes it, decoding included), so
unloading a version first refuses new leases, then waits for the in-flight ones to finish, then
drains the batcher. ``ready`` means started, not unloading, and healthy (see model_health.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor

import numpy as np

from tlserve.manifest import Manifest
from tlserve.server.batcher import Batcher, BatchingOptions, BatchTiming, Outputs
from tlserve.server.errors import DeadlineExceeded, Unavailable
from tlserve.server.instances import Instances
from tlserve.server.metrics import Metrics
from tlserve.server.model_health import HealthOptions, ModelHealth
from tlserve.server.predictions import PredictionMetrics
from tlserve.server.runtime import Runtime

log = logging.getLogger(__name__)


class ServedModel:
    """One loaded, validated version of a model; ``runtime`` is its (first) session, ``sessions`` all of
    them when there are several (``--instance-sessions separate``)."""

    def __init__(
        self,
        name: str,
        version: str,
        runtime: Runtime,
        manifest: Manifest,
        batching: BatchingOptions,
        executor: Executor,
        metrics: Metrics,
        health: HealthOptions | None = None,
        *,
        max_label_metrics: int = 64,
        sessions: Sequence[Runtime] = (),
    ) -> None:
        self.name = name
        self.version = version
        self.manifest = manifest
        self.runtime = runtime
        self.instances = Instances(sessions or [runtime])
        self.batching = batching
        self._metrics = metrics
        self.health = ModelHealth(name, version, health or HealthOptions(), self._probe, metrics)
        self._batcher = Batcher(name, self._run, batching, executor, metrics, monitor=self.health)
        self.predictions = PredictionMetrics(metrics, name, version, manifest, max_label_metrics)
        self._inflight = metrics.inflight.labels(name)
        self._leases = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepting = False
        self.abandoned_run = False  # unload gave up on a stuck session.run (its thread still runs)

    @property
    def ready(self) -> bool:
        """Started, not unloading, and healthy: new requests are taken."""
        return self._accepting and self.health.healthy

    @property
    def unloaded(self) -> bool:
        """Whether :meth:`unload` has finished (the batcher is stopped)."""
        return not self._accepting and self._batcher.stopped

    # --- what callers read -------------------------------------------------------------
    @property
    def provider(self) -> str:
        return self.runtime.provider

    @property
    def requested_device(self) -> str:
        return self.runtime.options.device

    @property
    def input_name(self) -> str:
        return self.manifest.input_name

    @property
    def input_dtype(self) -> str:
        return self.manifest.preprocessing.input_dtype

    @property
    def output_names(self) -> list[str]:
        return list(self.runtime.output_names)

    @property
    def path(self) -> str:
        return str(self.runtime.path)

    @property
    def embedding_size(self) -> int:
        name = self.manifest.outputs.embedding
        shape = dict(self.runtime.outputs).get(name) if name else None
        return shape[1] if shape and len(shape) == 2 and isinstance(shape[1], int) else 0

    # --- lifecycle -----------------------------------------------------------------------
    def _warm_input(self) -> np.ndarray:
        size = self.manifest.preprocessing.input_size
        return np.zeros((1, 3, size, size), dtype=self.input_dtype)

    def warm_up(self) -> None:
        """Run the graph once on every session (blocking) so no request pays for lazy init."""
        for runtime in self.instances.runtimes:
            runtime.run(self.input_name, self._warm_input())

    async def _probe(self) -> Outputs:
        """The warm-up input through the batcher (while unhealthy: its outcome decides the health)."""
        return await self._batcher.submit(self._warm_input())

    def start(self, on_health_change: Callable[[ServedModel], None] | None = None) -> None:
        """Start batching and take requests; ``on_health_change(model)`` hears each change of health."""
        if on_health_change is not None:
            self.health.on_change = lambda: on_health_change(self)
        self._batcher.start()
        self._accepting = True

    def stop_accepting(self) -> None:
        """Refuse new leases from now on (the first step of unloading)."""
        self._accepting = False

    async def unload(self, grace: float) -> None:
        """Stop taking requests, wait (up to ``grace`` s) for in-flight ones, drain the queue."""
        self._accepting = False
        self.health.close()
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except asyncio.TimeoutError:
            log.warning(
                "model %s/%s: %d requests still in flight after %.1fs; stopping anyway",
                self.name,
                self.version,
                self._leases,
                grace,
            )
        self.abandoned_run = await self._batcher.stop()

    @contextlib.contextmanager
    def lease(self) -> Iterator[ServedModel]:
        """Hold the model for one request. Once unloading has begun, new leases are refused
        (UNAVAILABLE) while the ones already held run to their end."""
        if not self.ready:
            if self._accepting:
                raise Unavailable(
                    f"model {self.name!r} version {self.version} is unhealthy (its inference failed); retry later"
                )
            raise Unavailable(f"model {self.name!r} version {self.version} is not ready")
        self._leases += 1
        self._idle.clear()
        try:
            yield self
        finally:
            self._leases -= 1
            if self._leases == 0:
                self._idle.set()

    # --- inference -----------------------------------------------------------------------
    async def infer(
        self, batch: np.ndarray, deadline: float | None = None, timings: list[BatchTiming] | None = None
    ) -> Outputs:
        """All graph outputs for ``batch`` ([N, 3, S, S] of the graph's input dtype, as the data
        plane checked it), via the batcher; call it under the request's :meth:`lease`.

        ``deadline`` is an absolute ``time.monotonic()`` value; requests larger than the
        largest batch are split and reassembled in order. ``timings``, when given, gets one
        :class:`BatchTiming` per part sent to the batcher.
        """
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("deadline passed before the request reached the model")
        gauge = self._inflight
        gauge.inc()
        try:
            return await self._infer(batch, deadline, timings)
        finally:
            gauge.dec()

    async def _infer(self, batch: np.ndarray, deadline: float | None, timings: list[BatchTiming] | None) -> Outputs:
        step = self.batching.max_batch_size
        if batch.shape[0] <= step:
            return await self._batcher.submit(batch, deadline, _timing(timings))
        parts = await asyncio.gather(
            *(
                self._batcher.submit(batch[i : i + step], deadline, _timing(timings))
                for i in range(0, batch.shape[0], step)
            ),
            return_exceptions=True,
        )
        outputs = [part for part in parts if not isinstance(part, BaseException)]
        if len(outputs) != len(parts):
            raise next(part for part in parts if isinstance(part, BaseException))
        return {name: np.concatenate([p[name] for p in outputs]) for name in outputs[0]}

    def _run(self, batch: np.ndarray) -> Outputs:
        return self.instances.run(self.input_name, batch)


def _timing(timings: list[BatchTiming] | None) -> BatchTiming | None:
    """A new timing appended to ``timings`` (None when nobody asked)."""
    if timings is None:
        return None
    timings.append(BatchTiming())
    return timings[-1]
