"""What a served model looks like through the Open Inference Protocol: metadata and Triton's ModelConfig.

Shapes come from the ONNX graph itself (a symbolic dimension is -1) and datatypes from the
session, so the description cannot drift from what ModelInfer accepts and returns.
"""

from __future__ import annotations

from pathlib import Path

from tlserve.server.model import ServedModel
from tlserve.server.oip.datatypes import datatype_of
from tlserve.server.pb.inference import messages_pb2 as pb
from tlserve.server.pb.inference import model_config_pb2 as config_pb
from tlserve.server.runtime import CUDA, ORT_DTYPES

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"


def dims(shape) -> list[int]:
    return [d if isinstance(d, int) and d >= 0 else -1 for d in shape]


def input_signature(model: ServedModel) -> tuple[str, str, list[int]]:
    """(name, datatype, shape with -1 for the batch) of the model's one input."""
    size = model.manifest.preprocessing.input_size
    return model.input_name, datatype_of(model.input_dtype), [-1, 3, size, size]


def output_signatures(model: ServedModel) -> list[tuple[str, str, list[int]]]:
    """(name, datatype, shape) of every graph output, in graph order."""
    return [
        (o.name, datatype_of(ORT_DTYPES.get(o.type, "float32")), dims(o.shape))
        for o in model.runtime.session.get_outputs()
    ]


def model_metadata(model: ServedModel, versions: list[str]) -> pb.ModelMetadataResponse:
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=model.name,
        versions=versions,
        platform=PLATFORM,
        inputs=[tensor(name=n, datatype=d, shape=s) for n, d, s in [input_signature(model)]],
        outputs=[tensor(name=n, datatype=d, shape=s) for n, d, s in output_signatures(model)],
    )


def data_type(datatype: str) -> int:
    return config_pb.DataType.Value(f"TYPE_{datatype}")


def model_config(model: ServedModel, max_images: int) -> config_pb.ModelConfig:
    """Triton's view: every shape without the batch dimension, ``max_batch_size`` per request."""
    name, datatype, shape = input_signature(model)
    kind = config_pb.ModelInstanceGroup.KIND_GPU if model.provider == CUDA else config_pb.ModelInstanceGroup.KIND_CPU
    batching = model.batching
    return config_pb.ModelConfig(
        name=model.name,
        platform=PLATFORM,
        backend=BACKEND,
        max_batch_size=max_images,
        input=[
            config_pb.ModelInput(
                name=name, data_type=data_type(datatype), format=config_pb.ModelInput.FORMAT_NCHW, dims=shape[1:]
            )
        ],
        output=[
            config_pb.ModelOutput(name=n, data_type=data_type(d), dims=s[1:]) for n, d, s in output_signatures(model)
        ],
        instance_group=[config_pb.ModelInstanceGroup(name=model.name, count=batching.instances, kind=kind)],
        default_model_filename=Path(model.path).name,
        dynamic_batching=config_pb.ModelDynamicBatching(
            preferred_batch_size=[batching.max_batch_size],
            max_queue_delay_microseconds=round(batching.max_queue_delay * 1e6),
        ),
    )
