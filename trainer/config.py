"""The resolved training configuration: defaults < ``--config run.yaml`` < command-line flags.

Parsed once at the entry point (``tlserve train``) and passed down as a frozen dataclass.
The defaults are demo-friendly: pretrained MobileNetV2, two-phase, 64 px, a few epochs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

STRATEGIES = ("two-phase", "feature-extract", "partial", "finetune", "scratch", "auto")
BALANCE = ("none", "sampler", "loss")
AUGMENT = ("none", "light", "classic", "strong")
OPTIMIZERS = ("adamw", "sgd")
CALIBRATE = ("temperature", "off")


def start_weights(strategy: str, weights: str | None) -> str | None:
    """The pretrained weights a run starts from: ``weights``, or None when the strategy is
    ``scratch`` or the weights are "none". (The one place this rule is written.)"""
    if strategy == "scratch" or not weights or weights.lower() == "none":
        return None
    return weights


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of one training run (see ``docs/training.md``)."""

    data: str = ""
    out: str = ""
    name: str | None = None
    arch: str = "mobilenet_v2"
    weights: str = "IMAGENET1K_V1"  # every torchvision classifier has it; offline caches hold it
    strategy: str = "two-phase"
    unfreeze: int = 2
    head: str = "linear"
    dropout: float = 0.0
    # data
    image_size: int | None = None  # None: the weights' own size (224 for ImageNet weights); the demo uses 64
    resize_size: int | None = None
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    balance: str = "none"
    augment: str = "light"
    max_per_class: int | None = None
    workers: int | None = None
    # recipe
    epochs: int = 6
    head_epochs: int = 2
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 3e-3
    finetune_lr: float = 1e-3
    backbone_lr_mult: float = 0.1
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0
    ema: float | None = None
    amp: str = "auto"
    channels_last: bool = True
    patience: int | None = None
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    resume: bool = False
    # auto strategy
    auto_epochs: int | None = None  # None: the rehearsal runs the run's own --epochs/--head-epochs
    auto_margin: float = 0.02
    # after training: temperature scaling on val (folded into the exported graph), or off
    calibrate: str = "temperature"
    progress: str = "auto"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = (
            ("strategy", STRATEGIES),
            ("balance", BALANCE),
            ("augment", AUGMENT),
            ("optimizer", OPTIMIZERS),
            ("calibrate", CALIBRATE),
        )
        for name, choices in checks:
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.strategy == "two-phase" and not 0 <= self.head_epochs <= self.epochs:
            raise ValueError(f"head_epochs must be within 0..epochs, got {self.head_epochs}/{self.epochs}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.auto_epochs is not None and self.auto_epochs < 2:
            raise ValueError(f"auto_epochs must be >= 2 (a head phase and a fine-tuning phase), got {self.auto_epochs}")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELD_NAMES = tuple(f.name for f in fields(TrainConfig))


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a training config must be a mapping")
    data = {key.replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(data) - set(FIELD_NAMES))
    if unknown:
        raise ValueError(f"{path}: unknown training options {unknown}")
    return data


def resolve(cli_values: Mapping[str, Any], config_file: str | None = None) -> TrainConfig:
    """Merge defaults, the YAML file and the explicitly given CLI values (None = not given)."""
    merged: dict[str, Any] = load_yaml(config_file) if config_file else {}
    merged.update({k: v for k, v in cli_values.items() if k in FIELD_NAMES and v is not None})
    return TrainConfig(**merged)


def save_yaml(config: TrainConfig, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
