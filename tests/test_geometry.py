"""The eval transform's arithmetic, shared by trainer and server: torchvision's rounding."""

from __future__ import annotations

import pytest

from tlserve.geometry import center_crop_box, resized_size


@pytest.mark.parametrize("width,height,size", [(640, 480, 73), (480, 640, 73), (100, 100, 64), (333, 97, 32)])
def test_resized_size_keeps_aspect_with_torchvision_rounding(width, height, size):
    w, h = resized_size(width, height, size)
    assert min(w, h) == size
    assert (w, h) == ((size, int(size * height / width)) if width <= height else (int(size * width / height), size))


def test_center_crop_box_is_centred():
    assert center_crop_box(73, 73, 64) == (4, 4, 68, 68)  # round(4.5) == 4, as torchvision computes it
    assert center_crop_box(97, 73, 64) == (16, 4, 80, 68)


@pytest.mark.torch
@pytest.mark.parametrize("width,height", [(640, 480), (97, 73), (73, 97), (333, 97), (64, 64), (57, 50)])
def test_sizes_and_crop_equal_torchvision_resize_and_center_crop(width, height):
    tv = pytest.importorskip("torchvision.transforms.v2.functional")
    import numpy as np
    from PIL import Image

    assert tv.resize(Image.new("RGB", (width, height)), [56]).size == resized_size(width, height, 56)
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)  # every position distinct: an off-by-one crop shows
    ours = np.asarray(img.crop(center_crop_box(width, height, 48)))
    np.testing.assert_array_equal(ours, np.asarray(tv.center_crop(img, [48])))
