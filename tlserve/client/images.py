"""What a caller may pass as an image, turned into the task API's ``Image`` message.

- a path (``str`` or ``os.PathLike``): the file's bytes, sent encoded (PNG or JPEG);
- ``bytes``, ``bytearray`` or ``memoryview``: encoded file bytes as they are;
- a PIL image: encoded as PNG (lossless), so the server applies the model's own resize and crop;
- a numpy array: ``uint8`` ``[3, H, W]`` (CHW, RGB) is sent as a raw tensor, which must already be at the
  model's input size (the server checks it); ``uint8`` ``[H, W, 3]`` or ``[H, W]`` is a picture of any
  size, encoded as PNG (needs Pillow) so the server preprocesses it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Union

import numpy as np

from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb

ImageLike = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, Any]  # Any: a PIL.Image.Image


def to_image(image: ImageLike) -> pb.Image:
    """The ``Image`` message for one input (see the module docstring); TypeError or ValueError otherwise."""
    if isinstance(image, pb.Image):
        return image
    if isinstance(image, (bytes, bytearray, memoryview)):
        return pb.Image(encoded=bytes(image))
    if isinstance(image, (str, os.PathLike)):
        return pb.Image(encoded=Path(image).read_bytes())
    if isinstance(image, np.ndarray):
        return _array_image(image)
    if _is_pil(image):
        return pb.Image(encoded=_png(image))
    raise TypeError(f"cannot send a {type(image).__name__} as an image: give a path, bytes, a PIL image or an array")


def to_images(images: Any) -> list[pb.Image]:
    """One input or a list of them (a 4-D array is a batch of ``[3, H, W]`` tensors)."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return [_array_image(row) for row in images]
    if isinstance(images, (list, tuple)):
        return [to_image(image) for image in images]
    return [to_image(images)]


def _is_pil(image: Any) -> bool:
    return any(cls.__module__.startswith("PIL.") and cls.__name__ == "Image" for cls in type(image).__mro__)


def _array_image(array: np.ndarray) -> pb.Image:
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 (0-255), got {array.dtype}")
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[2] != 3:
        data = np.ascontiguousarray(array).tobytes()
        return pb.Image(tensor=pb.Tensor(shape=list(array.shape), data=data))
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4)):
        try:
            from PIL import Image
        except ImportError as exc:
            raise ValueError(
                "an [H, W, C] array is encoded as PNG, which needs Pillow (pip install pillow); "
                "or send a uint8 [3, S, S] tensor at the model's input size"
            ) from exc
        return pb.Image(encoded=_png(Image.fromarray(np.ascontiguousarray(array))))
    raise ValueError(f"image arrays are uint8 [3, H, W] tensors or [H, W(, 3)] pictures, got shape {array.shape}")


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
