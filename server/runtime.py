"""ONNX Runtime sessions: provider choice, fallback detection, graph signature, and one run call.

CUDA never falls back silently: after creating the session we compare ``get_providers()``
with what was asked for, warn loudly, and (with ``require_gpu``) refuse. On CUDA the input is
bound with I/O binding, so the host-to-device copy is the uint8 tensor (4x smaller than float).
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from tlserve.contract import ORT_DTYPES
from tlserve.server.cpus import available_cpus
from tlserve.server.errors import FailedPrecondition

if TYPE_CHECKING:
    from tlserve.server.settings import Settings

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class GPUUnavailable(FailedPrecondition):
    """CUDA was required but ONNX Runtime runs on the CPU."""


@dataclass(frozen=True, kw_only=True)
class RuntimeOptions:
    """How to open ONNX Runtime sessions; the defaults are Settings' (``from_settings``)."""

    device: str
    require_gpu: bool
    intra_op_threads: int
    inter_op_threads: int
    spinning: str = "run"  # ORT's pools spin: "on" always (ORT's default), "run" only while a Run is active, "off"
    io_binding: bool | None = None  # None: on CUDA only (not a setting)

    @classmethod
    def from_settings(cls, settings: Settings) -> RuntimeOptions:
        """Each session's options; with N separate instance sessions, 0 intra-op threads means the
        available CPUs split N ways (at least one each)."""
        sessions = settings.model_instances if settings.instance_sessions == "separate" else 1
        return cls(
            device=settings.device,
            require_gpu=settings.require_gpu,
            intra_op_threads=settings.intra_op_threads or max(1, available_cpus() // sessions),
            inter_op_threads=settings.inter_op_threads,
            spinning=settings.ort_spinning,
        )

    def replace(self, **changes: Any) -> RuntimeOptions:
        return dataclasses.replace(self, **changes)

    @property
    def wants_cuda(self) -> bool:
        """CUDA was asked for explicitly (``cuda`` or ``cuda:N``)."""
        return self.device.startswith("cuda")

    @property
    def device_id(self) -> int:
        return int(self.device.split(":", 1)[1]) if ":" in self.device else 0


def cuda_driver_present() -> bool:
    """Whether the NVIDIA driver library loads (no GPU driver: ``auto`` quietly means CPU)."""
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def requested_providers(options: RuntimeOptions) -> list[Any]:
    """The provider list to ask ORT for; also preloads the CUDA libraries when CUDA is wanted."""
    if options.device == "cpu" or (
        options.device == "auto" and not (CUDA in ort.get_available_providers() and cuda_driver_present())
    ):
        return [CPU]
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception:  # missing nvidia-* packages: the provider check below reports the outcome
            log.debug("onnxruntime.preload_dlls failed", exc_info=True)
    return [(CUDA, {"device_id": options.device_id}), CPU]


def session_options(options: RuntimeOptions) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    so.log_severity_level = 3
    if options.spinning == "off":
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    elif options.spinning == "run":  # spin between a run's operators, stop the moment the last run returns
        so.add_session_config_entry("session.force_spinning_stop", "1")
    return so


class Runtime:
    """One ORT session and what the server needs to know about it."""

    def __init__(self, path: str | Path, options: RuntimeOptions) -> None:
        self.path = Path(path)
        self.options = options
        requested = requested_providers(options)
        self.session = ort.InferenceSession(str(path), sess_options=session_options(options), providers=requested)
        self.providers = list(self.session.get_providers())
        self.provider = self.providers[0]
        self.fallback = options.wants_cuda and self.provider != CUDA
        if CUDA in [p if isinstance(p, str) else p[0] for p in requested] and self.provider != CUDA:
            self._report_fallback()
        self.use_io_binding = self.provider == CUDA if options.io_binding is None else options.io_binding
        self.inputs = [(i.name, list(i.shape), ORT_DTYPES.get(i.type, i.type)) for i in self.session.get_inputs()]
        self.outputs = [(o.name, list(o.shape)) for o in self.session.get_outputs()]
        self.output_names = [name for name, _ in self.outputs]

    def _report_fallback(self) -> None:
        message = (
            f"CUDA requested (--device {self.options.device}) but ONNX Runtime is using {self.providers} "
            f"for {self.path}: running on the CPU"
        )
        if self.options.wants_cuda:
            log.warning("!!! %s !!!", message)
        else:
            log.info("%s (device auto)", message)
        if self.options.wants_cuda and self.options.require_gpu:
            raise GPUUnavailable(f"{message}; refusing because --require-gpu is set")

    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def run(self, input_name: str, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run the graph on one batch; every output by name."""
        if not self.use_io_binding:
            return dict(zip(self.output_names, self.session.run(self.output_names, {input_name: batch})))
        binding = self.session.io_binding()
        device = "cuda" if self.provider == CUDA else "cpu"
        # the uint8 batch is copied to the device as is: 4x less than float32 over PCIe
        value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(batch), device, self.options.device_id)
        binding.bind_ortvalue_input(input_name, value)
        for name in self.output_names:
            binding.bind_output(name)
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))
