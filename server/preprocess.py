"""Images to model input, exactly as the trainer's eval transform does it (Pillow, no torch).

Encoded bytes: size limits checked first (bytes, then width x height from the header, before
any pixel is decoded), decode, convert to RGB, resize the shorter side to ``resize_size`` with
the manifest's interpolation, centre-crop ``input_size``, lay out as uint8 CHW. The arithmetic
mirrors torchvision's ``Resize(int)`` + ``CenterCrop`` on PIL images, so the pixels are equal.

With ``draft``, a JPEG at least four times the resize target in both sides is decoded at 1/2, 1/4 or
1/8 scale in the DCT domain (Pillow's ``Image.draft``, libjpeg-turbo's scaled IDCT), still no
smaller than twice the target (``DRAFT_KEEP``), and then resized exactly as above: about 3-5x faster
on a 12 MP photo; the
pixels are no longer equal to the trainer's (the draft is an 8x8 box filter before the resize), the
top-1 class almost always is (benchmarks/bench_decode.py, docs/benchmarks.md).
The header checks run on the full size before the draft is set.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError
from PIL.JpegImagePlugin import JpegImageFile

from tlserve.geometry import center_crop_box, resized_size
from tlserve.manifest import Preprocessing
from tlserve.server.errors import InvalidArgument, shape_text

if TYPE_CHECKING:
    from tlserve.server.settings import Settings

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


PNG_TEXT_BYTES = 1 << 20  # text chunks a PNG header may carry (Pillow parses them on open; its default is 64 MB)
PNG_HEADER_BYTES = 2 * PNG_TEXT_BYTES  # what opening a PNG may inflate: its text chunks and a 1 MB ICC profile
DRAFT_KEEP = 2  # a draft keeps at least twice the resize target per side (docs/serving.md: the parity measured)
FORMATS = ("PNG", "JPEG")  # what the API promises; Pillow would otherwise try every format it knows


@dataclass(frozen=True, kw_only=True)
class ImageLimits:
    """Refuse before decoding: encoded size and pixel count per image, pixels per request (None: no
    limit); the defaults are Settings'."""

    max_image_bytes: int
    max_pixels: int
    max_request_pixels: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageLimits:
        return cls(
            max_image_bytes=settings.max_image_bytes,
            max_pixels=settings.max_pixels,
            max_request_pixels=settings.max_request_pixels,
        )


@dataclass(frozen=True)
class Header:
    """An image's size and what decoding it costs, read from its header."""

    width: int
    height: int
    bytes_per_pixel: int  # peak memory while decoding, per pixel (see decode_bytes_per_pixel)
    resized_pixels: int
    header_bytes: int  # what opening the file inflates besides the pixels (PNG text, ICC profile)

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def decode_bytes(self) -> int:
        """The most memory decoding this image holds at once."""
        return self.pixels * self.bytes_per_pixel + self.resized_pixels * 4 + self.header_bytes


STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2}  # Pillow keeps other modes in 4 bytes


def decode_bytes_per_pixel(img: Image.Image) -> int:
    """Peak bytes per pixel while :func:`decode` holds ``img`` (an opened, not yet loaded image).

    The decoded image in its own mode (Pillow stores RGB and RGBA in 4 bytes a pixel, L and P in
    1), its RGB copy unless it is RGB already, a progressive JPEG's DCT coefficients (2 bytes per
    sample of each component), and a byte of slack. Measured on 16 MP images it bounds every case:
    RGB JPEG 4.3 (estimate 5), RGBA PNG 8.3 (9), grey PNG 5.3 (6), progressive 4:2:0 JPEG 7.1 (8),
    progressive 4:4:4 JPEG 10.1 (11), progressive CMYK JPEG 12.1 (17).
    """
    per_pixel = STORED_BYTES.get(img.mode, 4) + (0 if img.mode == "RGB" else 4) + 1
    layers = getattr(img, "layer", None)  # JPEG: (id, h, v, table) per component
    if img.format == "JPEG" and img.info.get("progressive") and layers:
        h_max, v_max = max(h for _, h, _, _ in layers), max(v for _, _, v, _ in layers)
        per_pixel += math.ceil(2 * sum(h * v for _, h, v, _ in layers) / (h_max * v_max))
    return per_pixel


def transform(
    img: Image.Image,
    pre: Preprocessing,
    size: tuple[int, int] | None = None,
    box: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """A decoded PIL image to uint8 CHW at ``pre.input_size``; each full-size intermediate is closed
    as soon as the next one exists, so a large image is held at most twice (``img`` is the caller's).
    ``size`` and ``box`` (the resize target and the source region) come from a draft; by default
    the whole image resized as its own size asks."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")  # RGB.convert("RGB") would only copy
    target = size or resized_size(rgb.width, rgb.height, pre.resize_size)
    resized = rgb.resize(target, RESAMPLE[pre.interpolation], box=box)
    if rgb is not img:
        rgb.close()
    cropped = resized.crop(center_crop_box(resized.width, resized.height, pre.input_size))
    resized.close()
    return np.asarray(cropped, dtype=np.uint8).transpose(2, 0, 1)


def open_checked(data: bytes, limits: ImageLimits, index: int) -> Image.Image:
    """Open ``data`` lazily and check its limits; raises InvalidArgument naming image ``index``."""
    if not data:
        raise InvalidArgument(f"image {index}: empty")
    if len(data) > limits.max_image_bytes:
        raise InvalidArgument(f"image {index}: {len(data)} bytes exceeds the limit of {limits.max_image_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # Pillow's guard, on the header
        announced = re.search(r"\((\d+) pixels\)", str(exc))  # our message, with the one number of Pillow's
        size = f"{announced.group(1)} pixels" if announced else "too many pixels"
        raise InvalidArgument(
            f"image {index}: refused before decoding, {size} exceeds the limit of {limits.max_pixels}"
        ) from None
    except UnidentifiedImageError:
        raise InvalidArgument(
            f"image {index}: not a decodable PNG/JPEG image ({len(data)} bytes starting "
            f"{data[:8]!r}); send the file's bytes unchanged"
        ) from None
    except Exception as exc:  # Pillow raises many types on malformed headers
        raise InvalidArgument(f"image {index}: unreadable header ({type(exc).__name__})") from None
    width, height = img.size
    if width * height > limits.max_pixels:
        img.close()
        raise InvalidArgument(
            f"image {index}: {width}x{height} = {width * height} pixels exceeds the limit of {limits.max_pixels}"
        )
    if width < 1 or height < 1:
        img.close()
        raise InvalidArgument(f"image {index}: empty dimensions {width}x{height}")
    return img


def _resized(img: Image.Image, pre: Preprocessing, limits: ImageLimits, index: int) -> tuple[int, int]:
    width, height = resized_size(img.width, img.height, pre.resize_size)
    if width * height > limits.max_pixels:  # an extreme aspect ratio would blow up in the resize
        raise InvalidArgument(
            f"image {index}: {img.width}x{img.height} would resize to {width}x{height}, over the "
            f"limit of {limits.max_pixels} pixels; crop it nearer to a square first"
        )
    return width, height


def set_draft(
    img: Image.Image, target: tuple[int, int], keep: int = DRAFT_KEEP
) -> tuple[float, float, float, float] | None:
    """Ask a JPEG's decoder for the smallest 1/2, 1/4 or 1/8 scale still at least ``keep`` x ``target``
    in both sides (Pillow picks it; none when the image is under twice that); returns the region of
    the scaled image that the full image covers, None when nothing changed. Call it after every
    header check and before ``load``: it shrinks ``img.size``."""
    want = (keep * target[0], keep * target[1])
    if not isinstance(img, JpegImageFile) or img.width < 2 * want[0] or img.height < 2 * want[1]:
        return None
    drafted = img.draft(None, want)
    return drafted[1] if drafted else None


def read_header(data: bytes, pre: Preprocessing, limits: ImageLimits, index: int = 0) -> Header:
    """What decoding ``data`` would cost, from its header alone (no pixel is decoded)."""
    with contextlib.closing(open_checked(data, limits, index)) as img:
        width, height = _resized(img, pre, limits, index)
        extra = PNG_HEADER_BYTES if img.format == "PNG" else 0
        return Header(img.width, img.height, decode_bytes_per_pixel(img), width * height, extra)


def decode(
    data: bytes,
    pre: Preprocessing,
    limits: ImageLimits,
    index: int = 0,
    *,
    draft: bool = False,
    draft_keep: int = DRAFT_KEEP,
) -> np.ndarray:
    """Encoded PNG/JPEG bytes to uint8 CHW; every failure is InvalidArgument naming the image.
    ``draft``: a large JPEG is decoded at a reduced scale first, no smaller than ``draft_keep`` x the
    resize target (see the module docstring)."""
    with contextlib.closing(open_checked(data, limits, index)) as img:  # close() frees the pixels at once
        target = _resized(img, pre, limits, index)
        try:
            box = set_draft(img, target, draft_keep) if draft else None
            img.load()
            return transform(img, pre, target, box) if box else transform(img, pre)
        except Exception as exc:  # truncated or corrupt pixel data surfaces only on load
            raise InvalidArgument(f"image {index}: corrupt image data ({type(exc).__name__})") from None


def check_tensor(shape: Sequence[int], data: bytes, pre: Preprocessing, index: int = 0) -> None:
    """A raw uint8 CHW tensor's shape and length against the model's input size."""
    want = [3, pre.input_size, pre.input_size]
    if len(shape) != 3 or list(shape) != want:
        raise InvalidArgument(f"image {index}: tensor shape {shape_text(shape)} must be {want} (uint8 CHW)")
    if len(data) != 3 * pre.input_size * pre.input_size:
        raise InvalidArgument(
            f"image {index}: tensor has {len(data)} bytes, shape {want} needs {3 * pre.input_size * pre.input_size}"
        )


def from_tensor(shape: Sequence[int], data: bytes, pre: Preprocessing, index: int = 0) -> np.ndarray:
    """A raw uint8 CHW tensor, checked against the model's input size (a read-only view of ``data``)."""
    check_tensor(shape, data, pre, index)
    return np.frombuffer(data, dtype=np.uint8).reshape(3, pre.input_size, pre.input_size)


def to_model_input(batch: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """uint8 NCHW to what the graph takes: unchanged for uint8 graphs, else cast (and normalised
    here when the graph does not normalise itself)."""
    if pre.input_dtype == "uint8":
        return batch
    x = batch.astype(np.float32)
    if not pre.normalize_in_graph:
        mean = np.asarray(pre.mean, dtype=np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(pre.std, dtype=np.float32).reshape(1, 3, 1, 1)
        x = (x / 255.0 - mean) / std
    return x.astype(pre.input_dtype)
