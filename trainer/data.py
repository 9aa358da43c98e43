"""Datasets: ImageFolder train/val(/test) trees, or one folder split stratified with a fixed seed."""

from __future__ import annotations

import logging
import os
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

log = logging.getLogger(__name__)
Sample = tuple[str, int]


class ImageList(Dataset):
    """(path, class index) pairs; images are opened with Pillow and handed to ``transform``."""

    def __init__(self, samples: Sequence[Sample], transform: Callable[[Image.Image], torch.Tensor]):
        self.samples, self.transform = list(samples), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        with Image.open(path) as img:
            return self.transform(img), target

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]


@dataclass(frozen=True)
class Splits:
    classes: tuple[str, ...]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def stratified_split(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split off ``fraction`` of every class (at least one image when the class has two or more)."""
    by_class: dict[int, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_class[sample[1]].append(sample)
    rng = random.Random(seed)
    keep, held = [], []
    for target in sorted(by_class):
        items = sorted(by_class[target])
        rng.shuffle(items)
        n_held = min(len(items) - 1, max(1, round(len(items) * fraction))) if fraction > 0 else 0
        held += items[:n_held]
        keep += items[n_held:]
    return keep, held


def cap_per_class(samples: Sequence[Sample], limit: int | None, seed: int) -> list[Sample]:
    """At most ``limit`` images per class, drawn with a fixed seed."""
    if not limit:
        return list(samples)
    shuffled = sorted(samples)
    random.Random(seed).shuffle(shuffled)
    taken: Counter[int] = Counter()
    kept = []
    for sample in shuffled:
        if taken[sample[1]] < limit:
            taken[sample[1]] += 1
            kept.append(sample)
    return sorted(kept, key=lambda s: (s[1], s[0]))


def _folder(path: Path) -> ImageFolder:
    return ImageFolder(str(path), loader=lambda p: p)  # we only need the listing


def load_splits(
    root: str | os.PathLike,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    max_per_class: int | None = None,
) -> Splits:
    """``root/train`` (+ ``val``/``test`` when present), or ``root`` itself split stratified."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    if (root / "train").is_dir():
        train_folder = _folder(root / "train")
        classes = tuple(train_folder.classes)
        train = list(train_folder.samples)
        parts = {}
        for name in ("val", "test"):
            if (root / name).is_dir():
                folder = _folder(root / name)
                if tuple(folder.classes) != classes:
                    raise ValueError(f"{root / name} has classes {folder.classes}, train has {list(classes)}")
                parts[name] = list(folder.samples)
        if "val" not in parts:
            train, parts["val"] = stratified_split(train, val_fraction, seed)
        test = parts.get("test", [])
        val = parts["val"]
    else:
        folder = _folder(root)
        classes = tuple(folder.classes)
        rest, test = stratified_split(folder.samples, test_fraction, seed + 1)
        train, val = stratified_split(rest, val_fraction / max(1e-9, 1 - test_fraction), seed)
    train = cap_per_class(train, max_per_class, seed)
    if not train or not val:
        raise ValueError(f"{root}: need images for both training and validation")
    log.info("data %s: %d classes, %s", root, len(classes), {"train": len(train), "val": len(val), "test": len(test)})
    return Splits(classes, train, val, test)


def class_weights(targets: Sequence[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, mean 1 over the classes present."""
    counts = Counter(targets)
    weights = torch.tensor([1.0 / counts[c] if counts[c] else 0.0 for c in range(num_classes)])
    return weights * (num_classes / weights.sum())


def default_workers(world_size: int = 1) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cpus // max(1, world_size)
    return 0 if per_process <= 2 else min(8, per_process // 2)
