"""The embedded demo dataset (a Fashion-MNIST subset, MIT licence) written out as an ImageFolder tree."""

from __future__ import annotations

import io
import logging
import os
import re
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)
PACKAGE, FILENAME = "tlserve.trainer", "demo_data/fashion_mnist_subset.npz"


def load_arrays() -> dict[str, np.ndarray]:
    data = resources.files(PACKAGE).joinpath(FILENAME).read_bytes()
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def folder_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")


def write_image_folder(out_dir: str | os.PathLike) -> dict[str, int]:
    """Write ``out_dir/{train,val,test}/<label>/<n>.png``; returns images written per split."""
    arrays = load_arrays()
    labels = [folder_name(str(label)) for label in arrays["labels"]]
    out = Path(out_dir)
    counts = {}
    for split in ("train", "val", "test"):
        images, targets = arrays[f"{split}_x"], arrays[f"{split}_y"]
        for label in labels:
            (out / split / label).mkdir(parents=True, exist_ok=True)
        for n, (image, target) in enumerate(zip(images, targets)):
            Image.fromarray(image).save(out / split / labels[int(target)] / f"{n:05d}.png")
        counts[split] = len(images)
    log.info("demo data in %s: %s", out, counts)
    return counts
