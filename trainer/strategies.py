"""What each transfer-learning strategy trains: freezing, BatchNorm mode, parameter groups, phases.

``backbone_blocks`` splits any torchvision classifier into an ordered list of blocks, generically:
plain ``nn.Sequential``/``nn.ModuleList`` containers are opened up, and so is any module that
holds most of the parameters (a trunk such as ViT's ``encoder``); everything else (a residual
block, an inverted residual, a Conv-BN-act unit, an Inception module) is one block. The new head
(``head``, the dotted name in ``ModelConfig.classifier``) and Inception's auxiliary head are not
part of the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

HEADLIKE = ("AuxLogits",)
CONTAINERS = (nn.Sequential, nn.ModuleList)


@dataclass(frozen=True)
class Phase:
    """A stretch of epochs with one set of trainable parameters and one learning rate."""

    name: str  # "head", "partial" or "full"
    epochs: int
    lr: float
    backbone_lr_mult: float = 1.0
    bn_inference: bool = False  # keep every BatchNorm in inference mode, trainable or not


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _is_head(name: str, head: str) -> bool:
    return name == head or name.startswith(head + ".") or name.split(".")[0] in HEADLIKE


def backbone_blocks(model: nn.Module, head: str) -> list[tuple[str, list[nn.Parameter]]]:
    """The backbone as ordered ``(name, parameters)`` blocks, input side first (``head`` left out)."""
    total = sum(p.numel() for n, p in model.named_parameters() if not _is_head(n, head))
    blocks: list[tuple[str, list[nn.Parameter]]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        own = [p for p in module.parameters(recurse=False)]
        if own:
            blocks.append((prefix or "<root>", own))
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if _is_head(name, head) or _count(child) == 0:
                continue
            has_head = head.startswith(name + ".")
            if has_head or type(child) in CONTAINERS or _count(child) > total / 2:
                visit(name, child)
            else:
                blocks.append((name, list(child.parameters())))

    visit("", model)
    return blocks


def head_parameters(model: nn.Module, head: str) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if _is_head(n, head)]


def set_trainable(model: nn.Module, head: str, phase: str, unfreeze: int = 0) -> None:
    """``head``: only the head; ``partial``: the head and the top ``unfreeze`` blocks; ``full``: all."""
    for p in model.parameters():
        p.requires_grad_(phase == "full")
    if phase == "full":
        return
    for p in head_parameters(model, head):
        p.requires_grad_(True)
    if phase == "partial" and unfreeze > 0:
        for _, params in backbone_blocks(model, head)[-unfreeze:]:
            for p in params:
                p.requires_grad_(True)


def freeze_batchnorm(model: nn.Module, all_layers: bool = False) -> None:
    """Put every BatchNorm whose parameters are frozen (or every one) into eval mode.

    Call after ``model.train()``: frozen layers then behave exactly as the pretrained network
    did, normalising with the running statistics, which stay put.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if all_layers or (params and not any(p.requires_grad for p in params)):
                module.eval()


def param_groups(model: nn.Module, head: str, lr: float, backbone_lr_mult: float) -> list[dict]:
    """Discriminative learning rates: the backbone at ``lr * backbone_lr_mult``, the head at ``lr``."""
    head_ids = {id(p) for p in head_parameters(model, head)}
    trained_head = [p for p in model.parameters() if p.requires_grad and id(p) in head_ids]
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": trained_head, "lr": lr, "name": "head"}]
    if body:
        groups.append({"params": body, "lr": lr * backbone_lr_mult, "name": "backbone"})
    return groups


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def plan(
    strategy: str, epochs: int, head_epochs: int, lr: float, finetune_lr: float, backbone_lr_mult: float
) -> list[Phase]:
    """The phases a (non-auto) strategy runs."""
    if strategy == "feature-extract":
        return [Phase("head", epochs, lr)]
    if strategy == "partial":
        return [Phase("partial", epochs, lr, backbone_lr_mult)]
    if strategy == "finetune":
        return [Phase("full", epochs, lr, backbone_lr_mult)]
    if strategy == "scratch":
        return [Phase("full", epochs, lr)]
    if strategy == "two-phase":
        # the Keras fine-tuning recipe: once unfrozen, BatchNorm stays in inference mode, so the
        # statistics the head was trained on do not shift under it
        phases = [
            Phase("head", head_epochs, lr),
            Phase("full", epochs - head_epochs, finetune_lr, backbone_lr_mult, bn_inference=True),
        ]
        return [p for p in phases if p.epochs > 0]
    raise ValueError(f"strategy {strategy!r} has no fixed plan")
