"""Shared fixtures: a tiny ImageFolder tree made from the embedded demo data (real Fashion-MNIST images)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: do not spin on a shared CPU


def _write_tree(root, per_split: dict[str, int], classes: int = 3):
    from PIL import Image

    from tlserve.trainer.demo_data import folder_name, load_arrays

    arrays = load_arrays()
    labels = [folder_name(str(label)) for label in arrays["labels"]][:classes]
    for split, per_class in per_split.items():
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        for target, label in enumerate(labels):
            folder = root / split / label
            folder.mkdir(parents=True)
            for n, index in enumerate([i for i in range(len(y)) if y[i] == target][:per_class]):
                Image.fromarray(x[index]).save(folder / f"{n}.png")
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """3 classes of real Fashion-MNIST images: 8 train, 4 val, 4 test each."""
    return _write_tree(tmp_path_factory.mktemp("tiny"), {"train": 8, "val": 4, "test": 4})


@pytest.fixture(scope="session")
def torch_modules():
    return pytest.importorskip("torch"), pytest.importorskip("torchvision")
