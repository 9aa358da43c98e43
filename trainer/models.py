"""Build any torchvision classifier by name, with pretrained weights and a new head.

Weights always come through torchvision's weights API (``get_model_weights``), so the hub
cache ($TORCH_HOME/hub/checkpoints) is the one place pretrained files live. The head is
replaced generically: the last ``nn.Linear`` of the network is the classifier, whatever the
family calls it (``fc``, ``classifier[1]``, ``heads.head``...).

``build_model`` returns the network with its :class:`ModelConfig`: what built it and the dotted
names of its parts (as timm's ``PretrainedCfg`` names ``classifier`` and ``first_conv``). The
config travels in the checkpoint; nothing is stamped onto the module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn
from torchvision import models as tvm

from tlserve.trainer.torchfile import CheckpointError, safe_load


@dataclass(frozen=True)
class ModelConfig:
    """How to build the network again, and where its parts are.

    ``classifier``: dotted name of the new head module (its input is the embedding: export cuts
    the graph there and the strategies train it). ``first_layer``: dotted name of the input
    layer (the first convolution, or linear layer).
    """

    arch: str
    num_classes: int
    classifier: str
    first_layer: str
    head: str = "linear"  # "linear" or "mlp:512,512"
    dropout: float = 0.0
    image_size: int | None = None  # ViT builders size their position embeddings from it


def resolve_weights(arch: str, spec: str | None) -> tvm.WeightsEnum | None:
    """``None``/"none" -> None; "DEFAULT" or an enum member name -> that torchvision enum."""
    if spec is None or spec.lower() == "none" or Path(spec).is_file():
        return None
    enum = tvm.get_model_weights(arch)
    if spec == "DEFAULT":
        return enum.DEFAULT
    name = spec.split(".")[-1]
    try:
        return enum[name]
    except KeyError:
        choices = ", ".join(["DEFAULT", "none", *enum.__members__])
        raise ValueError(f"unknown weights {spec!r} for {arch}; choose one of: {choices}, or a file path") from None


def head_name(model: nn.Module) -> str:
    """Dotted name of the final classifier layer (the last nn.Linear outside auxiliary heads)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith("AuxLogits")]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to replace")
    return names[-1]


def first_layer_name(model: nn.Module) -> str:
    """Dotted name of the input layer: the first convolution or linear layer, in registration order."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and not name.startswith("AuxLogits"):
            return name
    raise ValueError(f"{type(model).__name__} has no convolution or linear layer")


def make_head(in_features: int, num_classes: int, head: str = "linear", dropout: float = 0.0) -> nn.Module:
    """``linear`` or ``mlp:512,512`` (Linear-ReLU-Dropout blocks, then the classifier)."""
    if head == "linear":
        return (
            nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))
            if dropout
            else nn.Linear(in_features, num_classes)
        )
    if head.startswith("mlp:"):
        layers: list[nn.Module] = []
        width = in_features
        for size in (int(s) for s in head[4:].split(",") if s):
            layers += [nn.Linear(width, size), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = size
        return nn.Sequential(*layers, nn.Linear(width, num_classes))
    raise ValueError(f"unknown head {head!r}: use 'linear' or 'mlp:512,512'")


def _set_module(model: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _weights_file(path: str) -> tuple[dict, bool]:
    """(state_dict, is_ours): a plain state_dict, or the ``model_state`` of one of our checkpoints."""
    state = safe_load(path)
    if isinstance(state, dict) and "model_state" in state:
        return state["model_state"], True
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state_dict or a tlserve checkpoint")
    return state, False


def _builder_kwargs(arch: str, pretrained: bool, image_size: int | None) -> dict:
    if arch == "inception_v3":
        return {"aux_logits": True, "init_weights": not pretrained}
    if arch.startswith("vit_") and image_size and not pretrained:
        return {"image_size": image_size}  # position embeddings sized for the input (pretrained ViT: 224 only)
    return {}


def build_model(
    arch: str,
    num_classes: int,
    weights: str | None = None,
    head: str = "linear",
    dropout: float = 0.0,
    image_size: int | None = None,
) -> tuple[nn.Module, ModelConfig]:
    """A torchvision model with (optionally) pretrained weights and a fresh ``num_classes`` head, and its config.

    Pretrained weights are loaded first, then the head is replaced (torchvision's builders
    refuse ``num_classes`` together with ``weights``). ``weights`` may also be a file: a plain
    state_dict of the architecture (its original head: loaded before the head swap; or the new
    head: loaded after it), or one of our checkpoints (loaded after the head swap).
    """
    enum = resolve_weights(arch, weights)
    model = tvm.get_model(arch, weights=enum, **_builder_kwargs(arch, enum is not None, image_size))
    state, ours = _weights_file(weights) if weights is not None and Path(weights).is_file() else (None, False)
    if state is not None and not ours:
        try:
            model.load_state_dict(state)
            state = None
        except RuntimeError:
            pass  # a state_dict with a new head: load it after the swap
    name = head_name(model)
    in_features = model.get_submodule(name).in_features
    _set_module(model, name, make_head(in_features, num_classes, head, dropout))
    if arch == "inception_v3":
        model.AuxLogits.fc = nn.Linear(model.AuxLogits.fc.in_features, num_classes)
    if state is not None:
        model.load_state_dict(state)
    return model, ModelConfig(arch, num_classes, name, first_layer_name(model), head, dropout, image_size)
