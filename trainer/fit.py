"""The epoch loop over a strategy's phases: optimiser and schedule per phase, EMA, early stopping, resume."""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from tlserve.manifest import Preprocessing
from tlserve.trainer.config import TrainConfig
from tlserve.trainer.data import ImageList, class_weights, default_workers
from tlserve.trainer.distributed import DistContext
from tlserve.trainer.engine import EvalResult, Runtime, evaluate, train_epoch
from tlserve.trainer.loaders import eval_loader, train_loader
from tlserve.trainer.progress import epoch_line, eta_seconds, progress_bar, show_progress
from tlserve.trainer.seeding import derive, seed_everything
from tlserve.trainer.strategies import Phase, freeze_batchnorm, param_groups, set_trainable, trainable_count

log = logging.getLogger(__name__)


@dataclass
class FitState:
    """What the loop knows between epochs; saved in ``last.pt`` for ``--resume``."""

    epoch: int = 0  # epochs completed
    best_accuracy: float = -1.0
    best_epoch: int = -1
    stale: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class EpochEnd:
    """Handed to the ``on_epoch`` callback after every epoch (checkpointing happens there)."""

    model: nn.Module  # the weights to keep (the EMA copy when EMA is on)
    state: FitState
    improved: bool
    result: EvalResult
    resume: dict[str, Any]  # optimiser, schedule, scaler, EMA, phase: what last.pt needs


def make_optimizer(cfg: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up to each group's LR, then cosine decay to zero, stepped every batch."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class PhaseRunner:
    """Optimiser, schedule and scaler for one phase; rebuilt when the phase changes."""

    def __init__(
        self,
        model: nn.Module,
        head: str,
        phase: Phase,
        cfg: TrainConfig,
        steps_per_epoch: int,
        rt: Runtime,
        dist: DistContext,
    ):
        set_trainable(model, head, phase.name, cfg.unfreeze)
        self.phase, self.net = phase, dist.wrap(model)
        self.optimizer = make_optimizer(cfg, param_groups(model, head, phase.lr, phase.backbone_lr_mult))
        total = max(1, steps_per_epoch * phase.epochs)
        warmup = min(total, max(1, round(cfg.warmup_epochs * steps_per_epoch)))
        self.scheduler = warmup_cosine(self.optimizer, warmup, total)
        self.scaler = torch.amp.GradScaler("cuda") if rt.amp_dtype == torch.float16 else None
        log.info(
            "phase %s: %d epochs, lr %g (backbone x%g), %d trainable parameters",
            phase.name,
            phase.epochs,
            phase.lr,
            phase.backbone_lr_mult,
            trainable_count(model),
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def fit(
    model: nn.Module,
    phases: Sequence[Phase],
    train_set: ImageList,
    val_set: ImageList,
    cfg: TrainConfig,
    pre: Preprocessing,
    rt: Runtime,
    dist: DistContext,
    *,
    num_classes: int,
    head: str,
    on_epoch: Callable[[EpochEnd], None] | None = None,
    resume: dict[str, Any] | None = None,
    tag: str = "",
) -> FitState:
    """Train ``model`` in place through ``phases``; returns the final state (best epoch, history).
    ``head`` is the dotted name of the model's new head (``ModelConfig.classifier``)."""
    state = FitState(**resume["state"]) if resume else FitState()
    weights = class_weights(train_set.targets, num_classes).to(rt.device) if cfg.balance == "loss" else None
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.label_smoothing)
    val_criterion = nn.CrossEntropyLoss()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True) if cfg.ema else None
    if ema is not None and resume and resume.get("ema"):
        ema.load_state_dict(resume["ema"])
    workers = cfg.workers if cfg.workers is not None else default_workers(dist.world_size)
    val_loader = eval_loader(val_set, cfg.batch_size, workers, dist)
    ends = list(itertools.accumulate(p.epochs for p in phases))
    runner: PhaseRunner | None = None
    for epoch in range(state.epoch, ends[-1] if ends else 0):
        if state.stopped_early:
            break
        index = bisect.bisect_right(ends, epoch)
        loader = train_loader(
            train_set, cfg.batch_size, workers, derive(cfg.seed, epoch), dist, cfg.balance == "sampler", num_classes
        )
        if runner is None or runner.phase is not phases[index]:
            first = runner is None
            runner = PhaseRunner(model, head, phases[index], cfg, len(loader), rt, dist)
            if first and resume and resume.get("phase") == index:
                runner.load_state_dict(resume["runner"])
        seed_everything(derive(cfg.seed, epoch, dist.rank))
        net = runner.net
        started = time.perf_counter()
        stats = train_epoch(
            net,
            loader,
            runner.optimizer,
            runner.scheduler,
            criterion,
            pre,
            rt,
            prepare=lambda net=net, runner=runner: (net.train(), freeze_batchnorm(model, runner.phase.bn_inference)),
            scaler=runner.scaler,
            grad_clip=cfg.grad_clip,
            ema=ema,
            progress=progress_bar(show_progress(cfg, dist), f"{tag}epoch {epoch + 1}/{ends[-1]}"),
        )
        trained = time.perf_counter()
        kept = ema.module if ema is not None else model
        result = evaluate(kept, val_loader, val_criterion, pre, rt)
        improved = result.accuracy > state.best_accuracy
        state.best_accuracy, state.best_epoch = (
            (result.accuracy, epoch + 1) if improved else (state.best_accuracy, state.best_epoch)
        )
        state.stale = 0 if improved else state.stale + 1
        state.stopped_early = bool(cfg.patience) and state.stale >= cfg.patience
        state.epoch = epoch + 1
        state.history.append(
            {
                "epoch": epoch + 1,
                "phase": runner.phase.name,
                "train_loss": stats.loss,
                "train_accuracy": stats.accuracy,
                "val_loss": result.loss,
                "val_accuracy": result.accuracy,
                "lr": runner.optimizer.param_groups[0]["lr"],  # after the epoch: the next batch's
                "last_batch_lr": stats.lr,
                "images": stats.images * dist.world_size,
                "images_per_second": stats.images * dist.world_size / max(1e-9, trained - started),
                "seconds": time.perf_counter() - started,  # train + val
            }
        )
        if dist.is_main:
            log.info(epoch_line(state.history[-1], ends[-1], eta_seconds(state.history, ends[-1]), improved, tag))
        if on_epoch is not None:
            on_epoch(
                EpochEnd(
                    kept,
                    state,
                    improved,
                    result,
                    {
                        "state": asdict(state),
                        "phase": index,
                        "model_state": model.state_dict(),
                        "runner": runner.state_dict(),
                        "ema": ema.state_dict() if ema is not None else None,
                    },
                )
            )
    return state
