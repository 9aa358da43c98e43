"""The drift baseline: the published graph's top-1 confidence quantiles and class shares on the validation split."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tlserve.export.gate import probabilities
from tlserve.export.graph import ServingGraph
from tlserve.export.samples import Samples
from tlserve.export.verify import cpu_session
from tlserve.manifest import BASELINE_QUANTILES, Baseline

log = logging.getLogger(__name__)


def summarize(probabilities: np.ndarray, labels: tuple[str, ...], split: str) -> Baseline:
    """Quantiles of the top-1 confidence and the share of each predicted class, of [N, C] ``probabilities``."""
    confidence = probabilities.max(axis=1).astype(np.float64)
    levels = [float(q) for q in BASELINE_QUANTILES]
    values = np.quantile(confidence, levels)  # linear interpolation, monotone in the level
    counts = np.bincount(probabilities.argmax(axis=1), minlength=len(labels))
    return Baseline(
        images=len(confidence),
        quantiles={q: round(float(v), 6) for q, v in zip(BASELINE_QUANTILES, values)},
        class_share={label: round(float(c) / len(confidence), 6) for label, c in zip(labels, counts)},
        split=split,
    )


def confidence_baseline(path: Path, graph: ServingGraph, val: Samples, labels: tuple[str, ...]) -> Baseline | None:
    """The baseline of the file at ``path`` (as ONNX Runtime serves it; ``graph`` prepares its input) on ``val``;
    None when ``val`` is not the model's own labelled validation split (photos say nothing of it)."""
    if not val.labelled or not len(val):
        log.info("no labelled validation images: the manifest gets no confidence baseline")
        return None
    session = cpu_session(path)
    baseline = summarize(probabilities(session, graph.prepare(val.images)), labels, val.source)
    log.info(
        "confidence baseline on %d images of %s: top-1 p10 %.3f, median %.3f",
        baseline.images,
        val.source,
        baseline.quantiles["0.1"],
        baseline.quantiles["0.5"],
    )
    return baseline
