"""Verification before publishing: the ONNX checker, then ONNX Runtime against PyTorch on real images."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
import onnxruntime as ort
import torch

from tlserve.export.graph import EMBEDDING, PROBABILITIES, ServingGraph

log = logging.getLogger(__name__)

BATCH_SIZES = (1, 5, 16)


class VerificationError(RuntimeError):
    """The exported graph is invalid or disagrees with PyTorch; nothing may be published."""


@dataclass(frozen=True)
class Tolerance:
    """Limits for one precision. ``tie_margin``: a top-1 flip between two classes that the reference itself scores
    within this margin is a tie broken by rounding, not a disagreement; ``min_top1_agreement`` counts the others."""

    max_abs_prob: float = 1e-4
    min_top1_agreement: float = 1.0
    tie_margin: float = 0.0


FP32 = Tolerance()


@dataclass(frozen=True)
class Parity:
    """How an ONNX file's outputs compare with the reference, over every batch size tried."""

    images: int
    batch_sizes: tuple[int, ...]
    max_abs_prob: float
    max_abs_embedding: float | None  # None: the graph has no embedding output
    top1_agreement: float  # distinct images whose top-1 matches the reference at every batch size
    tie_flips: int = 0  # flipped images the reference scored within the tie margin
    decisive_agreement: float = 1.0  # as top1_agreement, ties excused: what the tolerance checks

    def to_dict(self) -> dict:
        return asdict(self)


def check_model(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise VerificationError(f"{path.name} fails onnx.checker (full_check): {exc}") from exc


def cpu_session(path: Path, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


Outputs = tuple[np.ndarray, Optional[np.ndarray]]  # (probabilities, embedding or None when the graph has none)


def torch_outputs(graph: ServingGraph, inputs: np.ndarray, batch: int = 32) -> Outputs:
    """(probabilities, embedding) from PyTorch, the reference; ``inputs`` as the graph takes them."""
    names = list(graph.outputs)
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in names}
    with torch.no_grad():
        for start in range(0, len(inputs), batch):
            for name, out in zip(names, graph.eval()(torch.from_numpy(inputs[start : start + batch]))):
                chunks[name].append(out.numpy())
    return _pair({name: np.concatenate(parts) for name, parts in chunks.items()})


def _pair(outputs: dict[str, np.ndarray]) -> Outputs:
    return outputs[PROBABILITIES], outputs.get(EMBEDDING)


def session_outputs(session: ort.InferenceSession, images: np.ndarray, batch: int) -> Outputs:
    name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs() if o.name in (PROBABILITIES, EMBEDDING)]
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for start in range(0, len(images), batch):
        for n, out in zip(names, session.run(names, {name: images[start : start + batch]})):
            chunks[n].append(out.astype(np.float32))
    return _pair({n: np.concatenate(parts) for n, parts in chunks.items()})


def compare(
    session: ort.InferenceSession,
    inputs: np.ndarray,
    reference: Outputs,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    tie_margin: float = 0.0,
) -> Parity:
    """Run ``session`` over ``inputs`` at every batch size and compare with ``reference`` outputs. Agreement is
    over distinct images: one that flips at several batch sizes counts once."""
    ref_prob, ref_emb = reference
    d_prob, d_emb = 0.0, None if ref_emb is None else 0.0
    checked = 0
    flipped: dict[int, float] = {}  # image index -> reference margin of its top-1 over the class chosen instead
    for batch in batch_sizes:
        count = min(len(inputs), max(batch * 4, 8))  # batch 1 over a few images, larger ones over more
        prob, emb = session_outputs(session, inputs[:count], batch)
        d_prob = max(d_prob, float(np.abs(prob - ref_prob[:count]).max()))
        if d_emb is not None and emb is not None and ref_emb is not None:
            d_emb = max(d_emb, float(np.abs(emb - ref_emb[:count]).max()))
        ref_top, top = ref_prob[:count].argmax(1), prob.argmax(1)
        for i in np.flatnonzero(ref_top != top):
            margin = float(ref_prob[i, ref_top[i]] - ref_prob[i, top[i]])
            flipped[int(i)] = max(margin, flipped.get(int(i), 0.0))
        checked = max(checked, count)
    ties = sum(margin <= tie_margin for margin in flipped.values())
    return Parity(
        len(inputs),
        tuple(batch_sizes),
        d_prob,
        d_emb,
        1 - len(flipped) / checked,
        ties,
        1 - (len(flipped) - ties) / checked,
    )


def verify_parity(
    path: Path,
    graph: ServingGraph,
    images: np.ndarray,
    tolerance: Tolerance = FP32,
    batch_sizes: Sequence[int] = BATCH_SIZES,
) -> Parity:
    """ONNX checker, then ONNX Runtime (CPU) vs PyTorch on uint8 ``images``; raises VerificationError
    outside ``tolerance``."""
    check_model(path)
    inputs = graph.prepare(images)
    parity = compare(cpu_session(path), inputs, torch_outputs(graph, inputs), batch_sizes, tolerance.tie_margin)
    log.info(
        "parity of %s on %d images at batch sizes %s: max|dprob| %.2e, max|demb| %s, top-1 agreement %.4f "
        "(%d near-tie flips excused)",
        path.name,
        parity.images,
        parity.batch_sizes,
        parity.max_abs_prob,
        "-" if parity.max_abs_embedding is None else f"{parity.max_abs_embedding:.2e}",
        parity.top1_agreement,
        parity.tie_flips,
    )
    if parity.max_abs_prob > tolerance.max_abs_prob or parity.decisive_agreement < tolerance.min_top1_agreement:
        raise VerificationError(
            f"{path.name}: ONNX Runtime disagrees with PyTorch: max|dprob| {parity.max_abs_prob:.3g} "
            f"(limit {tolerance.max_abs_prob:.3g}), top-1 agreement {parity.decisive_agreement:.4f} "
            f"beyond ties of {tolerance.tie_margin:.3g} (limit {tolerance.min_top1_agreement:.4f})"
        )
    return parity
