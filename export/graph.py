"""The graph we export: uint8 NCHW images in, normalisation inside, probabilities and embedding out."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from tlserve.manifest import Preprocessing


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
    caller has already scaled and normalised (``prepare`` does it the same way). Returns
    ``(probabilities, embedding)`` and, with ``with_logits``, the logits last. With a calibration
    ``temperature`` the probabilities are ``softmax(logits / temperature)`` (one Div in the graph);
    the ``logits`` output stays the raw, uncalibrated logits.
    """

    def __init__(
        self,
        model: nn.Module,
        head_name: str,
        preprocessing: Preprocessing,
        uint8_input: bool = True,
        with_logits: bool = False,
        temperature: float | None = None,
    ) -> None:
        super().__init__()
        if temperature is not None and not temperature > 0:
            raise ValueError(f"the calibration temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.body, self.head = split_head(model, head_name)
        self.uint8_input = uint8_input
        self.with_logits = with_logits
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
        return (probabilities, embedding, logits) if self.with_logits else (probabilities, embedding)
