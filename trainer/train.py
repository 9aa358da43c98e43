"""`tlserve train`: one training run from a resolved TrainConfig to a run directory.

The run directory holds ``checkpoint.pt`` (best), ``last.pt`` (resume), ``metrics.jsonl``,
``loss.png``, ``accuracy.png``, ``confusion_matrix.png``, ``per_class.json``/``.md``,
``calibration.json`` and ``reliability.png`` (unless ``--calibrate off``), ``report.md`` and
``config.yaml``. Under torchrun every rank trains; only rank 0 writes.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tlserve import __version__
from tlserve.manifest import Manifest, Preprocessing
from tlserve.trainer import reports
from tlserve.trainer.auto import choose_strategy
from tlserve.trainer.calibration import CalibrationReport, calibrate
from tlserve.trainer.checkpoint import build, load_model, load_resume, save, save_resume
from tlserve.trainer.config import TrainConfig, save_yaml, start_weights
from tlserve.trainer.data import ImageList, Splits, load_splits
from tlserve.trainer.distributed import DistContext, setup
from tlserve.trainer.engine import EvalResult, Runtime, evaluate, make_runtime
from tlserve.trainer.fit import EpochEnd, FitState, fit
from tlserve.trainer.models import ModelConfig, build_model
from tlserve.trainer.preprocessing import preprocessing_for
from tlserve.trainer.seeding import derive, seed_everything
from tlserve.trainer.strategies import plan, trainable_count
from tlserve.trainer.torchfile import file_sha256
from tlserve.trainer.transforms import EvalTransform, TrainTransform

log = logging.getLogger(__name__)


def model_name(cfg: TrainConfig) -> str:
    raw = cfg.name or Path(cfg.data).resolve().name or "model"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", raw).strip("-") or "model"


def weights_provenance(weights: str | None) -> dict[str, Any]:
    """The starting weights as provenance: their name, or a weights file's name and sha256 (never its path)."""
    if weights is None:
        return {"weights": "none"}
    if Path(weights).is_file():
        return {"weights": Path(weights).name, "weights_sha256": file_sha256(weights)}
    return {"weights": weights}


def set_threads(cfg: TrainConfig, dist: DistContext) -> None:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(cfg.threads or max(1, cpus // dist.world_size))


class RunWriter:
    """Everything that touches the run directory (rank 0 only)."""

    def __init__(
        self,
        cfg: TrainConfig,
        strategy: str,
        model: ModelConfig,
        splits: Splits,
        pre: Preprocessing,
        evidence: dict[str, Any] | None,
        dist: DistContext,
    ):
        self.cfg, self.strategy, self.model, self.splits, self.pre = cfg, strategy, model, splits, pre
        self.evidence = evidence
        self.weights = weights_provenance(start_weights(strategy, cfg.weights))
        self.enabled = dist.is_main
        self.world_size = dist.world_size
        self.dir = Path(cfg.out)
        self.created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        if self.enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            save_yaml(cfg, self.dir / "config.yaml")

    def provenance(self, state: FitState, **extra: Any) -> dict[str, Any]:
        best = next((row for row in state.history if row["epoch"] == state.best_epoch), {})
        prov = {
            "strategy": self.strategy,
            "requested_strategy": self.cfg.strategy,
            **self.weights,
            "head": self.cfg.head,
            "dropout": self.cfg.dropout,
            "dataset": {"name": Path(self.cfg.data).resolve().name, **self.splits.counts()},
            "val": {"accuracy": best.get("val_accuracy"), "loss": best.get("val_loss")},
            "epochs": state.epoch,
            "best_epoch": state.best_epoch,
            "seed": self.cfg.seed,
            "augment": self.cfg.augment,
            "world_size": self.world_size,
            "created": self.created,
            "trainer": f"tlserve {__version__}",
            "torch": torch.__version__,
        }
        if self.evidence is not None:
            prov["auto"] = {k: v for k, v in self.evidence.items() if k != "table"}
        prov.update(extra)
        return prov

    def manifest(self, state: FitState, **extra: Any) -> Manifest:
        return Manifest(
            name=model_name(self.cfg),
            version="0",
            architecture=self.cfg.arch,
            labels=self.splits.classes,
            preprocessing=self.pre,
            provenance=self.provenance(state, **extra),
        )

    def on_epoch(self, end: EpochEnd) -> None:
        if not self.enabled:
            return
        if end.improved:
            manifest = self.manifest(end.state)
            checkpoint = build(end.model, self.model, manifest, epoch=end.state.epoch, train_config=self.cfg.to_dict())
            save(checkpoint, self.dir / "checkpoint.pt")
        save_resume(end.resume, self.evidence, self.dir / "last.pt")
        reports.write_metrics(self.dir, end.state.history)
        reports.plot_curves(self.dir, end.state.history)


def read_resume(cfg: TrainConfig) -> dict[str, Any] | None:
    path = Path(cfg.out) / "last.pt"
    if not cfg.resume:
        return None
    if not path.is_file():
        log.warning("--resume: %s not found, starting from scratch", path)
        return None
    state = load_resume(path)
    log.info("resuming from %s after epoch %d", path, state["state"]["epoch"])
    return state


def held_out(
    model: nn.Module, splits: Splits, cfg: TrainConfig, pre: Preprocessing, rt: Runtime
) -> dict[str, EvalResult]:
    """The best model on test (when there is one) and, when calibrating or without test, on val: logits kept."""
    wanted = {"test": splits.test} if splits.test else {}
    if cfg.calibrate != "off" or not splits.test:
        wanted = {"val": splits.val, **wanted}
    keep = cfg.calibrate != "off"
    results = {}
    for split, samples in wanted.items():
        loader = torch.utils.data.DataLoader(ImageList(samples, EvalTransform(pre)), batch_size=cfg.batch_size * 2)
        results[split] = evaluate(model, loader, nn.CrossEntropyLoss(), pre, rt, keep_logits=keep)
    return results


def calibrate_run(cfg: TrainConfig, results: dict[str, EvalResult]) -> CalibrationReport | None:
    """Temperature scaling fitted on val's logits (``--calibrate temperature``), measured on every split."""
    if cfg.calibrate == "off":
        return None
    return calibrate({split: (r.logits, r.targets) for split, r in results.items() if r.logits is not None})


def finish(
    writer: RunWriter, state: FitState, splits: Splits, cfg: TrainConfig, pre: Preprocessing, rt: Runtime
) -> dict[str, Any]:
    """Evaluate the best checkpoint on test (or val), calibrate it, write the reports, seal the manifest."""
    model, checkpoint = load_model(writer.dir / "checkpoint.pt")
    results = held_out(model.to(rt.device), splits, cfg, pre, rt)
    split = "test" if "test" in results else "val"
    result = results[split]
    class_metrics = reports.write_class_report(writer.dir, result.targets, result.predictions, splits.classes, split)
    calibration = calibrate_run(cfg, results)
    extra = {
        split: {"accuracy": result.accuracy, "loss": result.loss, "macro_f1": class_metrics["macro_f1"]},
        "stopped_early": state.stopped_early,
    }
    manifest = writer.manifest(state, **extra)
    if calibration is not None:
        manifest = manifest.replace(calibration=calibration.manifest_entry())
        reports.write_calibration(writer.dir, calibration)
    temperature = calibration.temperature if calibration is not None else None
    save(checkpoint.replace(manifest=manifest, temperature=temperature), writer.dir / "checkpoint.pt")
    summary = {
        "name": manifest.name,
        "architecture": cfg.arch,
        "strategy": writer.strategy,
        "weights": manifest.provenance["weights"],
        "epochs": state.epoch,
        "best_epoch": state.best_epoch,
        "val_accuracy": round(state.best_accuracy, 4),
        f"{split}_accuracy": round(result.accuracy, 4),
        "macro_f1": round(class_metrics["macro_f1"], 4),
        "image_size": pre.input_size,
        "train/val/test": "/".join(str(v) for v in splits.counts().values()),
    }
    if calibration is not None:
        summary["temperature"] = round(calibration.temperature, 4)
        for name, figures in calibration.splits.items():
            summary[f"{name}_ece"] = f"{figures.ece_before:.4f} -> {figures.ece_after:.4f}"
    table = (writer.evidence or {}).get("table")
    reports.write_report(writer.dir, summary, class_metrics, table, calibration.to_dict() if calibration else None)
    return {**summary, "auto_table": table} if table else summary


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train as ``cfg`` says; returns a summary (rank 0) or {} (other ranks)."""
    dist = setup(cfg.device)
    try:
        return _run(cfg, dist)
    finally:
        dist.close()


def _run(cfg: TrainConfig, dist: DistContext) -> dict[str, Any]:
    set_threads(cfg, dist)
    seed_everything(derive(cfg.seed))
    splits = load_splits(cfg.data, cfg.val_fraction, cfg.test_fraction, cfg.seed, cfg.max_per_class)
    pre = preprocessing_for(cfg.arch, cfg.weights, cfg.image_size, cfg.resize_size)
    rt = make_runtime(cfg.amp, cfg.channels_last, dist.device)
    resume = read_resume(cfg)
    evidence = (resume or {}).get("auto")
    if cfg.strategy == "auto" and evidence is None:
        evidence = choose_strategy(cfg, splits, pre, rt, dist)
        seed_everything(derive(cfg.seed))  # the choice trains exactly as a run that named it
    strategy = evidence["choice"] if cfg.strategy == "auto" else cfg.strategy
    weights = start_weights(strategy, cfg.weights)
    model, model_config = build_model(cfg.arch, len(splits.classes), weights, cfg.head, cfg.dropout, pre.input_size)
    if resume:
        model.load_state_dict(resume["model_state"])
    model = model.to(rt.device, memory_format=torch.channels_last if rt.channels_last else torch.preserve_format)
    phases = plan(strategy, cfg.epochs, cfg.head_epochs, cfg.lr, cfg.finetune_lr, cfg.backbone_lr_mult)
    writer = RunWriter(cfg, strategy, model_config, splits, pre, evidence, dist)
    log.info(
        "training %s (%s, weights %s) with %s: %d classes, %s, %d px, %d parameters",
        cfg.arch,
        cfg.head,
        weights or "none",
        strategy,
        len(splits.classes),
        splits.counts(),
        pre.input_size,
        sum(p.numel() for p in model.parameters()),
    )
    state = fit(
        model,
        phases,
        ImageList(splits.train, TrainTransform(pre, cfg.augment)),
        ImageList(splits.val, EvalTransform(pre)),
        cfg,
        pre,
        rt,
        dist,
        num_classes=len(splits.classes),
        head=model_config.classifier,
        on_epoch=writer.on_epoch,
        resume=resume,
    )
    log.info(
        "trained: best val accuracy %.4f at epoch %d; %d trainable parameters at the end",
        state.best_accuracy,
        state.best_epoch,
        trainable_count(model),
    )
    dist.barrier()
    return finish(writer, state, splits, cfg, pre, rt) if dist.is_main else {}
