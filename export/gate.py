"""The int8 accuracy gate: validation top-1 of the int8 graph against the fp32 graph, plus the CPU speed ratio."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tlserve.export.verify import VerificationError, cpu_session

log = logging.getLogger(__name__)

MAX_DROP_POINTS = 1.0


@dataclass(frozen=True)
class Int8Report:
    """Accuracies in [0, 1]; ``drop_points`` = 100 * (fp32 - int8); ``speed_ratio`` = int8 img/s / fp32 img/s."""

    images: int
    fp32_top1: float | None  # None without labelled validation images
    int8_top1: float | None
    drop_points: float | None
    top1_agreement: float
    speed_ratio: float
    forced: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def probabilities(session: ort.InferenceSession, inputs: np.ndarray, batch: int = 64) -> np.ndarray:
    """[N, C] float32 probabilities of ``session`` over ``inputs``, ``batch`` rows at a time."""
    name = session.get_inputs()[0].name
    return np.concatenate(
        [
            session.run(["probabilities"], {name: inputs[i : i + batch]})[0].astype(np.float32)
            for i in range(0, len(inputs), batch)
        ]
    )


def predictions(session: ort.InferenceSession, inputs: np.ndarray, batch: int = 64) -> np.ndarray:
    return probabilities(session, inputs, batch).argmax(1)


def speed_ratio(fp32: Path, int8: Path, inputs: np.ndarray, batch: int = 8, rounds: int = 7) -> float:
    """int8 / fp32 throughput on one CPU thread, the two sessions timed alternately (median of ``rounds``)."""
    sessions = [cpu_session(fp32, threads=1), cpu_session(int8, threads=1)]
    x = {sessions[0].get_inputs()[0].name: inputs[:batch]}
    times: list[list[float]] = [[], []]
    for session in sessions:
        session.run(None, x)  # warm-up
    for _ in range(rounds):
        for i, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(None, x)
            times[i].append(time.perf_counter() - start)
    return float(np.median(times[0]) / np.median(times[1]))


def int8_gate(
    fp32: Path,
    int8: Path,
    inputs: np.ndarray,
    targets: np.ndarray | None,
    force: bool = False,
    max_drop_points: float = MAX_DROP_POINTS,
) -> Int8Report:
    """Measure the int8 model against the fp32 one on labelled validation inputs; raise VerificationError
    when top-1 drops more than ``max_drop_points`` (or no labels exist), unless ``force``."""
    ref = predictions(cpu_session(fp32), inputs)
    got = predictions(cpu_session(int8), inputs)
    ratio = speed_ratio(fp32, int8, inputs)
    if targets is None:
        report = Int8Report(len(inputs), None, None, None, float((ref == got).mean()), ratio, force)
        if not force:
            raise VerificationError(
                "int8 needs labelled validation images for its accuracy gate (give --data "
                "with the run's image folder), or --force to publish it ungated"
            )
        return report
    fp32_top1, int8_top1 = float((ref == targets).mean()), float((got == targets).mean())
    drop = round(100.0 * (fp32_top1 - int8_top1), 6)
    report = Int8Report(
        len(inputs), fp32_top1, int8_top1, drop, float((ref == got).mean()), ratio, force and drop > max_drop_points
    )
    log.info(
        "int8 gate on %d val images: top-1 fp32 %.4f, int8 %.4f (drop %.2f points), agreement %.4f, "
        "CPU speed int8/fp32 %.2fx",
        len(inputs),
        fp32_top1,
        int8_top1,
        drop,
        report.top1_agreement,
        ratio,
    )
    if drop > max_drop_points and not force:
        raise VerificationError(
            f"int8 drops validation top-1 by {drop:.2f} points (fp32 {fp32_top1:.4f} -> int8 "
            f"{int8_top1:.4f}, limit {max_drop_points} points); refusing (--force to publish)"
        )
    return report
