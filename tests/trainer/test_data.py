"""Data: stratified splits, grey/RGBA conversion, balance, augmentation presets, the eval transform."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def flat_folder(tmp_path_factory, torch_modules):
    """One folder of class folders (no train/val): 10, 20 and 30 real images, grey, RGB and RGBA."""
    from PIL import Image

    from tlserve.trainer.demo_data import load_arrays

    arrays = load_arrays()
    root = tmp_path_factory.mktemp("flat")
    for target, (label, count, mode) in enumerate([("a", 10, "L"), ("b", 20, "RGB"), ("c", 30, "RGBA")]):
        (root / label).mkdir()
        for n, image in enumerate(arrays["train_x"][arrays["train_y"] == target][:count]):
            Image.fromarray(image).convert(mode).save(root / label / f"{n}.png")
    return root


def test_one_folder_is_split_stratified_with_a_fixed_seed(flat_folder):
    from tlserve.trainer.data import load_splits

    splits = load_splits(flat_folder, val_fraction=0.2, test_fraction=0.2, seed=5)
    assert splits.classes == ("a", "b", "c")
    for part, share in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        counts = Counter(t for _, t in getattr(splits, part))
        assert counts == {0: round(10 * share), 1: round(20 * share), 2: round(30 * share)}, part
    every = splits.train + splits.val + splits.test
    assert len(set(every)) == len(every) == 60
    again = load_splits(flat_folder, val_fraction=0.2, test_fraction=0.2, seed=5)
    assert again.val == splits.val and load_splits(flat_folder, 0.2, 0.2, seed=6).val != splits.val


def test_grey_and_rgba_images_become_rgb_tensors(flat_folder):
    from tlserve.manifest import Preprocessing
    from tlserve.trainer.data import ImageList, load_splits
    from tlserve.trainer.transforms import EvalTransform, TrainTransform

    splits = load_splits(flat_folder, 0.2, 0.0, seed=0)
    pre = Preprocessing(input_size=32, resize_size=36)
    for transform in (EvalTransform(pre), *(TrainTransform(pre, p) for p in ("none", "light", "classic", "strong"))):
        dataset = ImageList(splits.train, transform)
        for index in (0, len(dataset) // 2, len(dataset) - 1):  # grey, RGB, RGBA
            tensor, _ = dataset[index]
            assert tuple(tensor.shape) == (3, 32, 32) and str(tensor.dtype) == "torch.uint8"


def test_eval_transform_is_pillow_resize_then_centre_crop_on_a_real_photo():
    """What a server with Pillow alone must do, written out independently of the trainer code."""
    pytest.importorskip("skimage")
    from pathlib import Path

    import skimage
    from PIL import Image

    from tlserve.manifest import Preprocessing
    from tlserve.trainer.transforms import EvalTransform

    pre = Preprocessing(input_size=56, resize_size=64, interpolation="bicubic")
    with Image.open(Path(skimage.data.__file__).parent / "chelsea.png") as img:  # 451 x 300
        got = EvalTransform(pre)(img).numpy()
        resized = img.convert("RGB").resize((int(64 * 451 / 300), 64), Image.Resampling.BICUBIC)
    left, top = int(round((resized.width - 56) / 2)), int(round((64 - 56) / 2))
    want = np.asarray(resized.crop((left, top, left + 56, top + 56))).transpose(2, 0, 1)
    assert np.array_equal(got, want)


def test_balance_sampler_and_loss_weights(flat_folder):
    import torch

    from tlserve.manifest import Preprocessing
    from tlserve.trainer.data import ImageList, class_weights, load_splits
    from tlserve.trainer.distributed import DistContext
    from tlserve.trainer.loaders import train_loader
    from tlserve.trainer.transforms import EvalTransform

    splits = load_splits(flat_folder, 0.2, 0.0, seed=0)
    weights = class_weights([t for _, t in splits.train], 3)
    assert weights[0] > weights[1] > weights[2] and float(weights.sum()) == pytest.approx(3.0)
    dataset = ImageList(splits.train * 20, EvalTransform(Preprocessing(input_size=8, resize_size=8)))
    seen = Counter()
    for _, targets in train_loader(dataset, 64, 0, seed=1, dist=DistContext(), balance_sampler=True, num_classes=3):
        seen.update(targets.tolist())
    shares = torch.tensor([seen[c] for c in range(3)], dtype=torch.float) / sum(seen.values())
    assert torch.all((shares - 1 / 3).abs() < 0.05), shares  # unbalanced 1:2:3 drawn as ~1:1:1
