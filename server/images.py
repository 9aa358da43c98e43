"""Request images to one uint8 NCHW batch, admitted before any pixel is decoded.

The order is the cost order: the image count; then every header, read off the event loop (bytes,
pixels per image, pixels per request); then the caller's deadline; then a reservation on the
server-wide decode budget (a full budget answers RESOURCE_EXHAUSTED at once, it never queues);
only then decoding on the thread pool, each image written into its row of one preallocated batch.

A request of one small image (at most ``INLINE_BYTES`` encoded and ``INLINE_PIXELS`` decoded, or one
raw tensor) takes the same steps in the same order in one call on the decoding pool: one hop off the
loop instead of three, no task or gather. The header thread stays free for every other request, so
admission never waits behind a decode, and small images decode on as many threads as large ones.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Union

import numpy as np

from tlserve.manifest import Preprocessing
from tlserve.server.admission import Budget, Reservation
from tlserve.server.errors import DeadlineExceeded, InvalidArgument
from tlserve.server.preprocess import (
    Header,
    ImageLimits,
    check_tensor,
    decode,
    from_tensor,
    read_header,
    to_model_input,
)

# An encoded file, or a raw uint8 CHW tensor as (shape, bytes).
ImageInput = Union[bytes, tuple[Sequence[int], bytes]]

INLINE_PIXELS = 1 << 18  # 512 x 512: the largest lone image admitted and decoded in one call
INLINE_BYTES = 256 << 10  # a lone file this small has its header read on the decoding pool, in that call


def expired(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


class ImageDecoder:
    """Decodes a request's images in parallel, within the server's limits and its decode budget.

    ``threads`` is the decode pool's size: a request can hold at most that many images mid-decode
    at once, so it reserves the decode memory of its ``threads`` largest images plus its batch.
    ``headers`` is the executor that reads image headers (by default ``executor``; the server gives
    it a thread of its own, so admission never waits behind admitted work). ``draft``: decode large
    JPEGs at a reduced scale first (:func:`tlserve.server.preprocess.decode`).
    """

    def __init__(
        self,
        limits: ImageLimits,
        max_images: int,
        executor: Executor,
        *,
        threads: int = 1,
        budget: Budget | None = None,
        headers: Executor | None = None,
        draft: bool = False,
    ) -> None:
        self.limits = limits
        self.max_images = max_images
        self.threads = threads
        self.budget = budget or Budget("decoding", 1 << 62)
        self.executor = executor
        self._headers = headers or executor
        self.draft = draft

    def check_count(self, count: int) -> None:
        if count == 0:
            raise InvalidArgument("the request has no images")
        if count > self.max_images:
            raise InvalidArgument(f"{count} images in one request exceeds the limit of {self.max_images}")

    async def batch(
        self, images: Sequence[ImageInput], pre: Preprocessing, deadline: float | None = None
    ) -> np.ndarray:
        """The model's input for ``images`` (uint8 [N, 3, S, S], or the graph's float dtype), in request
        order; InvalidArgument names the first bad image."""
        self.check_count(len(images))
        loop = asyncio.get_running_loop()
        if len(images) == 1 and (isinstance(images[0], tuple) or len(images[0]) <= INLINE_BYTES):
            headers, done = await loop.run_in_executor(self.executor, self._one_small, images[0], pre, deadline)
            if done is not None:
                return done
        else:
            headers = await loop.run_in_executor(self._headers, self._read_headers, images, pre)
        reservation = self._admit(headers, pre, deadline)
        abandoned = threading.Event()
        work = loop.create_task(self._decode_all(images, pre, deadline, abandoned))
        # the memory is given back when the work has really stopped, not when a cancelled caller leaves
        work.add_done_callback(lambda task: (reservation.release(), task.cancelled() or task.exception()))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            abandoned.set()  # images not started yet are skipped
            raise

    async def _decode_all(
        self, images: Sequence[ImageInput], pre: Preprocessing, deadline: float | None, abandoned: threading.Event
    ) -> np.ndarray:
        loop = asyncio.get_running_loop()
        batch = np.empty((len(images), 3, pre.input_size, pre.input_size), dtype=np.uint8)
        results = await asyncio.gather(
            *(
                loop.run_in_executor(self.executor, self._one, image, pre, i, batch, deadline, abandoned)
                for i, image in enumerate(images)
            ),
            return_exceptions=True,
        )
        failed = [result for result in results if isinstance(result, BaseException)]
        if failed:
            raise failed[0]
        if pre.input_dtype == "uint8":
            return batch
        return await loop.run_in_executor(self.executor, to_model_input, batch, pre)

    def _one_small(
        self, image: ImageInput, pre: Preprocessing, deadline: float | None
    ) -> tuple[list[Header | None], np.ndarray | None]:
        """On the decoding pool, a request of one small file: its header checked; when the image is small,
        the deadline, the reservation (released here, when the decode has stopped) and the decode too,
        returned as the model's input. A larger image returns its header alone, for :meth:`batch`."""
        headers = self._read_headers([image], pre)
        header = headers[0]
        if header is not None and header.pixels > INLINE_PIXELS:
            return headers, None
        reservation = self._admit(headers, pre, deadline)
        try:
            batch = np.empty((1, 3, pre.input_size, pre.input_size), dtype=np.uint8)
            self._decode_into(image, pre, 0, batch)
            return headers, to_model_input(batch, pre)
        finally:
            reservation.release()

    def _admit(self, headers: list[Header | None], pre: Preprocessing, deadline: float | None) -> Reservation:
        """After the headers, in this order: the caller's deadline, then the decode reservation."""
        if expired(deadline):
            raise DeadlineExceeded("deadline passed before decoding")
        return self.budget.take(self.reservation(headers, len(headers), pre))

    def _read_headers(self, images: Sequence[ImageInput], pre: Preprocessing) -> list[Header | None]:
        """Every encoded image's header checked (None for a raw tensor), then the request's pixel sum."""
        headers: list[Header | None] = []
        for i, image in enumerate(images):
            if isinstance(image, tuple):
                check_tensor(image[0], image[1], pre, i)
                headers.append(None)
            else:
                headers.append(read_header(image, pre, self.limits, i))
        pixels = sum(h.pixels for h in headers if h is not None)
        limit = self.limits.max_request_pixels
        if limit is not None and pixels > limit:
            raise InvalidArgument(
                f"the request's {len(images)} images have {pixels} pixels together, over the per-request limit "
                f"of {limit}; send fewer or smaller images per request"
            )
        return headers

    def reservation(self, headers: Sequence[Header | None], count: int, pre: Preprocessing) -> int:
        """Bytes this request can hold at once while decoding: its batch (and the batch cast to the
        graph's dtype) plus the peak decode memory of its ``threads`` largest images."""
        row = 3 * pre.input_size * pre.input_size
        batch = count * row * (1 + (0 if pre.input_dtype == "uint8" else np.dtype(pre.input_dtype).itemsize))
        largest = sorted((h.decode_bytes for h in headers if h is not None), reverse=True)[: self.threads]
        return batch + sum(largest)

    def _one(
        self,
        image: ImageInput,
        pre: Preprocessing,
        index: int,
        batch: np.ndarray,
        deadline: float | None,
        abandoned: threading.Event,
    ) -> None:
        """In the pool: decode one image into its row (skipped once the caller left or its deadline passed)."""
        if abandoned.is_set():
            return
        if expired(deadline):
            raise DeadlineExceeded("deadline passed while the request waited for a decoding thread")
        self._decode_into(image, pre, index, batch)

    def _decode_into(self, image: ImageInput, pre: Preprocessing, index: int, batch: np.ndarray) -> None:
        if isinstance(image, tuple):
            batch[index] = from_tensor(image[0], image[1], pre, index)
        else:
            batch[index] = decode(image, pre, self.limits, index, draft=self.draft)
