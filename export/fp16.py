"""The fp16 variant (for the GPU): weights and compute in float16, inputs and outputs unchanged.

Uses ONNX Runtime's own converter (``onnxruntime.transformers.float16``, shipped with
onnxruntime, no extra dependency). Ops that lose too much in float16 stay in float32: the
input normalisation (Sub/Div on 0-255 values), Softmax, reductions, exp/log/pow/sqrt and
normalisation layers; casts are inserted around them.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

FP16_UNSAFE_OPS = (
    "Sub",
    "Div",
    "Softmax",
    "LogSoftmax",
    "ReduceMean",
    "ReduceSum",
    "ReduceL2",
    "ReduceLogSumExp",
    "Exp",
    "Log",
    "Pow",
    "Sqrt",
    "Reciprocal",
    "Erf",
    "LayerNormalization",
    "InstanceNormalization",
    "GroupNormalization",
    "CumSum",
)


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy of ``model`` with float32 I/O (uint8 inputs stay uint8) and unsafe ops kept in float32."""
    converted = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP16_UNSAFE_OPS]
    )
    # the converter leaves stale float32 value_info on tensors it made float16 (onnx.checker's full
    # check then fails): drop it, shape inference recomputes it
    del converted.graph.value_info[:]
    # it also appends the casts of float inputs at the end of the node list: restore topological order
    model_ir = ir.serde.deserialize_model(converted)
    model_ir.graph.sort()
    return ir.serde.serialize_model(model_ir)
