"""Request images to one uint8 NCHW batch: count limit, then decoding on a thread pool."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Union

import numpy as np

from tlserve.manifest import Preprocessing
from tlserve.server.errors import InvalidArgument
from tlserve.server.preprocess import ImageLimits, decode, from_tensor

# An encoded file, or a raw uint8 CHW tensor as (shape, bytes).
ImageInput = Union[bytes, tuple[Sequence[int], bytes]]


class ImageDecoder:
    """Decodes a request's images in parallel, within the server's limits."""

    def __init__(self, limits: ImageLimits, max_images: int, executor: Executor) -> None:
        self.limits = limits
        self.max_images = max_images
        self._executor = executor

    def check_count(self, count: int) -> None:
        if count == 0:
            raise InvalidArgument("the request has no images")
        if count > self.max_images:
            raise InvalidArgument(f"{count} images in one request exceeds the limit of {self.max_images}")

    def _one(self, image: ImageInput, pre: Preprocessing, index: int) -> np.ndarray:
        if isinstance(image, tuple):
            return from_tensor(list(image[0]), image[1], pre, index)
        return decode(image, pre, self.limits, index)

    async def batch(self, images: Sequence[ImageInput], pre: Preprocessing) -> np.ndarray:
        """uint8 [N, 3, S, S] in request order; InvalidArgument names the first bad image."""
        self.check_count(len(images))
        if all(isinstance(image, tuple) for image in images):  # raw tensors: cheap, no thread hop
            return np.stack([self._one(image, pre, i) for i, image in enumerate(images)])
        loop = asyncio.get_running_loop()
        if len(images) == 1:
            return (await loop.run_in_executor(self._executor, self._one, images[0], pre, 0))[None]
        arrays = await asyncio.gather(
            *(loop.run_in_executor(self._executor, self._one, image, pre, i) for i, image in enumerate(images)),
            return_exceptions=True,
        )
        decoded = [result for result in arrays if not isinstance(result, BaseException)]
        if len(decoded) != len(arrays):
            raise next(result for result in arrays if isinstance(result, BaseException))
        return np.stack(decoded)
