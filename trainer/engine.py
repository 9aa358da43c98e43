"""One epoch of training and one pass of evaluation (device, AMP, channels_last, EMA, clipping)."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from tlserve.manifest import Preprocessing
from tlserve.trainer.transforms import normalize

log = logging.getLogger(__name__)
AUX_WEIGHT = 0.4  # Inception's auxiliary loss weight during training


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors run."""

    device: torch.device
    amp_dtype: torch.dtype | None = None  # bf16/fp16 autocast on CUDA, None for fp32
    channels_last: bool = False

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def batch(self, images: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
        x = normalize(images.to(self.device, non_blocking=True), pre)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def make_runtime(amp: str, channels_last: bool, device: torch.device) -> Runtime:
    """``amp``: auto|bf16|fp16|off. AMP and channels_last only apply on CUDA."""
    if device.type != "cuda":
        return Runtime(device)
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return Runtime(device, dtype, channels_last)


def _loss(criterion: nn.Module, output, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits); Inception's auxiliary logits add ``AUX_WEIGHT`` x their loss in training."""
    if hasattr(output, "aux_logits") and output.aux_logits is not None:
        return criterion(output.logits, targets) + AUX_WEIGHT * criterion(output.aux_logits, targets), output.logits
    logits = output.logits if hasattr(output, "logits") else output
    return criterion(logits, targets), logits


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int
    lr: float = 0.0  # of the first parameter group (the head), at the epoch's last batch


def train_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler,
    criterion: nn.Module,
    pre: Preprocessing,
    rt: Runtime,
    *,
    prepare: Callable[[], None],
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float | None = None,
    ema: nn.Module | None = None,
    progress: Callable[[Iterable], Iterable] = iter,
) -> EpochStats:
    """Train for one pass over ``loader``; ``prepare`` sets train/eval modes (frozen BatchNorm)."""
    prepare()
    total_loss, correct, seen, lr = 0.0, 0, 0, 0.0
    for images, targets in progress(loader):
        lr = optimizer.param_groups[0]["lr"]
        x, y = rt.batch(images, pre), targets.to(rt.device, non_blocking=True)
        with rt.autocast():
            loss, logits = _loss(criterion, model(x), y)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"training loss is {loss.item()}: lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        total_loss += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
    return EpochStats(total_loss / max(1, seen), correct / max(1, seen), seen, lr)


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    predictions: torch.Tensor
    targets: torch.Tensor
    logits: torch.Tensor | None = None  # float32 on the CPU, with ``keep_logits``


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    criterion: nn.Module,
    pre: Preprocessing,
    rt: Runtime,
    *,
    keep_logits: bool = False,
) -> EvalResult:
    """One pass without gradients; ``keep_logits`` also returns every logit (for calibration)."""
    model.eval()
    losses, preds, targets, kept = [], [], [], []
    for images, y in loader:
        x, y = rt.batch(images, pre), y.to(rt.device)
        with rt.autocast():
            logits = model(x)
        losses.append(criterion(logits.float(), y).item() * len(y))
        preds.append(logits.argmax(1).cpu())
        targets.append(y.cpu())
        if keep_logits:
            kept.append(logits.float().cpu())
    p, t = torch.cat(preds), torch.cat(targets)
    accuracy = (p == t).float().mean().item() if len(t) else 0.0
    return EvalResult(sum(losses) / max(1, len(t)), accuracy, p, t, torch.cat(kept) if keep_logits else None)
