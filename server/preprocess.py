"""Images to model input, exactly as the trainer's eval transform does it (Pillow, no torch).

Encoded bytes: size limits checked first (bytes, then width x height from the header, before
any pixel is decoded), decode, convert to RGB, resize the shorter side to ``resize_size`` with
the manifest's interpolation, centre-crop ``input_size``, lay out as uint8 CHW. The arithmetic
mirrors torchvision's ``Resize(int)`` + ``CenterCrop`` on PIL images, so the pixels are equal.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

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


FORMATS = ("PNG", "JPEG")  # what the API promises; Pillow would otherwise try every format it knows


@dataclass(frozen=True, kw_only=True)
class ImageLimits:
    """Refuse before decoding: encoded size and decoded pixel count (the defaults are Settings')."""

    max_image_bytes: int
    max_pixels: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageLimits:
        return cls(max_image_bytes=settings.max_image_bytes, max_pixels=settings.max_pixels)


def transform(img: Image.Image, pre: Preprocessing) -> np.ndarray:
    """A decoded PIL image to uint8 CHW at ``pre.input_size``."""
    img = img.convert("RGB")
    img = img.resize(resized_size(img.width, img.height, pre.resize_size), RESAMPLE[pre.interpolation])
    img = img.crop(center_crop_box(img.width, img.height, pre.input_size))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


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
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidArgument(f"image {index}: refused before decoding, too many pixels ({exc})") from None
    except UnidentifiedImageError:
        raise InvalidArgument(
            f"image {index}: not a decodable PNG/JPEG image ({len(data)} bytes starting "
            f"{data[:8]!r}); send the file's bytes unchanged"
        ) from None
    except Exception as exc:  # Pillow raises many types on malformed headers
        raise InvalidArgument(f"image {index}: unreadable header ({type(exc).__name__}: {exc})") from None
    width, height = img.size
    if width * height > limits.max_pixels:
        raise InvalidArgument(
            f"image {index}: {width}x{height} = {width * height} pixels exceeds the limit of {limits.max_pixels}"
        )
    if width < 1 or height < 1:
        raise InvalidArgument(f"image {index}: empty dimensions {width}x{height}")
    return img


def decode(data: bytes, pre: Preprocessing, limits: ImageLimits, index: int = 0) -> np.ndarray:
    """Encoded PNG/JPEG bytes to uint8 CHW; every failure is InvalidArgument naming the image."""
    img = open_checked(data, limits, index)
    width, height = resized_size(img.width, img.height, pre.resize_size)
    if width * height > limits.max_pixels:  # an extreme aspect ratio would blow up in the resize
        raise InvalidArgument(
            f"image {index}: {img.width}x{img.height} would resize to {width}x{height}, over the "
            f"limit of {limits.max_pixels} pixels; crop it nearer to a square first"
        )
    try:
        img.load()
        return transform(img, pre)
    except InvalidArgument:
        raise
    except Exception as exc:  # truncated or corrupt pixel data surfaces only on load
        raise InvalidArgument(f"image {index}: corrupt image data ({type(exc).__name__}: {exc})") from None


def from_tensor(shape: list[int], data: bytes, pre: Preprocessing, index: int = 0) -> np.ndarray:
    """A raw uint8 CHW tensor, checked against the model's input size."""
    want = [3, pre.input_size, pre.input_size]
    if list(shape) != want:
        raise InvalidArgument(f"image {index}: tensor shape {shape_text(shape)} must be {want} (uint8 CHW)")
    if len(data) != 3 * pre.input_size * pre.input_size:
        raise InvalidArgument(
            f"image {index}: tensor has {len(data)} bytes, shape {want} needs {3 * pre.input_size * pre.input_size}"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(want)


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
