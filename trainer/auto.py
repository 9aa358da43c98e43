"""`--strategy auto`: pick the transfer-learning strategy by measurement, not folklore.

Two facts decide the scenario:
- size: images per class in the training split (``small`` below ``auto_small_per_class``);
- similarity to the pretraining data: a quick linear probe (frozen backbone) is compared with a
  quick short fine-tune on a stratified hold-out of the training split. When the frozen features
  already do as well (within ``auto_margin``), the data is "similar"; when unfreezing helps, "different".

| scenario            | choice           |
|---------------------|------------------|
| small and similar   | feature-extract  |
| small and different | two-phase        |
| large and similar   | two-phase        |
| large and different | finetune         |

Without pretrained weights there is nothing to transfer: the choice is ``scratch``.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from tlserve.manifest import Preprocessing
from tlserve.trainer.config import TrainConfig, start_weights
from tlserve.trainer.data import ImageList, Splits, stratified_split
from tlserve.trainer.distributed import DistContext
from tlserve.trainer.engine import Runtime
from tlserve.trainer.fit import fit
from tlserve.trainer.models import build_model
from tlserve.trainer.strategies import plan
from tlserve.trainer.transforms import EvalTransform, TrainTransform

log = logging.getLogger(__name__)
CHOICES = {
    (True, True): "feature-extract",
    (True, False): "two-phase",
    (False, True): "two-phase",
    (False, False): "finetune",
}


def decide(per_class: int, probe: float, finetune: float, small_per_class: int, margin: float) -> tuple[str, str]:
    """(scenario, strategy) from the evidence."""
    small, similar = per_class < small_per_class, probe >= finetune - margin
    scenario = f"{'small' if small else 'large'} and {'similar' if similar else 'different'}"
    return scenario, CHOICES[(small, similar)]


def evidence_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{key.ljust(width)} | {value}" for key, value in rows)


def _quick(
    strategy: str, cfg: TrainConfig, splits: Splits, train, held, pre: Preprocessing, rt: Runtime, dist: DistContext
) -> float:
    model, config = build_model(cfg.arch, len(splits.classes), cfg.weights, cfg.head, cfg.dropout, pre.input_size)
    model = model.to(rt.device)
    phases = plan(strategy, cfg.auto_epochs, 0, cfg.lr, cfg.lr, cfg.backbone_lr_mult)
    quick_cfg = cfg.replace(patience=None, ema=None, progress="off")
    state = fit(
        model,
        phases,
        ImageList(train, TrainTransform(pre, cfg.augment)),
        ImageList(held, EvalTransform(pre)),
        quick_cfg,
        pre,
        rt,
        dist,
        num_classes=len(splits.classes),
        head=config.classifier,
        tag=f"auto/{strategy} ",
    )
    return state.best_accuracy


def choose_strategy(
    cfg: TrainConfig, splits: Splits, pre: Preprocessing, rt: Runtime, dist: DistContext
) -> dict[str, Any]:
    """Run the probe and the quick fine-tune, decide, log the table; returns the evidence."""
    counts = Counter(t for _, t in splits.train)
    per_class = min(counts.values())
    if start_weights(cfg.strategy, cfg.weights) is None:
        rows = [("images per class (min)", str(per_class)), ("pretrained weights", "none"), ("choice", "scratch")]
        evidence = {"choice": "scratch", "scenario": "no pretrained weights", "per_class": per_class}
    else:
        train, held = stratified_split(splits.train, 0.2, cfg.seed + 17)
        probe = _quick("feature-extract", cfg, splits, train, held, pre, rt, dist)
        tuned = _quick("finetune", cfg, splits, train, held, pre, rt, dist)
        scenario, choice = decide(per_class, probe, tuned, cfg.auto_small_per_class, cfg.auto_margin)
        rows = [
            (
                "images per class (min)",
                f"{per_class} ({'<' if per_class < cfg.auto_small_per_class else '>='} {cfg.auto_small_per_class})",
            ),
            (f"linear probe, {cfg.auto_epochs} ep, hold-out acc", f"{probe:.4f}"),
            (f"quick fine-tune, {cfg.auto_epochs} ep, hold-out acc", f"{tuned:.4f}"),
            ("scenario", scenario),
            ("choice", choice),
        ]
        evidence = {
            "choice": choice,
            "scenario": scenario,
            "per_class": per_class,
            "probe_accuracy": probe,
            "finetune_accuracy": tuned,
            "probe_epochs": cfg.auto_epochs,
            "holdout": len(held),
        }
    evidence["table"] = evidence_table(rows)
    if dist.is_main:
        log.info("auto strategy:\n%s", evidence["table"])
    return evidence
