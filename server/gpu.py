"""GPU memory and utilisation from NVML, read at scrape time; absent unless NVML finds a GPU.

Uses ``nvidia-ml-py`` (``import pynvml``) when installed; anything missing (the package, the
driver library, a GPU) means the collector is simply not registered.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


class NvmlCollector(Collector):
    """``tlserve_gpu_memory_used_bytes`` and ``tlserve_gpu_utilization_ratio`` per GPU index."""

    def __init__(self, nvml, count: int) -> None:
        self._nvml = nvml
        self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        memory = GaugeMetricFamily("tlserve_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=["gpu"])
        busy = GaugeMetricFamily("tlserve_gpu_utilization_ratio", "GPU utilisation 0..1 (NVML)", labels=["gpu"])
        for index, handle in enumerate(self._handles):
            try:
                memory.add_metric([str(index)], float(self._nvml.nvmlDeviceGetMemoryInfo(handle).used))
                busy.add_metric([str(index)], self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
            except self._nvml.NVMLError:
                log.debug("NVML read failed for GPU %d", index, exc_info=True)
        yield memory
        yield busy


def register_gpu_metrics(registry: CollectorRegistry) -> bool:
    """Register the NVML collector when a GPU is visible; returns whether it was registered."""
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except Exception:  # no package, no driver, no GPU: GPU metrics are simply absent
        return False
    if count == 0:
        return False
    registry.register(NvmlCollector(pynvml, count))
    log.info("NVML: exporting memory and utilisation of %d GPU(s)", count)
    return True
