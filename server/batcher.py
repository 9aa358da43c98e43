"""Dynamic batching for one model: a queue bounded in requests and in bytes, one future per request, batches of at most
``max_batch_size`` rows gathered for at most ``max_queue_delay`` seconds.

The window is only waited for when traffic says it will pay: each arrival notes how many
requests were already outstanding (queued or computing), and while the running mean of that
says callers overlap, the batcher waits for company; a lone caller pays no batching delay
(under load, requests also pile up while the previous batch computes). Requests whose deadline
(``time.monotonic()`` seconds) has passed, or whose caller went away, are dropped before compute.
A failed batch fails only its own requests. ``stop()`` refuses new work, drains what is queued and waits
for every running batch. Up to ``instances`` batches run at once (``--model-instances``): one worker task
per instance, the idle ones taking turns to gather, so the next batch is taken as soon as an instance is
free, and while every instance computes, requests queue, which is where the next batch gathers.
A ``monitor`` hears how each batch went; a run that outlasts its ``inference_timeout`` is *stuck*: its
requests and the queued ones get UNAVAILABLE, and new work is refused until it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from tlserve.server.errors import DeadlineExceeded, ResourceExhausted, ServingError, Unavailable
from tlserve.server.metrics import Metrics

if TYPE_CHECKING:
    from tlserve.server.settings import Settings

log = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]
OVERLAP_WEIGHT = 0.3  # weight of the newest arrival in the running mean of overlapping callers


@dataclass(frozen=True, kw_only=True)
class BatchingOptions:
    """One model's batching; the defaults are Settings' (``from_settings``)."""

    max_batch_size: int
    max_queue_delay: float  # seconds
    max_queue_size: int  # requests waiting
    max_queue_bytes: int  # bytes of their input tensors
    instances: int = 1  # batches run at once (--model-instances)

    @classmethod
    def from_settings(cls, settings: Settings) -> BatchingOptions:
        return cls(
            max_batch_size=settings.max_batch_size,
            max_queue_delay=settings.max_queue_delay,
            max_queue_size=settings.max_queue_size,
            max_queue_bytes=settings.max_queue_bytes,
            instances=settings.model_instances,
        )


class BatchMonitor(Protocol):
    """Hears the outcome of every batch (tlserve.server.model_health.ModelHealth)."""

    @property
    def inference_timeout(self) -> float: ...  # seconds; 0 = wait forever
    def succeeded(self) -> None: ...
    def failed(self) -> None: ...
    def stuck(self, seconds: float) -> None: ...


@dataclass
class BatchTiming:
    """When one submitted request was queued, and when the batch it joined ran (``time.monotonic()``
    seconds, 0 until known); filled in only for a caller that passes one (tracing does)."""

    enqueued: float = 0.0
    started: float = 0.0
    finished: float = 0.0
    rows: int = 0  # rows of the whole batch it ran in

    @property
    def times(self) -> tuple[float, float, float]:
        return self.enqueued, self.started, self.finished


@dataclass
class _Request:
    batch: np.ndarray
    deadline: float | None
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    timing: BatchTiming | None = None

    @property
    def rows(self) -> int:
        return int(self.batch.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.batch.nbytes)


class Batcher:
    """Queue and batch requests for ``run`` (a blocking callable, executed on ``executor``)."""

    def __init__(
        self,
        model: str,
        run: Callable[[np.ndarray], Outputs],
        options: BatchingOptions,
        executor: Executor,
        metrics: Metrics,
        *,
        monitor: BatchMonitor | None = None,
    ) -> None:
        self.model = model
        self.options = options
        self._run = run
        self._executor = executor
        # this model's metric children, looked up once (labels() validates and locks on every call)
        self._depth = metrics.queue_depth.labels(model)
        self._waited = metrics.queue_duration.labels(model)
        self._rows = metrics.batch_size.labels(model)
        self._computed = metrics.inference_duration.labels(model)
        self._rejections = metrics.queue_rejections.labels(model)
        self._queue: deque[_Request] = deque()
        self._queued_bytes = 0
        self._wakeup = asyncio.Event()
        self._closed = False
        self._workers: list[asyncio.Task] = []
        self._gathering = asyncio.Lock()  # held by the instance that gathers the next batch
        self._computing = 0  # requests in the running batches
        self._mean_overlap = 0.0
        self._monitor = monitor
        self._stuck_runs = 0  # runs past their inference_timeout that have not returned
        self._closing = asyncio.Event()  # set by stop(): a stuck run is waited for no longer
        self._abandoned = False  # stop() left a stuck run behind

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._workers = [
            loop.create_task(self._loop(), name=f"batcher-{self.model}-{i}") for i in range(self.options.instances)
        ]

    @property
    def stopped(self) -> bool:
        """Whether every worker has finished (after ``stop()``)."""
        return all(worker.done() for worker in self._workers)

    @property
    def _stuck(self) -> bool:
        return self._stuck_runs > 0

    async def stop(self) -> bool:
        """Refuse new requests, finish everything already queued and every running batch, then return;
        True when a stuck run was abandoned (its thread still runs)."""
        self._closed = True
        self._closing.set()  # a stuck run could take forever (one that gets stuck later stops by itself)
        self._wakeup.set()
        if self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*self._workers)
        return self._abandoned

    async def submit(
        self, batch: np.ndarray, deadline: float | None = None, timing: BatchTiming | None = None
    ) -> Outputs:
        """Queue ``batch`` (at most ``max_batch_size`` rows) and wait for its outputs; a ``timing``
        hears when it was queued and ran (once its batch succeeded)."""
        if self._closed:
            raise Unavailable(f"model {self.model!r} is unloading")
        if self._stuck:
            raise Unavailable(f"model {self.model!r}: an inference run is stuck; retry later")
        self._admit(batch.nbytes)
        request = _Request(batch, deadline, asyncio.get_running_loop().create_future(), timing=timing)
        self._note_arrival()
        self._queue.append(request)
        self._queued_bytes += request.nbytes
        self._depth.set(len(self._queue))
        self._wakeup.set()
        return await request.future

    def _admit(self, nbytes: int) -> None:
        """Refuse a request the queue has no room for, by count or by bytes (an empty queue takes any
        one request, so a request up to ``max_batch_size`` rows always gets through on its own)."""
        options = self.options
        full_count = len(self._queue) >= options.max_queue_size
        full_bytes = bool(self._queue) and self._queued_bytes + nbytes > options.max_queue_bytes
        if not (full_count or full_bytes):
            return
        self._rejections.inc()
        raise ResourceExhausted(
            f"model {self.model!r}: queue is full ({len(self._queue)} requests, {self._queued_bytes} bytes waiting; "
            f"limits {options.max_queue_size} requests, {options.max_queue_bytes} bytes); retry later"
        )

    async def _loop(self) -> None:
        """One task per instance; one of the idle ones at a time gathers the next batch (the others wait
        their turn), so while every instance computes, requests queue and the next batch grows."""
        while True:
            async with self._gathering:
                batch = await self._next_batch()
            if batch is None:
                return
            if batch:
                await self._execute(batch)

    async def _next_batch(self) -> list[_Request] | None:
        """The next batch once requests are queued (empty when all were dropped); None once stopped and drained."""
        while not self._queue:
            if self._closed:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        await self._gather_window()
        batch = self._take_batch()
        self._depth.set(len(self._queue))
        return batch

    def _note_arrival(self) -> None:
        """Fold the number of requests this arrival found outstanding into the running mean."""
        overlap = min(1.0, float(len(self._queue) + self._computing))
        self._mean_overlap = OVERLAP_WEIGHT * overlap + (1 - OVERLAP_WEIGHT) * self._mean_overlap

    def _callers_overlap(self) -> bool:
        return self._mean_overlap >= 0.5

    async def _gather_window(self) -> None:
        """Wait up to max_queue_delay after the oldest request for the batch to fill, while more
        requests are expected in time."""
        close_at = self._queue[0].enqueued + self.options.max_queue_delay
        while not self._closed and self._queued_rows() < self.options.max_batch_size:
            remaining = close_at - time.monotonic()
            if remaining <= 0 or not self._callers_overlap():
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _queued_rows(self) -> int:
        return sum(r.rows for r in self._queue)

    def _take_batch(self) -> list[_Request]:
        """Pop requests up to max_batch_size rows, answering expired or abandoned ones on the way."""
        taken: list[_Request] = []
        rows = 0
        now = time.monotonic()
        while self._queue and (not taken or rows + self._queue[0].rows <= self.options.max_batch_size):
            request = self._queue.popleft()
            self._queued_bytes -= request.nbytes
            if request.future.done():  # caller cancelled
                continue
            self._waited.observe(now - request.enqueued)
            if request.deadline is not None and now >= request.deadline:
                request.future.set_exception(
                    DeadlineExceeded(
                        f"deadline passed after {now - request.enqueued:.3f}s in the queue of model {self.model!r}"
                    )
                )
                continue
            taken.append(request)
            rows += request.rows
        return taken

    def _run_parts(self, parts: list[np.ndarray]) -> Outputs:
        """In the executor: join the requests' rows (off the event loop) and run them."""
        return self._run(parts[0] if len(parts) == 1 else np.concatenate(parts))

    async def _execute(self, batch: list[_Request]) -> None:
        rows = sum(r.rows for r in batch)
        self._rows.observe(rows)
        started = time.monotonic()
        self._computing += len(batch)
        run = asyncio.get_running_loop().run_in_executor(self._executor, self._run_parts, [r.batch for r in batch])
        try:
            timeout = self._monitor.inference_timeout if self._monitor is not None else 0.0
            done, _ = await asyncio.wait({run}, timeout=timeout if timeout > 0 else None)
            if not done:
                await self._stuck_run(run, batch, timeout)
                return
            outputs = run.result()
        except Exception as exc:
            log.error("model %r: batch of %d requests (%d rows) failed", self.model, len(batch), rows, exc_info=exc)
            error = (
                exc
                if isinstance(exc, ServingError)
                else ServingError(f"model {self.model!r}: inference failed for this batch")
            )
            self._fail(batch, error)
            if self._monitor is not None:
                self._monitor.failed()
            return
        finally:
            self._computing -= len(batch)
            finished = time.monotonic()
            self._computed.observe(finished - started)
        if self._monitor is not None:
            self._monitor.succeeded()
        offset = 0
        for request in batch:
            end = offset + request.rows
            if request.timing is not None:
                request.timing.enqueued, request.timing.started = request.enqueued, started
                request.timing.finished, request.timing.rows = finished, rows
            if not request.future.done():
                request.future.set_result({name: value[offset:end] for name, value in outputs.items()})
            offset = end

    def _fail(self, requests: list[_Request], error: Exception) -> None:
        for request in requests:
            if not request.future.done():
                request.future.set_exception(error)

    async def _stuck_run(self, run: asyncio.Future, batch: list[_Request], timeout: float) -> None:
        """The watchdog: answer the batch and the queue UNAVAILABLE, refuse new work, wait the run out
        (or until ``stop()``, which then reports it abandoned)."""
        self._stuck_runs += 1
        if self._monitor is not None:
            self._monitor.stuck(timeout)
        error = Unavailable(f"model {self.model!r}: inference did not finish within {timeout:g}s; retry later")
        self._fail(batch, error)
        self._fail(list(self._queue), error)
        self._queue.clear()
        self._queued_bytes = 0
        self._depth.set(0)
        run.add_done_callback(lambda f: f.cancelled() or f.exception())  # its outcome no longer matters
        waited = time.monotonic()
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({run, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
        if not run.done():  # stopping: leave the run behind (its slot and the stuck state stay)
            self._abandoned = True
            return
        self._stuck_runs -= 1
        log.warning("model %r: the stuck run returned after %.1fs", self.model, timeout + time.monotonic() - waited)
