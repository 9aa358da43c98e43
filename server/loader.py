"""Load one version directory into a validated, warmed-up ServedModel (blocking; run off the loop).

The file is the single source of truth: the manifest comes from the ONNX metadata and must
agree with the graph's inputs and outputs, or the version is refused. On CUDA an fp16 variant
(``model.fp16.onnx`` beside ``model.onnx``) is preferred when present.
"""

from __future__ import annotations

import logging
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from tlserve.contract import FP16_FILE, MODEL_FILE
from tlserve.manifest import Manifest, ManifestError
from tlserve.server.batcher import BatchingOptions
from tlserve.server.metrics import Metrics
from tlserve.server.model import ServedModel
from tlserve.server.model_health import HealthOptions
from tlserve.server.runtime import CUDA, Runtime, RuntimeOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadOptions:
    runtime: RuntimeOptions
    batching: BatchingOptions
    health: HealthOptions = field(default_factory=HealthOptions)
    separate_sessions: bool = True  # --instance-sessions separate: one session per batching instance
    max_label_metrics: int = 64  # Settings' default: per-label prediction series for at most this many labels


def public_reason(exc: BaseException) -> str:
    """Why a version did not load, as callers may see it: our own manifest checks verbatim, anything
    else (ONNX Runtime's text names files and internals) only by type."""
    return str(exc) if isinstance(exc, ManifestError) else f"{type(exc).__name__} (see the server log)"


def open_runtime(version_dir: Path, options: RuntimeOptions) -> Runtime:
    """The session for this version: the fp16 variant when it runs on CUDA, else model.onnx."""
    fp16 = version_dir / FP16_FILE
    if options.device != "cpu" and fp16.is_file():
        try:
            runtime = Runtime(fp16, options.replace(require_gpu=False))
        except Exception as exc:  # a bad variant must not hide a good model.onnx
            log.warning(
                "%s: fp16 variant failed to load (%s: %s); using %s", version_dir, type(exc).__name__, exc, MODEL_FILE
            )
        else:
            if runtime.provider == CUDA:
                return runtime
            log.info("%s: not on CUDA, using %s instead of the fp16 variant", version_dir, MODEL_FILE)
    return Runtime(version_dir / MODEL_FILE, options)


class InstanceMismatch(RuntimeError):
    """Sessions of one version landed on different providers (one on CUDA, another on the CPU)."""


def open_sessions(version_dir: Path, options: LoadOptions) -> list[Runtime]:
    """Every session of this version, all opened (and fallback-checked) or none: one, or one per instance."""
    first = open_runtime(version_dir, options.runtime)
    runtimes = [first]
    count = options.batching.instances if options.separate_sessions else 1
    for _ in range(1, count):  # the same file and options as the first, fp16 variant included
        runtime = Runtime(first.path, first.options)
        if runtime.provider != first.provider:
            raise InstanceMismatch(
                f"{first.path}: session {len(runtimes) + 1} of {count} runs on {runtime.provider}, "
                f"the first on {first.provider}"
            )
        runtimes.append(runtime)
    return runtimes


def load_version(
    name: str, version: str, version_dir: Path, options: LoadOptions, executor: Executor, metrics: Metrics
) -> ServedModel:
    """Open every session, validate against the manifest, and warm up; raises on any problem (then
    nothing of the version serves)."""
    sessions = open_sessions(version_dir, options)
    runtime = sessions[0]
    manifest = Manifest.from_metadata(runtime.metadata())
    manifest.check_graph(runtime.inputs, runtime.outputs)
    if (manifest.name, manifest.version) != (name, version):
        log.warning(
            "%s: manifest says %s/%s; serving it as %s/%s (the repository path or --model-name decides)",
            runtime.path,
            manifest.name,
            manifest.version,
            name,
            version,
        )
    model = ServedModel(
        name,
        version,
        runtime,
        manifest,
        options.batching,
        executor,
        metrics,
        options.health,
        max_label_metrics=options.max_label_metrics,
        sessions=sessions,
    )
    model.warm_up()
    return model
