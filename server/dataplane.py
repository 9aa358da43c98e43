"""The data plane: what every API does, in numpy and dataclasses, with no transport in it.

Servicers convert their protobuf to these calls and the answers back (MLServer's
``handlers/dataplane.py`` is the pattern). Here, and only here: find the model, hold exactly one
lease on it per request (so unloading waits for the request, decoding included), decode and
preprocess images, check the model's input, infer, and select top-k, embeddings or the outputs
asked for. Every refusal is a :mod:`tlserve.server.errors` exception.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np

from tlserve.server.batcher import Outputs
from tlserve.server.errors import FailedPrecondition, InvalidArgument
from tlserve.server.images import ImageDecoder, ImageInput
from tlserve.server.model import ServedModel
from tlserve.server.oip.datatypes import datatype_of
from tlserve.server.preprocess import to_model_input
from tlserve.server.repository import ModelRepository, ReloadReport


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


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the ``k`` best classes per row, best first (ties: lower index first);
    ``k`` is clamped to [1, number of classes]."""
    k = max(1, min(k, scores.shape[1]))
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


class DataPlane:
    """Lookup, leases, preprocessing, checks and inference for every API."""

    def __init__(self, repository: ModelRepository, decoder: ImageDecoder) -> None:
        self._repository = repository
        self._decoder = decoder

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
        return self._top_k(model, outputs[model.manifest.outputs.probabilities], k or 1)

    async def embed(
        self, model: ServedModel, images: Sequence[ImageInput], deadline: float | None = None
    ) -> np.ndarray:
        """[N, D] embeddings; FailedPrecondition when the model has no embedding output."""
        name = model.manifest.outputs.embedding
        if not name:
            raise FailedPrecondition(f"model {model.name!r} has no embedding output")
        with model.lease():
            return (await self._infer_images(model, images, deadline))[name]

    async def _infer_images(self, model: ServedModel, images: Sequence[ImageInput], deadline: float | None) -> Outputs:
        pre = model.manifest.preprocessing
        batch = to_model_input(await self._decoder.batch(images, pre), pre)
        return await model.infer(self._checked_input(model, {model.input_name: batch}), deadline)

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
        with model.lease():
            batch = self._checked_input(model, inputs)
            wanted = self._checked_outputs(model, requested)
            outputs = await model.infer(batch, deadline)
        return {
            o.name: self._top_k(model, outputs[o.name], o.classes) if o.classes else outputs[o.name] for o in wanted
        }

    # --- the checks, each once -------------------------------------------------------------
    def _checked_input(self, model: ServedModel, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """The model's one input, checked against its name, datatype, shape and the per-request limit."""
        name, size = model.input_name, model.manifest.preprocessing.input_size
        if list(inputs) != [name]:
            raise InvalidArgument(f"model {model.name!r} takes one input {name!r}, got {sorted(inputs)}")
        batch = inputs[name]
        want, got = datatype_of(model.input_dtype), datatype_of(batch.dtype)
        if got != want:
            raise InvalidArgument(f"input {name!r} of model {model.name!r} must be {want}, got {got}")
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, size, size):
            raise InvalidArgument(
                f"input {name!r} of model {model.name!r} must have shape [N, 3, {size}, {size}], "
                f"got {list(batch.shape)}"
            )
        self._decoder.check_count(batch.shape[0])
        return batch

    def _checked_outputs(self, model: ServedModel, requested: Sequence[RequestedOutput]) -> Sequence[RequestedOutput]:
        if not requested:
            return [RequestedOutput(name) for name in model.output_names]
        for output in requested:
            if output.name not in model.output_names:
                raise InvalidArgument(
                    f"model {model.name!r} has no output {output.name!r} (outputs: {', '.join(model.output_names)})"
                )
            if output.classes < 0:
                raise InvalidArgument(
                    f"output {output.name!r}: classification count must be positive, got {output.classes}"
                )
        return requested

    def _top_k(self, model: ServedModel, scores: np.ndarray, k: int) -> TopK:
        if scores.ndim != 2 or scores.shape[1] != model.manifest.num_classes:
            raise InvalidArgument("classification is only available on an output with one score per label")
        indices, values = top_k(scores, k)
        return TopK(indices, values, model.manifest.labels)
