"""Temperature scaling (Guo et al., 2017): fit T on validation logits, measure ECE and NLL before and after.

Served probabilities become ``softmax(logits / T)``. T > 0 rescales every logit by the same factor,
so the top-1 class never changes; only the confidence does. T is fitted by minimising the NLL with
L-BFGS over ``log T`` (so T stays positive), on logits computed once, without gradients.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.nn import functional as F

from tlserve.manifest import Calibration

log = logging.getLogger(__name__)

ECE_BINS = 15
T_RANGE = (1e-2, 1e2)  # a fit outside this (a validation set with no mistakes drives T to 0) is clamped


@dataclass(frozen=True)
class Reliability:
    """Top-1 predictions in ``bins`` equal-width confidence bins over [0, 1]: (lo, hi], the first one [0, hi]."""

    counts: np.ndarray  # images per bin
    confidence: np.ndarray  # mean top-1 confidence per bin (0 where empty)
    accuracy: np.ndarray  # fraction correct per bin (0 where empty)

    @property
    def bins(self) -> int:
        return len(self.counts)

    @property
    def ece(self) -> float:
        """Expected calibration error: sum over bins of (share of images) x |accuracy - confidence|."""
        total = self.counts.sum()
        return float((self.counts / max(1, total) * np.abs(self.accuracy - self.confidence)).sum())


def reliability(probabilities: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    """Bin the top-1 confidence of ``probabilities`` [N, C] against ``targets`` [N]."""
    probabilities, targets = np.asarray(probabilities, dtype=np.float64), np.asarray(targets)
    confidence = probabilities.max(1)
    correct = (probabilities.argmax(1) == targets).astype(np.float64)
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    safe = np.maximum(counts, 1)
    return Reliability(
        counts,
        np.bincount(index, weights=confidence, minlength=bins) / safe,
        np.bincount(index, weights=correct, minlength=bins) / safe,
    )


def expected_calibration_error(probabilities: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> float:
    return reliability(probabilities, targets, bins).ece


def scaled_probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T) in float64 (so dividing cannot create ties and move the argmax)."""
    return torch.softmax(logits.double() / temperature, dim=1)


def nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    return float(F.cross_entropy(logits.double() / temperature, targets.long()))


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 100) -> float:
    """The T > 0 minimising NLL(softmax(logits / T), targets): L-BFGS over log T, from T = 1."""
    logits, targets = logits.detach().double(), targets.detach().long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature):
        log.warning("temperature fit did not converge (T = %s): keeping T = 1", temperature)
        return 1.0
    clamped = min(max(temperature, T_RANGE[0]), T_RANGE[1])
    if clamped != temperature:
        log.warning("fitted temperature %.4g is outside %s: clamped to %.4g", temperature, T_RANGE, clamped)
    return clamped


@dataclass(frozen=True)
class SplitCalibration:
    """One split's figures before and after scaling (top-1 accuracy is the same for both, by construction)."""

    images: int
    accuracy: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float


@dataclass(frozen=True)
class CalibrationReport:
    temperature: float
    fitted_on: str
    bins: int
    splits: Mapping[str, SplitCalibration]
    before: Reliability  # of ``shown`` (the test split when the run has one), for the diagram
    after: Reliability
    shown: str

    def manifest_entry(self) -> Calibration:
        """The manifest's ``calibration``, with the figures of the held-out split."""
        figures = self.splits[self.shown]
        return Calibration(
            temperature=self.temperature,
            split=self.shown,
            bins=self.bins,
            ece_before=figures.ece_before,
            ece_after=figures.ece_after,
            nll_before=figures.nll_before,
            nll_after=figures.nll_after,
        )

    def to_dict(self) -> dict:
        return {
            "method": "temperature",
            "temperature": self.temperature,
            "fitted_on": self.fitted_on,
            "bins": self.bins,
            "splits": {name: asdict(figures) for name, figures in self.splits.items()},
        }


def measure(logits: torch.Tensor, targets: torch.Tensor, temperature: float, bins: int = ECE_BINS):
    """(SplitCalibration, reliability before, reliability after) of one split's logits at ``temperature``."""
    before, after = scaled_probabilities(logits, 1.0), scaled_probabilities(logits, temperature)
    if not torch.equal(before.argmax(1), after.argmax(1)):
        raise RuntimeError("temperature scaling changed a top-1 prediction: it must not")
    y = targets.numpy()
    rel_before, rel_after = reliability(before.numpy(), y, bins), reliability(after.numpy(), y, bins)
    figures = SplitCalibration(
        images=len(y),
        accuracy=float((before.argmax(1) == targets).double().mean()) if len(y) else 0.0,
        ece_before=rel_before.ece,
        ece_after=rel_after.ece,
        nll_before=nll(logits, targets),
        nll_after=nll(logits, targets, temperature),
    )
    return figures, rel_before, rel_after


def calibrate(
    splits: Mapping[str, tuple[torch.Tensor, torch.Tensor]], fit_on: str = "val", bins: int = ECE_BINS
) -> CalibrationReport:
    """Fit T on ``splits[fit_on]`` (logits, targets) and measure every split; the diagram shows "test" if
    there is one, else ``fit_on``."""
    temperature = fit_temperature(*splits[fit_on])
    shown = "test" if "test" in splits else fit_on
    measured = {name: measure(logits, targets, temperature, bins) for name, (logits, targets) in splits.items()}
    figures = {name: m[0] for name, m in measured.items()}
    for name, f in figures.items():
        log.info(
            "calibration (T = %.4f, fitted on %s), %s: ECE %.4f -> %.4f, NLL %.4f -> %.4f, top-1 %.4f unchanged",
            temperature,
            fit_on,
            name,
            f.ece_before,
            f.ece_after,
            f.nll_before,
            f.nll_after,
            f.accuracy,
        )
    return CalibrationReport(temperature, fit_on, bins, figures, measured[shown][1], measured[shown][2], shown)
