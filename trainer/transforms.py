"""Image transforms. The eval transform is the contract the server reproduces with Pillow alone.

Eval, written down in the manifest's ``Preprocessing``:
1. ``img.convert("RGB")`` (greyscale is replicated, an alpha channel is dropped);
2. resize so the SHORTER side is ``resize_size``: for ``w <= h`` the new size is
   ``(resize_size, int(resize_size * h / w))``, else ``(int(resize_size * w / h), resize_size)``,
   with ``PIL.Image.resize(size, resample)`` (Pillow's resampling is antialiased);
3. centre crop ``input_size``: ``left = int(round((w - input_size) / 2))``, same for ``top``;
4. uint8 HWC -> CHW. Scaling by 1/255 and mean/std normalisation belong to the model's graph.

The sizes of steps 2 and 3 come from ``tlserve.geometry``, the arithmetic the server shares.

Training presets start from the same uint8 output and add augmentation.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from tlserve.geometry import center_crop_box, resized_size
from tlserve.manifest import Preprocessing

PIL_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def resize_shorter(img: Image.Image, size: int, interpolation: str) -> Image.Image:
    new = resized_size(img.width, img.height, size)
    return img if new == img.size else img.resize(new, PIL_RESAMPLE[interpolation])


def center_crop(img: Image.Image, size: int) -> Image.Image:
    return img.crop(center_crop_box(img.width, img.height, size))


def to_uint8_chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


class EvalTransform:
    """PIL image -> uint8 CHW tensor, exactly as the manifest's ``Preprocessing`` says."""

    def __init__(self, pre: Preprocessing):
        self.pre = pre

    def pil(self, img: Image.Image) -> Image.Image:
        img = resize_shorter(img.convert("RGB"), self.pre.resize_size, self.pre.interpolation)
        return center_crop(img, self.pre.input_size)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return to_uint8_chw(self.pil(img))

    def __repr__(self) -> str:
        return f"EvalTransform({self.pre})"


class TrainTransform:
    """PIL image -> uint8 CHW tensor with one of the augmentation presets."""

    def __init__(self, pre: Preprocessing, preset: str):
        self.pre, self.preset = pre, preset
        size = pre.input_size
        flip = v2.RandomHorizontalFlip()
        shear = math.degrees(0.2)
        pipelines = {
            "none": [v2.Identity()],
            "light": [v2.RandomCrop(size), flip],
            "classic": [
                v2.RandomAffine(degrees=0, shear=(-shear, shear, -shear, shear), scale=(0.8, 1.2)),
                v2.CenterCrop(size),
                flip,
            ],
            "strong": [
                v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True),
                flip,
                v2.TrivialAugmentWide(),
                v2.RandomErasing(p=0.25, value=0),
            ],
        }
        self.augment = v2.Compose(pipelines[preset])
        self.crop_after = preset == "none"

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = resize_shorter(img.convert("RGB"), self.pre.resize_size, self.pre.interpolation)
        if self.crop_after:
            img = center_crop(img, self.pre.input_size)
        return self.augment(to_uint8_chw(img))


def normalize(batch: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """uint8 NCHW -> float, /255, (x - mean) / std: what the exported graph does first."""
    mean = torch.tensor(pre.mean, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=batch.device).view(1, 3, 1, 1)
    return (batch.float() / 255.0 - mean) / std
