"""Trace a ServingGraph to an ONNX file with a dynamic batch dimension.

The default exporter is torch.export-based (``dynamo=True``): it is torch's supported path
since 2.9, and its optimiser folds BatchNorm into Conv. The TorchScript exporter
(``exporter="torchscript"``) is kept as an escape hatch; it is faster but deprecated.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch

from tlserve.export.graph import ServingGraph

log = logging.getLogger(__name__)

EXPORTERS = ("dynamo", "torchscript")
DEFAULT_OPSET = 18
MIN_OPSET = 17
CHATTY_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "torch.export", "torch._export")


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The exporter's own passes log every rewrite at INFO; keep them to warnings while we export."""
    loggers = [logging.getLogger(name) for name in CHATTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_graph(
    graph: ServingGraph,
    input_size: int,
    path: Path,
    input_name: str = "images",
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
) -> onnx.ModelProto:
    """Export ``graph`` to ``path`` (a single file, weights inside) and return the loaded model."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be at least {MIN_OPSET}, got {opset}")
    graph = graph.eval()
    dtype = torch.uint8 if graph.uint8_input else torch.float32
    sample = torch.zeros(2, 3, input_size, input_size, dtype=dtype)
    outputs = list(graph.outputs)
    log.info("exporting %s with the %s exporter (opset %d)", path.name, exporter, opset)
    with torch.no_grad(), warnings.catch_warnings(), quiet_exporter():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        if exporter == "dynamo":
            torch.onnx.export(
                graph,
                (sample,),
                str(path),
                input_names=[input_name],
                output_names=outputs,
                dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        else:
            axes = {name: {0: "batch"} for name in [input_name, *outputs]}
            torch.onnx.export(
                graph,
                (sample,),
                str(path),
                input_names=[input_name],
                output_names=outputs,
                dynamic_axes=axes,
                opset_version=opset,
                dynamo=False,
            )
    return onnx.load(str(path))
