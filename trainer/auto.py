"""`--strategy auto`: pick the transfer-learning strategy by measurement, not folklore.

The evidence is one rehearsal of ``two-phase`` on a stratified 80/20 split of the training set,
with the run's own schedule (``--epochs``/``--head-epochs``; ``--auto-epochs`` shortens it). Its
head-only phase *is* a linear probe (frozen backbone), so one rehearsal yields both candidates,
scored on the same hold-out images: the probe at its best head-phase epoch, two-phase at its best
epoch after unfreezing.

| evidence on the hold-out                                          | choice          |
|-------------------------------------------------------------------|-----------------|
| the probe beats two-phase by more than ``auto_margin``, and by a  | feature-extract |
| paired sign test (one-sided, z >= 1.645) on the images they       |                 |
| disagree on: unfreezing the backbone measurably hurt              |                 |
| anything else                                                     | two-phase       |

Two-phase is the prior: it was the best fixed strategy at every data size of the experiment grid
(``docs/experiment.md``), and a hold-out of a few images per class cannot tell a few points apart,
so only clear evidence overrules it. Without pretrained weights there is nothing to transfer: the
choice is ``scratch``. The chosen strategy then trains from the same seed as a run that named it.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from tlserve.manifest import Preprocessing
from tlserve.trainer.config import TrainConfig, start_weights
from tlserve.trainer.data import ImageList, Splits, stratified_split
from tlserve.trainer.distributed import DistContext
from tlserve.trainer.engine import Runtime
from tlserve.trainer.fit import EpochEnd, fit
from tlserve.trainer.models import build_model
from tlserve.trainer.strategies import Phase, plan
from tlserve.trainer.transforms import EvalTransform, TrainTransform

log = logging.getLogger(__name__)
Z_ONE_SIDED_95 = 1.645


@dataclass(frozen=True)
class Evidence:
    """The rehearsal's two candidates on the same ``holdout`` images."""

    holdout: int
    probe_correct: int  # best head-only epoch
    two_phase_correct: int  # best epoch after unfreezing
    probe_only: int  # images the probe got right and two-phase wrong
    two_phase_only: int  # and the other way round

    @property
    def probe_accuracy(self) -> float:
        return self.probe_correct / max(1, self.holdout)

    @property
    def two_phase_accuracy(self) -> float:
        return self.two_phase_correct / max(1, self.holdout)

    @property
    def z(self) -> float:
        """Sign-test statistic for "the probe is better" over the images the two disagree on."""
        discordant = self.probe_only + self.two_phase_only
        return (self.probe_only - self.two_phase_only) / math.sqrt(discordant) if discordant else 0.0


def decide(evidence: Evidence, margin: float) -> tuple[str, str]:
    """(verdict, strategy) from the evidence: feature-extract only when unfreezing clearly hurt."""
    lead = evidence.probe_accuracy - evidence.two_phase_accuracy
    if lead > margin and evidence.z >= Z_ONE_SIDED_95:
        return "unfreezing hurt", "feature-extract"
    if lead > margin:
        return "probe ahead, within noise", "two-phase"
    return "unfreezing helped or tied", "two-phase"


def evidence_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{key.ljust(width)} | {value}" for key, value in rows)


def rehearsal_plan(cfg: TrainConfig) -> list[Phase]:
    """Two-phase with the run's schedule (or ``auto_epochs`` in all), at least one epoch per phase."""
    total = cfg.auto_epochs or cfg.epochs
    head = round(total * cfg.head_epochs / cfg.epochs) if cfg.auto_epochs else cfg.head_epochs
    head = min(max(1, head), max(1, total - 1))
    return plan("two-phase", head + max(1, total - head), head, cfg.lr, cfg.finetune_lr, cfg.backbone_lr_mult)


def compare(per_epoch: list[tuple[str, torch.Tensor]]) -> Evidence:
    """Evidence from each epoch's (phase, per-image correctness): the best epoch of each phase."""

    def best(phase: str) -> torch.Tensor:
        scored = [c for p, c in per_epoch if (p == "head") == (phase == "head")]
        return max(scored, key=lambda c: int(c.sum()))  # the first best epoch, as fit keeps it

    probe, tuned = best("head"), best("full")
    return Evidence(
        holdout=len(probe),
        probe_correct=int(probe.sum()),
        two_phase_correct=int(tuned.sum()),
        probe_only=int((probe & ~tuned).sum()),
        two_phase_only=int((tuned & ~probe).sum()),
    )


def rehearse(cfg: TrainConfig, splits: Splits, pre: Preprocessing, rt: Runtime, dist: DistContext) -> Evidence:
    train, held = stratified_split(splits.train, 0.2, cfg.seed + 17)
    model, config = build_model(cfg.arch, len(splits.classes), cfg.weights, cfg.head, cfg.dropout, pre.input_size)
    per_epoch: list[tuple[str, torch.Tensor]] = []

    def record(end: EpochEnd) -> None:
        per_epoch.append((end.state.history[-1]["phase"], end.result.predictions == end.result.targets))

    fit(
        model.to(rt.device),
        rehearsal_plan(cfg),
        ImageList(train, TrainTransform(pre, cfg.augment)),
        ImageList(held, EvalTransform(pre)),
        cfg.replace(patience=None, ema=None, progress="off"),
        pre,
        rt,
        dist,
        num_classes=len(splits.classes),
        head=config.classifier,
        on_epoch=record,
        tag="auto/rehearsal ",
    )
    return compare(per_epoch)


def choose_strategy(
    cfg: TrainConfig, splits: Splits, pre: Preprocessing, rt: Runtime, dist: DistContext
) -> dict[str, Any]:
    """Rehearse, decide, log the table; returns the evidence (stored in the manifest provenance)."""
    per_class = min(Counter(t for _, t in splits.train).values())
    if start_weights(cfg.strategy, cfg.weights) is None:
        rows = [("images per class (min)", str(per_class)), ("pretrained weights", "none"), ("choice", "scratch")]
        evidence: dict[str, Any] = {"choice": "scratch", "scenario": "no pretrained weights", "per_class": per_class}
    else:
        phases = rehearsal_plan(cfg)
        found = rehearse(cfg, splits, pre, rt, dist)
        verdict, choice = decide(found, cfg.auto_margin)
        schedule = f"{phases[0].epochs}+{phases[1].epochs} ep"
        rows = [
            ("images per class (min)", str(per_class)),
            ("hold-out images", str(found.holdout)),
            (f"linear probe (head phase, {phases[0].epochs} ep), hold-out acc", f"{found.probe_accuracy:.4f}"),
            (f"two-phase rehearsal ({schedule}), hold-out acc", f"{found.two_phase_accuracy:.4f}"),
            (
                "disagreements: probe only / two-phase only",
                f"{found.probe_only} / {found.two_phase_only} (z = {found.z:+.2f})",
            ),
            ("verdict", f"{verdict} (margin {cfg.auto_margin}, z >= {Z_ONE_SIDED_95})"),
            ("choice", choice),
        ]
        evidence = {
            "choice": choice,
            "scenario": verdict,
            "per_class": per_class,
            "holdout": found.holdout,
            "probe_accuracy": found.probe_accuracy,
            "two_phase_accuracy": found.two_phase_accuracy,
            "probe_only": found.probe_only,
            "two_phase_only": found.two_phase_only,
            "z": round(found.z, 4),
            "rehearsal_epochs": [p.epochs for p in phases],
        }
    evidence["table"] = evidence_table(rows)
    if dist.is_main:
        log.info("auto strategy:\n%s", evidence["table"])
    return evidence
