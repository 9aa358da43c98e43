"""Server preprocessing: pixel-exact against the trainer's eval transform and torchvision's own
Resize + CenterCrop, and every limit refused before decoding."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from serving_helpers import PHOTOS, photo_bytes, photo_path, png_bytes

from tlserve.manifest import Preprocessing
from tlserve.server.errors import InvalidArgument
from tlserve.server.preprocess import ImageLimits, decode, from_tensor, to_model_input
from tlserve.server.settings import Settings

LIMITS = ImageLimits(max_image_bytes=4_000_000, max_pixels=2_000_000)
CASES = [(64, 73, "bilinear"), (56, 64, "bicubic"), (32, 32, "nearest"), (48, 55, "bilinear")]


def pixel_bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header announcing width x height, with almost no data: a decompression bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


@pytest.mark.torch
@pytest.mark.parametrize("name", PHOTOS + ("grace_hopper.jpg",))
@pytest.mark.parametrize("input_size,resize_size,interpolation", CASES)
def test_pixels_equal_trainer_and_torchvision_eval_transform(name, input_size, resize_size, interpolation):
    pytest.importorskip("torch")
    tv = pytest.importorskip("torchvision.transforms.v2")
    from tlserve.trainer.transforms import EvalTransform

    pre = Preprocessing(input_size=input_size, resize_size=resize_size, interpolation=interpolation)
    ours = decode(photo_bytes(name), pre, LIMITS)
    assert ours.shape == (3, input_size, input_size) and ours.dtype == np.uint8
    pil = Image.open(photo_path(name)).convert("RGB")
    trainer = EvalTransform(pre)(Image.open(photo_path(name))).numpy()
    torchvision = tv.Compose(
        [
            tv.PILToTensor(),
        ]
    )(tv.CenterCrop(input_size)(tv.Resize(resize_size, interpolation=tv.InterpolationMode(interpolation))(pil))).numpy()
    np.testing.assert_array_equal(ours, trainer)
    np.testing.assert_array_equal(ours, torchvision)


def test_grey_and_rgba_become_rgb():
    pre = Preprocessing(input_size=32, resize_size=36)
    grey = decode(photo_bytes("camera.png"), pre, LIMITS)
    assert grey.shape == (3, 32, 32)
    np.testing.assert_array_equal(grey[0], grey[1])
    rgba = Image.open(photo_path("logo.png"))
    assert rgba.mode == "RGBA"
    np.testing.assert_array_equal(
        decode(photo_bytes("logo.png"), pre, LIMITS), decode(png_bytes(rgba.convert("RGB")), pre, LIMITS)
    )


def test_corrupt_truncated_and_empty_images_name_the_image():
    pre = Preprocessing(input_size=32, resize_size=36)
    data = photo_bytes("rocket.jpg")
    for bad, why in ((b"GIF89a nonsense", "not a decodable"), (data[:2000], "corrupt"), (b"", "empty")):
        with pytest.raises(InvalidArgument, match=f"^image 7: .*{why}"):
            decode(bad, pre, LIMITS, index=7)


def test_oversized_bytes_refused_before_opening():
    pre = Preprocessing(input_size=32, resize_size=36)
    with pytest.raises(InvalidArgument, match="image 0: .* bytes exceeds the limit of 1000"):
        decode(photo_bytes("chelsea.png"), pre, ImageLimits(max_image_bytes=1000, max_pixels=10**9))


def test_pixel_bomb_refused_from_the_header(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 178_956_970)  # Pillow's default (servers lower it)
    bomb = pixel_bomb_png(100_000, 100_000)
    assert len(bomb) < 200
    with pytest.raises(InvalidArgument, match=r"image 2: .*10000000000 pixels.* exceeds"):
        decode(bomb, Preprocessing(input_size=32, resize_size=36), LIMITS, index=2)
    # below Pillow's own guard, our header check (before decoding) refuses it
    with pytest.raises(InvalidArgument, match=r"image 0: 5000x5000 = 25000000 pixels exceeds the limit of 2000000"):
        decode(pixel_bomb_png(5000, 5000), Preprocessing(input_size=32, resize_size=36), LIMITS)


def test_pixel_limit_is_width_times_height():
    pre = Preprocessing(input_size=32, resize_size=36)
    image = png_bytes(Image.new("RGB", (200, 100)))
    assert decode(image, pre, replace(LIMITS, max_pixels=20_000)).shape == (3, 32, 32)
    with pytest.raises(InvalidArgument, match="20000 pixels exceeds the limit of 19999"):
        decode(image, pre, replace(LIMITS, max_pixels=19_999))


def test_extreme_aspect_ratio_refused_before_the_resize_allocates():
    pre = Preprocessing(input_size=224, resize_size=256)
    strip = png_bytes(Image.new("L", (4, 100_000)))  # a few KB; resized it would be 256 x 6,400,000
    assert len(strip) < 10_000
    with pytest.raises(InvalidArgument, match="would resize to 256x6400000"):
        decode(strip, pre, replace(LIMITS, max_pixels=1_000_000))


def test_only_png_and_jpeg_are_opened():
    buf = io.BytesIO()
    Image.new("RGB", (40, 40)).save(buf, format="GIF")
    with pytest.raises(InvalidArgument, match="not a decodable PNG/JPEG"):
        decode(buf.getvalue(), Preprocessing(input_size=32, resize_size=36), ImageLimits.from_settings(Settings()))


def test_tensor_checked_against_input_size():
    pre = Preprocessing(input_size=4, resize_size=4)
    chw = np.arange(48, dtype=np.uint8).reshape(3, 4, 4)
    np.testing.assert_array_equal(from_tensor([3, 4, 4], chw.tobytes(), pre), chw)
    with pytest.raises(InvalidArgument, match="shape"):
        from_tensor([4, 4, 3], chw.tobytes(), pre)
    with pytest.raises(InvalidArgument, match="47 bytes"):
        from_tensor([3, 4, 4], chw.tobytes()[:-1], pre)


def test_float_graph_input_is_normalised_like_totensor_normalize():
    pre = Preprocessing(input_size=2, resize_size=2, input_dtype="float32", normalize_in_graph=False)
    batch = np.full((1, 3, 2, 2), 255, dtype=np.uint8)
    x = to_model_input(batch, pre)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x[0, :, 0, 0], [(1 - m) / s for m, s in zip(pre.mean, pre.std)], rtol=1e-6)
    inside = Preprocessing(input_size=2, resize_size=2, input_dtype="float32", normalize_in_graph=True)
    np.testing.assert_array_equal(to_model_input(batch, inside), batch.astype(np.float32))
    assert to_model_input(batch, Preprocessing(input_size=2, resize_size=2)) is batch


def test_jpeg_and_png_of_a_real_photo_both_decode():
    pre = Preprocessing(input_size=32, resize_size=36)
    photo = Image.open(photo_path("chelsea.png")).convert("RGB")
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=95)
    a, b = decode(buf.getvalue(), pre, LIMITS), decode(png_bytes(photo), pre, LIMITS)
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 4
