"""Every strategy freezes exactly what it claims; frozen BatchNorm stays in eval mode."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.torch


HEAD = "classifier.1"  # MobileNetV2's classifier: Sequential(Dropout, Linear)


def _count(params):
    return sum(p.numel() for p in params)


@pytest.fixture()
def mnv2(torch_modules):
    from tlserve.trainer.models import build_model

    model, config = build_model("mobilenet_v2", 3, weights=None)
    assert config.classifier == HEAD
    return model


def _bn_modes(model):
    from torch import nn

    return {name: m.training for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


def test_feature_extract_trains_only_the_head_with_backbone_bn_in_eval(mnv2):
    from tlserve.trainer.strategies import freeze_batchnorm, set_trainable, trainable_count

    set_trainable(mnv2, HEAD, "head")
    assert trainable_count(mnv2) == 1280 * 3 + 3
    mnv2.train()
    freeze_batchnorm(mnv2)
    modes = _bn_modes(mnv2)
    assert modes and not any(modes.values())
    assert mnv2.classifier.training


def test_partial_unfreezes_the_top_blocks(mnv2):
    from torch import nn

    from tlserve.trainer.strategies import backbone_blocks, freeze_batchnorm, set_trainable, trainable_count

    names = [name for name, _ in backbone_blocks(mnv2, HEAD)]
    assert names == [f"features.{i}" for i in range(19)]
    set_trainable(mnv2, HEAD, "partial", unfreeze=2)
    expected = _count(mnv2.features[17].parameters()) + _count(mnv2.features[18].parameters()) + 1280 * 3 + 3
    assert trainable_count(mnv2) == expected
    mnv2.train()
    freeze_batchnorm(mnv2)
    for name, module in mnv2.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            assert module.training == name.startswith(("features.17.", "features.18.")), name


@pytest.mark.parametrize("phase", ["full"])
def test_finetune_and_scratch_train_everything(mnv2, phase):
    from tlserve.trainer.strategies import freeze_batchnorm, param_groups, set_trainable, trainable_count

    set_trainable(mnv2, HEAD, phase)
    assert trainable_count(mnv2) == _count(mnv2.parameters())
    mnv2.train()
    freeze_batchnorm(mnv2)
    assert all(_bn_modes(mnv2).values())
    head, body = param_groups(mnv2, HEAD, 1e-3, 0.1)
    assert (head["lr"], body["lr"]) == (1e-3, pytest.approx(1e-4))
    assert _count(head["params"]) == 1280 * 3 + 3 and _count(body["params"]) == _count(mnv2.parameters()) - 3843


def test_two_phase_keeps_bn_in_inference_once_unfrozen(mnv2):
    from tlserve.trainer.strategies import freeze_batchnorm, plan, set_trainable

    head, full = plan("two-phase", 5, 2, 3e-3, 1e-3, 0.1)
    assert (head.name, head.epochs, full.name, full.epochs, full.lr) == ("head", 2, "full", 3, 1e-3)
    set_trainable(mnv2, HEAD, full.name)
    mnv2.train()
    freeze_batchnorm(mnv2, full.bn_inference)
    assert not any(_bn_modes(mnv2).values())
    assert all(p.requires_grad for p in mnv2.parameters())


@pytest.mark.parametrize(
    "arch,top",
    [
        ("resnet18", ["layer4.0", "layer4.1"]),
        ("vgg11", ["classifier.0", "classifier.3"]),
        ("vit_b_16", ["encoder.layers.encoder_layer_11", "encoder.ln"]),
        ("efficientnet_b0", ["features.7.0", "features.8"]),
    ],
)
def test_partial_is_generic_across_families(torch_modules, arch, top):
    from tlserve.trainer.models import build_model
    from tlserve.trainer.strategies import backbone_blocks, head_parameters, set_trainable, trainable_count

    model, config = build_model(arch, 4, weights=None)
    blocks = backbone_blocks(model, config.classifier)
    assert [name for name, _ in blocks[-2:]] == top
    set_trainable(model, config.classifier, "partial", unfreeze=2)
    head = _count(head_parameters(model, config.classifier))
    assert trainable_count(model) == _count(p for _, ps in blocks[-2:] for p in ps) + head
