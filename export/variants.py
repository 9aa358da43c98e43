"""Build and verify the ONNX files of one version: model.onnx at the asked precision, plus optional copies."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from tlserve.contract import FP16_FILE, MODEL_FILE, OPTIMIZED_FILE
from tlserve.export.fp16 import to_fp16
from tlserve.export.gate import int8_gate
from tlserve.export.graph import ServingGraph
from tlserve.export.int8 import quantize_int8
from tlserve.export.samples import Samples
from tlserve.export.verify import Tolerance, verify_parity

log = logging.getLogger(__name__)

# fp16 rounding moves probabilities by ~1e-2: a flip between classes the reference scores within 0.02 is a tie;
# beyond that, at most one image in 64 may flip
FP16_TOLERANCE = Tolerance(max_abs_prob=5e-2, min_top1_agreement=0.98, tie_margin=0.02)
ANY = Tolerance(max_abs_prob=1.0, min_top1_agreement=0.0)  # int8: the accuracy gate decides instead


@dataclass(frozen=True)
class Variant:
    """One ONNX file of a version: its file name, precision, path in the work folder and verification."""

    file_name: str
    precision: str
    path: Path
    verification: dict[str, Any]


def ort_optimized(source: Path, target: Path) -> None:
    """ONNX Runtime's graph optimisations at the extended level (no layout or hardware-specific rewrites)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])


def build_variants(
    traced: Path,
    graph: ServingGraph,
    check: Samples,
    val: Samples,
    calibration: Samples,
    precision: str,
    optimized: bool,
    force: bool,
    input_name: str,
) -> list[Variant]:
    """The verified files of a version, model.onnx first. ``traced`` has passed fp32 verification already."""
    work = traced.parent
    fp32 = Variant(MODEL_FILE, "fp32", traced, verify_parity(traced, graph, check.images).to_dict())
    main = fp32
    variants = []
    if precision == "int8":
        path = work / "int8.onnx"
        quantize_int8(traced, path, input_name, graph.prepare(calibration.images))
        report = int8_gate(traced, path, graph.prepare(val.images), val.targets, force)
        parity = verify_parity(path, graph, check.images, tolerance=ANY)
        main = Variant(
            MODEL_FILE,
            "int8",
            path,
            {
                "parity": parity.to_dict(),
                "gate": report.to_dict(),
                "calibration": f"{len(calibration)} images, {calibration.source}",
            },
        )
    variants.append(main)
    if precision == "fp16":
        path = work / "fp16.onnx"
        onnx.save(to_fp16(onnx.load(str(traced))), str(path))
        variants.append(
            Variant(
                FP16_FILE, "fp16", path, verify_parity(path, graph, check.images, tolerance=FP16_TOLERANCE).to_dict()
            )
        )
    if optimized:
        path = work / "optimized.onnx"
        ort_optimized(main.path, path)
        tolerance = ANY if main.precision == "int8" else Tolerance()
        variants.append(
            Variant(
                OPTIMIZED_FILE,
                main.precision,
                path,
                verify_parity(path, graph, check.images, tolerance=tolerance).to_dict(),
            )
        )
    return variants
