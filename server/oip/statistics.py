"""Triton's ModelStatistics from what the server really measured.

Success and failure counts and durations are recorded here per model version, for every
inference through this protocol. Queue and compute times, executions (batches) and inferences
(images) come from the batcher's Prometheus histograms, which are per model: with several
versions of one model loaded, each version reports the model's totals for those.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from tlserve.server.pb.inference import messages_pb2 as pb


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns

    def message(self) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=self.count, ns=self.ns)


@dataclass
class VersionRecord:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    last_inference_ms: int = 0


class InferenceStatistics:
    """Per-version request outcomes, joined with the batcher's histograms when asked."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._records: dict[tuple[str, str], VersionRecord] = {}

    def record(self, name: str, version: str, ns: int, ok: bool) -> None:
        record = self._records.setdefault((name, version), VersionRecord())
        (record.success if ok else record.fail).add(ns)
        record.last_inference_ms = time.time_ns() // 1_000_000

    @contextlib.contextmanager
    def measure(self, name: str, version: str) -> Iterator[None]:
        """Record the enclosed inference: its duration, as a success unless it raises."""
        started, ok = time.perf_counter_ns(), False
        try:
            yield
            ok = True
        finally:
            self.record(name, version, time.perf_counter_ns() - started, ok)

    def _totals(self, metric: str, name: str) -> tuple[int, float]:
        """(observations, sum) of one model's histogram; zeros before its first observation."""
        labels = {"model": name}
        count = self._registry.get_sample_value(f"{metric}_count", labels) or 0
        return int(count), self._registry.get_sample_value(f"{metric}_sum", labels) or 0.0

    def _duration(self, metric: str, name: str) -> pb.StatisticDuration:
        count, seconds = self._totals(metric, name)
        return pb.StatisticDuration(count=count, ns=round(seconds * 1e9))

    def message(self, name: str, version: str) -> pb.ModelStatistics:
        record = self._records.get((name, version), VersionRecord())
        executions, images = self._totals("tlserve_batch_size", name)
        compute = self._duration("tlserve_inference_duration_seconds", name)
        return pb.ModelStatistics(
            name=name,
            version=version,
            last_inference=record.last_inference_ms,
            inference_count=round(images),
            execution_count=executions,
            inference_stats=pb.InferStatistics(
                success=record.success.message(),
                fail=record.fail.message(),
                queue=self._duration("tlserve_queue_duration_seconds", name),
                compute_input=pb.StatisticDuration(count=compute.count),
                compute_infer=compute,
                compute_output=pb.StatisticDuration(count=compute.count),
            ),
        )
