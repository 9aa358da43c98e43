"""JPEG draft decoding (DCT-domain downscaling before the exact resize): the same limits as a full
decode, the same geometry, and the same top-1 as a full decode on the demo's validation images
upscaled well past the model's size and on real photos."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from serving_helpers import photo_path

from tlserve.manifest import Preprocessing
from tlserve.server.errors import InvalidArgument
from tlserve.server.preprocess import ImageLimits, decode, set_draft

LIMITS = ImageLimits(max_image_bytes=4_000_000, max_pixels=4_000_000)
PRE = Preprocessing(input_size=64, resize_size=73)
JPEG_PHOTOS = ("rocket.jpg", "grace_hopper.jpg")
PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "camera.png", "motorcycle_left.png") + JPEG_PHOTOS


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def upscaled(name: str, size: tuple[int, int]) -> Image.Image:
    with Image.open(photo_path(name)) as img:
        return img.convert("RGB").resize(size, Image.Resampling.BICUBIC)


def test_draft_keeps_the_pixel_limit_of_the_full_size():
    """The header's full width x height is checked, not the drafted size (which would fit)."""
    data = jpeg(upscaled("chelsea.png", (2400, 1800)))  # 4.32 MP; 1/8 of it would be 300x225
    # ours names the size, Pillow's bomb guard (lowered to the limit by a server in the same process) the sum
    with pytest.raises(InvalidArgument, match="4320000 pixels exceeds the limit of 4000000"):
        decode(data, PRE, LIMITS, draft=True)
    with pytest.raises(InvalidArgument, match="bytes exceeds the limit of 1000"):
        decode(data, PRE, replace(LIMITS, max_image_bytes=1000, max_pixels=10**8), draft=True)


def test_corrupt_jpeg_is_still_refused_with_draft():
    data = jpeg(upscaled("chelsea.png", (1200, 900)))
    with pytest.raises(InvalidArgument, match="^image 3: corrupt image data"):
        decode(data[: len(data) // 3], PRE, LIMITS, index=3, draft=True)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_large_jpeg_drafted_close_to_the_full_decode(mode):
    """Same shape and geometry (a misplaced crop would differ by far more than a few levels)."""
    with Image.open(photo_path("astronaut.png")) as img:
        big = img.convert(mode).resize((1600, 1200), Image.Resampling.BICUBIC)
    data = jpeg(big)
    full, drafted = decode(data, PRE, LIMITS), decode(data, PRE, LIMITS, draft=True)
    assert drafted.shape == full.shape == (3, 64, 64)
    difference = np.abs(full.astype(int) - drafted.astype(int))
    assert difference.mean() < 3 and not np.array_equal(full, drafted)  # the draft really ran


def test_draft_keeps_twice_the_resize_target():
    """A 1600x1200 JPEG for a 97x73 resize: the 1/8 scale (200x150) is the largest at least 2 x 97 x 73."""
    with Image.open(io.BytesIO(jpeg(upscaled("chelsea.png", (1600, 1200))))) as img:
        box = set_draft(img, (97, 73))
        assert box is not None and img.size == (200, 150)
    with Image.open(io.BytesIO(jpeg(upscaled("chelsea.png", (1000, 750))))) as img:
        assert set_draft(img, (97, 73)) is not None and img.size == (250, 188)  # 1/4; 1/8 would be under 146
    with Image.open(io.BytesIO(jpeg(upscaled("chelsea.png", (380, 285))))) as img:
        assert set_draft(img, (97, 73)) is None and img.size == (380, 285)  # under 4 x the target: full decode


def test_jpeg_under_four_times_the_target_and_png_are_decoded_exactly():
    small = jpeg(upscaled("chelsea.png", (380, 285)))  # 285 < 2 x 2 x 73: no draft (1/2 would be 143 px)
    np.testing.assert_array_equal(decode(small, PRE, LIMITS, draft=True), decode(small, PRE, LIMITS))
    buf = io.BytesIO()
    upscaled("chelsea.png", (1600, 1200)).save(buf, format="PNG")
    png = buf.getvalue()
    np.testing.assert_array_equal(decode(png, PRE, LIMITS, draft=True), decode(png, PRE, LIMITS))


@pytest.mark.torch
@pytest.mark.slow
def test_draft_top1_agrees_with_full_decode_on_demo_images_and_photos(model_repository):
    """The demo's validation images (upscaled to 1024x768: 1/4 scale drafts, 256x192 for a 97x73
    resize, the hardest case for this 64 px model, where the draft's box prefilter is largest against
    the resize) keep their full-decode top-1 class at least 98% of the time (measured 99.2%, and
    97.7% when the draft kept only 1x the target: docs/serving.md). The real photos, native and
    upscaled, are out of this model's domain and often near-ties for it (the model is trained anew in
    each run): one may flip, but none whose full-decode top-1 led the class the draft chose by more
    than 0.3."""
    ort = pytest.importorskip("onnxruntime")
    from tlserve.manifest import Manifest
    from tlserve.trainer.demo_data import load_arrays

    session = ort.InferenceSession(str(model_repository / "fashion" / "1" / "model.onnx"))
    manifest = Manifest.from_metadata(session.get_modelmeta().custom_metadata_map)
    pre, limits = manifest.preprocessing, ImageLimits(max_image_bytes=8_000_000, max_pixels=16_000_000)
    files = [jpeg(Image.fromarray(x).convert("RGB").resize((1024, 768))) for x in load_arrays()["val_x"]]
    demo = len(files)
    for name in PHOTOS:
        files += [jpeg(upscaled(name, (2048, 1536)))]
        with Image.open(photo_path(name)) as img:
            files += [jpeg(img.convert("RGB"))]

    def probabilities(draft: bool) -> np.ndarray:
        batch = np.stack([decode(f, pre, limits, draft=draft) for f in files])
        return np.concatenate(
            [
                session.run([manifest.outputs.probabilities], {manifest.input_name: batch[i : i + 128]})[0]
                for i in range(0, len(batch), 128)
            ]
        )

    full, drafted = probabilities(False), probabilities(True)
    agree = full.argmax(1) == drafted.argmax(1)
    assert demo == 500
    rows = np.arange(len(files))
    lead = full[rows, full.argmax(1)] - full[rows, drafted.argmax(1)]  # 0 where they agree
    assert (lead[demo:] <= 0.3).all(), f"photos that changed a clear class: {np.flatnonzero(lead[demo:] > 0.3)}"
    assert agree[:demo].mean() >= 0.98, f"top-1 agreement {agree[:demo].mean():.4f} on the demo images"
    assert np.abs(full - drafted).max() < 0.2  # measured 0.10 (0.26 keeping 1x the target)
