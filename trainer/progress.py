"""What a training run shows while it runs: the tqdm bar of each epoch and the one line logged after it."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from tlserve.trainer.config import TrainConfig
from tlserve.trainer.distributed import DistContext


def progress_bar(enabled: bool, desc: str) -> Callable[[Iterable], Iterable]:
    """A tqdm bar on stderr that clears itself when the epoch ends (the epoch line then takes its place)."""
    if not enabled:
        return iter
    from tqdm.auto import tqdm

    return lambda it: tqdm(it, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def show_progress(cfg: TrainConfig, dist: DistContext) -> bool:
    return dist.is_main and (cfg.progress == "on" or (cfg.progress == "auto" and sys.stderr.isatty()))


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def eta_seconds(history: Sequence[Mapping[str, Any]], total_epochs: int) -> float:
    """The epochs still to run times the mean wall time of the epochs timed so far."""
    timed = [row["seconds"] for row in history if row.get("seconds")]
    if not timed or not history:
        return 0.0
    return max(0, total_epochs - history[-1]["epoch"]) * sum(timed) / len(timed)


def epoch_line(row: Mapping[str, Any], total_epochs: int, eta: float, improved: bool, tag: str = "") -> str:
    """``epoch 3/6 [full] train loss 0.6123 acc 0.7810 | val loss 0.5012 acc 0.8320 | lr 8.54e-04 |
    412 img/s | ETA 1m20s *``: lr of the head at the epoch's last batch, training images per second, the
    rest of the run at the mean epoch time so far, ``*`` = the best val accuracy so far (kept in checkpoint.pt)."""
    return (
        f"{tag}epoch {row['epoch']}/{total_epochs} [{row['phase']}] "
        f"train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f} | "
        f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f} | "
        f"lr {row['last_batch_lr']:.2e} | {row['images_per_second']:.0f} img/s | ETA {duration(eta)}"
        + (" *" if improved else "")
    )
