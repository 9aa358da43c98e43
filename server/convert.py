"""Protobuf <-> domain for the task API: request images in; top-k, embeddings, model info and reload reports out."""

from __future__ import annotations

import grpc
import numpy as np

from tlserve.server.dataplane import TopK
from tlserve.server.errors import InvalidArgument
from tlserve.server.images import ImageInput
from tlserve.server.loader import public_reason
from tlserve.server.model import ServedModel
from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb
from tlserve.server.repository import ReloadReport


def request_images(images) -> list[ImageInput]:
    """``repeated Image`` to encoded bytes or (shape, bytes) tensors, in order."""
    out: list[ImageInput] = []
    for index, image in enumerate(images):
        source = image.WhichOneof("source")
        if source == "encoded":
            out.append(image.encoded)
        elif source == "tensor":
            out.append((image.tensor.shape, image.tensor.data))  # the shape is checked by length first
        else:
            raise InvalidArgument(f"image {index}: set either encoded bytes or a tensor")
    return out


def classifications(top: TopK) -> list[pb.Classification]:
    return [
        pb.Classification(
            predictions=[pb.Prediction(index=i, label=top.labels[i], score=s) for i, s in zip(row_i, row_s)]
        )
        for row_i, row_s in zip(top.indices.tolist(), top.scores.tolist())
    ]


def embeddings(vectors: np.ndarray) -> list[pb.Embedding]:
    return [pb.Embedding(values=row.tolist()) for row in vectors]


def reload_response(report: ReloadReport) -> pb.ReloadRepositoryResponse:
    return pb.ReloadRepositoryResponse(
        loaded=report.loaded,
        unloaded=report.unloaded,
        failed={key: public_reason(exc) for key, exc in report.failed.items()},
    )


def stream_error(code: grpc.StatusCode, message: str) -> pb.Status:
    """A failed stream request's in-band status (google.rpc.Status's fields)."""
    return pb.Status(code=code.value[0], message=message)


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
