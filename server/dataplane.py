"""The data plane: what every API does, in numpy and dataclasses, with no transport in it.

Servicers convert their protobuf to these calls and the answers back (MLServer's
``handlers/dataplane.py`` is the pattern). Here, and only here: find the model, hold exactly one
lease on it per request (so unloading waits for the request, decoding included), decode and
preprocess images, check the model's input, infer, record the predictions it serves (the
version's prediction metrics, predictions.py), and select top-k, embeddings or the outputs asked for.
Every refusal is a :mod:`tlserve.server.errors` exception. With tracing on, decoding,
the queue wait and inference are child spans of the request's (:class:`~tlserve.server.tracing.Spans`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, Union

import numpy as np

from tlserve.server.batcher import BatchTiming, Outputs
from tlserve.server.errors import FailedPrecondition, InvalidArgument, quote, shape_text
from tlserve.server.images import ImageDecoder, ImageInput
from tlserve.server.model import ServedModel
from tlserve.server.oip.datatypes import DTYPES, datatype_of
from tlserve.server.repository import ModelRepository, ReloadReport
from tlserve.server.tracing import BATCH_SIZE, Spans


@dataclass(frozen=True)
class TopK:
    """The ``k`` best classes of each image, best first: ``indices`` and ``scores`` are [N, k]."""

    indices: np.ndarray
    scores: np.ndarray
    labels: Sequence[str]


@dataclass(frozen=True)
class RequestedOutput:
    """One output a caller asks for by name; ``classes`` > 0 asks for its top classes instead."""

    name: str
    classes: int = 0


Answer = Union[np.ndarray, TopK]
T = TypeVar("T")


def _datatype(array: np.ndarray) -> str:
    try:
        return datatype_of(array.dtype)
    except ValueError:
        return str(array.dtype)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the ``k`` best classes per row, best first (ties: lower index first);
    ``k`` is clamped to [1, number of classes]."""
    k = max(1, min(k, scores.shape[1]))
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


class DataPlane:
    """Lookup, leases, preprocessing, checks and inference for every API."""

    def __init__(self, repository: ModelRepository, decoder: ImageDecoder, spans: Spans | None = None) -> None:
        self._repository = repository
        self._decoder = decoder
        self.spans = spans or Spans()

    # --- models --------------------------------------------------------------------------
    @property
    def max_images(self) -> int:
        """The most images (rows) one request may carry."""
        return self._decoder.max_images

    def model(self, name: str = "", version: str = "") -> ServedModel:
        """The version asked for, or the newest ready one ("" means unset; one model needs no name)."""
        return self._repository.get(name or None, version or None)

    def models(self, name: str = "", version: str = "") -> list[ServedModel]:
        """Every loaded version, by name then newest first; a non-empty name or version filters."""
        return [m for m in self._repository.list() if name in ("", m.name) and version in ("", m.version)]

    def ready_versions(self, name: str) -> list[str]:
        return [m.version for m in self.models(name) if m.ready]

    def ready(self) -> bool:
        """Whether any model version is ready."""
        return any(m.ready for m in self._repository.list())

    async def reload(self) -> ReloadReport:
        return await self._repository.reload()

    # --- images in ------------------------------------------------------------------------
    async def classify(
        self, model: ServedModel, images: Sequence[ImageInput], k: int, deadline: float | None = None
    ) -> TopK:
        """The ``k`` (at least 1) most likely labels of each image."""
        with model.lease():
            outputs = await self._infer_images(model, images, deadline)
            probabilities = outputs[model.manifest.outputs.probabilities]
            model.predictions.record(probabilities)
        return self._top_k(model, probabilities, k or 1)

    async def embed(
        self, model: ServedModel, images: Sequence[ImageInput], deadline: float | None = None
    ) -> np.ndarray:
        """[N, D] embeddings; FailedPrecondition when the model has no embedding output."""
        name = model.manifest.outputs.embedding
        if not name:
            raise FailedPrecondition(f"model {quote(model.name)} has no embedding output")
        with model.lease():
            return (await self._infer_images(model, images, deadline))[name]

    def check_image_count(self, count: int) -> None:
        """Refuse a request with no images or too many, before anything else is read from it."""
        self._decoder.check_count(count)

    async def _infer_images(self, model: ServedModel, images: Sequence[ImageInput], deadline: float | None) -> Outputs:
        with self.spans.span("decode"):
            batch = await self._decoder.batch(images, model.manifest.preprocessing, deadline)
        return await self._run(model, self._checked_input(model, {model.input_name: batch}), deadline)

    async def _run(self, model: ServedModel, batch: np.ndarray, deadline: float | None) -> Outputs:
        """``model.infer``; traced, with the batch size on the request's span and the batcher's timings as spans."""
        if not self.spans.enabled:
            return await model.infer(batch, deadline)
        self.spans.annotate(BATCH_SIZE, int(batch.shape[0]))
        timings: list[BatchTiming] = []
        try:
            return await model.infer(batch, deadline, timings)
        finally:
            self.spans.batched(timings)

    # --- tensors in -----------------------------------------------------------------------
    async def infer(
        self,
        model: ServedModel,
        inputs: Mapping[str, np.ndarray],
        requested: Sequence[RequestedOutput] = (),
        deadline: float | None = None,
    ) -> dict[str, Answer]:
        """The graph on the caller's own input tensors: each requested output (every output when
        none is), as a tensor or, when it asks for classes, its top classes."""
        predicted = (model.manifest.outputs.probabilities, model.manifest.outputs.logits)
        with model.lease():
            batch = self._checked_input(model, inputs)
            wanted = self._checked_outputs(model, requested)
            outputs = await self._run(model, batch, deadline)
            if any(o.name in predicted for o in wanted):
                model.predictions.record(outputs[model.manifest.outputs.probabilities])
        return {
            o.name: self._top_k(model, outputs[o.name], o.classes) if o.classes else outputs[o.name] for o in wanted
        }

    async def convert(self, function: Callable[..., T], *args: Any, inline: bool = False) -> T:
        """``function(*args)`` on the decode pool, in a ``decode`` span: for conversions proportional to a
        request's size (tensor contents to arrays), which must not run on the event loop; ``inline`` runs a
        small one here instead (cheaper than the hop to the pool)."""
        with self.spans.span("decode"):
            if inline:
                return function(*args)
            return await asyncio.get_running_loop().run_in_executor(self._decoder.executor, function, *args)

    # --- the checks, each once -------------------------------------------------------------
    def check_inputs(self, model: ServedModel, inputs: Mapping[str, tuple[str, Sequence[int]]]) -> None:
        """The model's one input checked from its name, datatype and shape alone, before any contents
        are converted: the name, the datatype, [N, 3, S, S], and N against the per-request limit."""
        name, size = model.input_name, model.manifest.preprocessing.input_size
        if list(inputs) != [name]:
            names = ", ".join(quote(n) for n in sorted(inputs)[:4]) + (" ..." if len(inputs) > 4 else "")
            raise InvalidArgument(f"model {quote(model.name)} takes one input {name!r}, got [{names}]")
        got, shape = inputs[name]
        want = datatype_of(model.input_dtype)
        if got != want:
            shown = got if got in DTYPES else quote(got, 20)
            raise InvalidArgument(f"input {name!r} of model {quote(model.name)} must be {want}, got {shown}")
        if len(shape) != 4 or tuple(shape[1:]) != (3, size, size):
            raise InvalidArgument(
                f"input {name!r} of model {quote(model.name)} must have shape [N, 3, {size}, {size}], "
                f"got {shape_text(shape)}"
            )
        self._decoder.check_count(int(shape[0]))

    def _checked_input(self, model: ServedModel, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """The model's one input array, checked as :meth:`check_inputs` does."""
        self.check_inputs(model, {name: (_datatype(array), array.shape) for name, array in inputs.items()})
        return inputs[model.input_name]

    def _checked_outputs(self, model: ServedModel, requested: Sequence[RequestedOutput]) -> Sequence[RequestedOutput]:
        if not requested:
            return [RequestedOutput(name) for name in model.output_names]
        for output in requested:
            if output.name not in model.output_names:
                raise InvalidArgument(
                    f"model {quote(model.name)} has no output {quote(output.name)} "
                    f"(outputs: {', '.join(model.output_names)})"
                )
            if output.classes < 0:
                raise InvalidArgument(
                    f"output {quote(output.name)}: classification count must be positive, got {output.classes}"
                )
        return requested

    def _top_k(self, model: ServedModel, scores: np.ndarray, k: int) -> TopK:
        if scores.ndim != 2 or scores.shape[1] != model.manifest.num_classes:
            raise InvalidArgument("classification is only available on an output with one score per label")
        indices, values = top_k(scores, k)
        return TopK(indices, values, model.manifest.labels)
