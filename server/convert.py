"""Protobuf <-> domain for the task API: request images in, top-k and model info out."""

from __future__ import annotations

import numpy as np

from tlserve.server.errors import InvalidArgument
from tlserve.server.images import ImageInput
from tlserve.server.model import ServedModel
from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb


def request_images(images) -> list[ImageInput]:
    """``repeated Image`` to encoded bytes or (shape, bytes) tensors, in order."""
    out: list[ImageInput] = []
    for index, image in enumerate(images):
        source = image.WhichOneof("source")
        if source == "encoded":
            out.append(image.encoded)
        elif source == "tensor":
            out.append((list(image.tensor.shape), image.tensor.data))
        else:
            raise InvalidArgument(f"image {index}: set either encoded bytes or a tensor")
    return out


def top_k(probabilities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the ``k`` best classes per row, best first (ties: lower index first)."""
    k = max(1, min(k, probabilities.shape[1]))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(probabilities, order, axis=1)


def classifications(model: ServedModel, probabilities: np.ndarray, k: int) -> list[pb.Classification]:
    labels = model.manifest.labels
    indices, scores = top_k(probabilities, k or 1)
    return [
        pb.Classification(
            predictions=[
                pb.Prediction(index=int(i), label=labels[int(i)], score=float(s)) for i, s in zip(row_i, row_s)
            ]
        )
        for row_i, row_s in zip(indices, scores)
    ]


def model_info(model: ServedModel) -> pb.ModelInfo:
    m = model.manifest
    pre = m.preprocessing
    return pb.ModelInfo(
        name=model.name,
        version=model.version,
        architecture=m.architecture,
        labels=list(m.labels),
        input_size=pre.input_size,
        resize_size=pre.resize_size,
        interpolation=pre.interpolation,
        mean=list(pre.mean),
        std=list(pre.std),
        input_dtype=pre.input_dtype,
        precision=m.precision,
        provider=model.provider,
        requested_device=model.requested_device,
        ready=model.ready,
        embedding_size=model.embedding_size,
        manifest_json=m.to_json(),
    )
