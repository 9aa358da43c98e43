"""Real images for verification, calibration and the accuracy gate, preprocessed as the manifest says.

Sources, best first: the run's own data folder (its val split; its train split for calibration),
then the embedded Fashion-MNIST demo data, then bundled photos (scikit-image, matplotlib).
Images come out as uint8 NCHW, exactly what the exported graph takes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tlserve.manifest import Manifest, Preprocessing
from tlserve.trainer.data import load_splits
from tlserve.trainer.demo_data import folder_name, load_arrays
from tlserve.trainer.transforms import EvalTransform

log = logging.getLogger(__name__)

PHOTO_FILES = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "camera.png", "logo.png")


@dataclass(frozen=True)
class Samples:
    """``images`` uint8 [N, 3, S, S]; ``targets`` class indices into the manifest's labels, or None."""

    images: np.ndarray
    targets: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labelled(self) -> bool:
        return self.targets is not None

    def subset(self, limit: int) -> Samples:
        """At most ``limit`` images evenly spread over this set."""
        index = spread(len(self), limit)
        return Samples(self.images[index], None if self.targets is None else self.targets[index], self.source)


def preprocess(images: Iterable[Image.Image], pre: Preprocessing) -> np.ndarray:
    transform = EvalTransform(pre)
    return np.stack([transform(img).numpy() for img in images]).astype(np.uint8)


def spread(count: int, limit: int | None) -> np.ndarray:
    """Indices of at most ``limit`` items evenly spread over ``count`` (every class is represented)."""
    if limit is None or count <= limit:
        return np.arange(count)
    return np.linspace(0, count - 1, limit).round().astype(int)


def from_samples(samples: Sequence[tuple[str, int]], pre: Preprocessing, limit: int | None, source: str) -> Samples:
    chosen = [samples[i] for i in spread(len(samples), limit)]

    def images():
        for path, _ in chosen:
            with Image.open(path) as img:
                yield img.convert("RGB")

    return Samples(preprocess(images(), pre), np.array([t for _, t in chosen], dtype=np.int64), source)


def folder_splits(
    data: str | os.PathLike, manifest: Manifest, config: dict, val_limit: int | None, train_limit: int | None
) -> tuple[Samples, Samples]:
    """(train, val) of an ImageFolder root, split exactly as the run split it."""
    splits = load_splits(
        data,
        config.get("val_fraction", 0.2),
        config.get("test_fraction", 0.0),
        config.get("seed", 0),
        config.get("max_per_class"),
    )
    if set(splits.classes) != set(manifest.labels):
        raise ValueError(f"{data} has classes {list(splits.classes)}, the model has {list(manifest.labels)}")
    index = {label: i for i, label in enumerate(manifest.labels)}  # folder order -> the model's label order
    pre = manifest.preprocessing

    def relabel(samples):
        return [(path, index[splits.classes[target]]) for path, target in samples]

    folder = Path(data).resolve().name  # sources end up in the manifest's provenance: no local paths
    return (
        from_samples(relabel(splits.train), pre, train_limit, f"{folder} (train)"),
        from_samples(relabel(splits.val), pre, val_limit, f"{folder} (val)"),
    )


def demo_labelled(manifest: Manifest) -> bool:
    """Whether the model's labels are the embedded demo data's (in order)."""
    demo_labels = tuple(folder_name(str(label)) for label in load_arrays()["labels"])
    return tuple(folder_name(label) for label in manifest.labels) == demo_labels


def demo_split(split: str, manifest: Manifest, limit: int | None) -> Samples:
    """A split of the embedded demo data; labelled when the model's labels are the demo's."""
    arrays = load_arrays()
    labelled = demo_labelled(manifest)
    index = spread(len(arrays[f"{split}_x"]), limit)
    images = (Image.fromarray(arrays[f"{split}_x"][i]) for i in index)
    targets = arrays[f"{split}_y"][index].astype(np.int64) if labelled else None
    return Samples(preprocess(images, manifest.preprocessing), targets, f"demo data ({split})")


def photo_paths() -> list[Path]:
    """Bundled real photos (scikit-image's data folder, matplotlib's grace_hopper.jpg) that are installed."""
    paths: list[Path] = []
    try:
        import skimage

        paths += [Path(skimage.__file__).parent / "data" / name for name in PHOTO_FILES]
    except ImportError:
        pass
    try:
        import matplotlib

        paths.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    except ImportError:
        pass
    return [p for p in paths if p.is_file()]


def photos(pre: Preprocessing) -> Samples | None:
    paths = photo_paths()
    if not paths:
        return None

    def images():
        for path in paths:
            with Image.open(path) as img:
                yield img.convert("RGB")

    return Samples(preprocess(images(), pre), None, "photos")


def concat(parts: Sequence[Samples | None]) -> Samples:
    parts = [p for p in parts if p is not None and len(p)]
    targets = None
    if all(p.labelled for p in parts):
        targets = np.concatenate([p.targets for p in parts])
    return Samples(np.concatenate([p.images for p in parts]), targets, " + ".join(p.source for p in parts))


def run_data(
    manifest: Manifest,
    config: dict,
    data: str | os.PathLike | None,
    val_limit: int | None,
    train_limit: int | None,
    labelled_limit: int | None = None,
) -> tuple[Samples, Samples]:
    """(calibration, validation) images for a model: the run's data folder when it can be found,
    else the embedded demo data (labelled only when the labels match) plus bundled photos.

    Validation images that carry the model's own labels are read up to the larger of ``val_limit`` and
    ``labelled_limit`` (the drift baseline wants more of them than verification does)."""
    wider = None if val_limit is None or labelled_limit is None else max(val_limit, labelled_limit)
    folder = data or config.get("data")
    if folder and Path(folder).is_dir():
        return folder_splits(folder, manifest, config, wider, train_limit)
    if folder:
        log.warning("data folder %s not found: verifying on the embedded demo data and bundled photos", folder)
    if demo_labelled(manifest):
        val = demo_split("val", manifest, wider)
    else:
        val = concat([demo_split("val", manifest, val_limit), photos(manifest.preprocessing)])
    return demo_split("train", manifest, train_limit), val
