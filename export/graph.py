"""The graph we export: uint8 NCHW images in, normalisation inside, the chosen outputs out
(``probabilities`` always; ``embedding`` and ``logits`` when asked for)."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from tlserve.manifest import Preprocessing

PROBABILITIES, EMBEDDING, LOGITS = "probabilities", "embedding", "logits"
OUTPUTS = (PROBABILITIES, EMBEDDING, LOGITS)  # every output a graph can have, in graph order
DEFAULT_OUTPUTS = (PROBABILITIES, EMBEDDING)


def output_selection(names: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The outputs ``names`` asks for (a comma-separated string or a sequence), in graph order; ValueError when
    one is unknown, repeated, or ``probabilities`` is missing (the server classifies from it)."""
    wanted = [n.strip() for n in names.split(",")] if isinstance(names, str) else [str(n).strip() for n in names]
    unknown = [n for n in wanted if n not in OUTPUTS]
    if unknown:
        raise ValueError(f"unknown output {unknown[0]!r}: choose from {', '.join(OUTPUTS)}")
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"outputs must not repeat, got {','.join(wanted)}")
    if PROBABILITIES not in wanted:
        raise ValueError(f"the outputs must include {PROBABILITIES!r}, got {','.join(wanted) or 'none'}")
    return tuple(n for n in OUTPUTS if n in wanted)


def split_head(model: nn.Module, head_name: str) -> tuple[nn.Module, nn.Module]:
    """(body, head): a copy of ``model`` whose head is nn.Identity (so it returns the embedding), and the head."""
    body = copy.deepcopy(model).eval()
    head = body.get_submodule(head_name)
    parent_name, _, child = head_name.rpartition(".")
    parent = body.get_submodule(parent_name) if parent_name else body
    setattr(parent, child, nn.Identity())
    return body, head


class ServingGraph(nn.Module):
    """Wraps a classifier so that its ONNX graph is self-contained.

    With ``uint8_input`` the input is 0-255 uint8 and ``/255`` plus mean/std run in the graph
    (folded into one ``(x - 255*mean) / (255*std)``); otherwise the input is float32 that the
    caller has already scaled and normalised (``prepare`` does it the same way). Returns the
    ``outputs`` (see :func:`output_selection`) in graph order: probabilities, embedding, logits. With a calibration
    ``temperature`` the probabilities are ``softmax(logits / temperature)`` (one Div in the graph);
    the ``logits`` output stays the raw, uncalibrated logits.
    """

    def __init__(
        self,
        model: nn.Module,
        head_name: str,
        preprocessing: Preprocessing,
        uint8_input: bool = True,
        outputs: tuple[str, ...] = DEFAULT_OUTPUTS,
        temperature: float | None = None,
    ) -> None:
        super().__init__()
        if temperature is not None and not temperature > 0:
            raise ValueError(f"the calibration temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.body, self.head = split_head(model, head_name)
        self.uint8_input = uint8_input
        self.outputs = output_selection(outputs)
        self.register_buffer("pixel_mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("pixel_std", torch.tensor(preprocessing.std).view(1, 3, 1, 1) * 255.0)

    def prepare(self, images: np.ndarray) -> np.ndarray:
        """uint8 NCHW images as this graph takes them: unchanged, or normalised float32 for a float graph."""
        if self.uint8_input:
            return images
        return ((images.astype(np.float32) - self.pixel_mean.numpy()) / self.pixel_std.numpy()).astype(np.float32)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = images.to(torch.float32)
        if self.uint8_input:
            x = (x - self.pixel_mean) / self.pixel_std
        embedding = torch.flatten(self.body(x), 1)
        logits = self.head(embedding)
        scaled = logits if self.temperature is None else logits / self.temperature
        probabilities = torch.softmax(scaled, dim=1)
        values = {PROBABILITIES: probabilities, EMBEDDING: embedding, LOGITS: logits}
        return tuple(values[name] for name in self.outputs)
