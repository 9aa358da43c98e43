"""Backbones: generic heads, Inception's auxiliary logits, weights from files."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.torch


def test_inception_v3_trains_a_step_at_299_with_aux_logits(torch_modules):
    import torch

    from tlserve.manifest import Preprocessing
    from tlserve.trainer.engine import Runtime, train_epoch
    from tlserve.trainer.fit import warmup_cosine
    from tlserve.trainer.models import build_model

    torch.manual_seed(0)
    model, config = build_model("inception_v3", 3, weights=None)
    assert (config.classifier, config.first_layer) == ("fc", "Conv2d_1a_3x3.conv")
    assert model.AuxLogits.fc.out_features == 3
    pre = Preprocessing(input_size=299, resize_size=342)
    images = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8)
    before = model.fc.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = train_epoch(
        model,
        [(images, torch.tensor([0, 2]))],
        optimizer,
        warmup_cosine(optimizer, 1, 1),
        torch.nn.CrossEntropyLoss(),
        pre,
        Runtime(torch.device("cpu")),
        prepare=model.train,
    )
    assert stats.images == 2 and stats.loss > 0
    assert not torch.equal(before, model.fc.weight)
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 299, 299))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3)  # aux logits dropped at eval


@pytest.mark.parametrize(
    "arch", ["resnet50", "vgg16", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny", "vit_b_16"]
)
def test_listed_backbones_take_a_generic_mlp_head(torch_modules, arch):
    import torch

    from tlserve.trainer.models import build_model

    model, config = build_model(arch, 5, weights=None, head="mlp:512,512", dropout=0.3, image_size=64)
    model.eval()
    head = model.get_submodule(config.classifier)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    dropouts = [m for m in head.modules() if isinstance(m, torch.nn.Dropout)]
    assert [m.out_features for m in linears] == [512, 512, 5] and [d.p for d in dropouts] == [0.3, 0.3]
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 5)


def test_weights_from_a_plain_state_dict_and_from_our_checkpoint(torch_modules, tmp_path):
    import torch

    from tlserve.trainer.models import build_model

    source, _ = build_model("resnet18", 4, weights=None)
    plain = tmp_path / "plain.pt"
    torch.save(source.state_dict(), plain)
    ours = tmp_path / "ours.pt"
    torch.save({"format": "tlserve.checkpoint/1", "model_state": source.state_dict()}, ours)
    for path in (plain, ours):
        loaded, _ = build_model("resnet18", 4, weights=str(path))
        assert torch.equal(loaded.fc.weight, source.fc.weight) and torch.equal(loaded.conv1.weight, source.conv1.weight)
    imagenet = tmp_path / "imagenet.pt"  # the architecture's own 1000-class state_dict: loaded before the head swap
    from torchvision.models import resnet18

    torch.save(resnet18().state_dict(), imagenet)
    backbone, _ = build_model("resnet18", 4, weights=str(imagenet))
    assert (
        torch.equal(backbone.conv1.weight, torch.load(imagenet, weights_only=True)["conv1.weight"])
        and backbone.fc.out_features == 4
    )


def test_weights_names_resolve_through_torchvision(torch_modules):
    from torchvision.models import MobileNet_V2_Weights

    from tlserve.trainer.models import resolve_weights

    assert resolve_weights("mobilenet_v2", "IMAGENET1K_V1") is MobileNet_V2_Weights.IMAGENET1K_V1
    assert resolve_weights("mobilenet_v2", "MobileNet_V2_Weights.IMAGENET1K_V1") is MobileNet_V2_Weights.IMAGENET1K_V1
    assert resolve_weights("mobilenet_v2", "DEFAULT") is MobileNet_V2_Weights.DEFAULT
    assert resolve_weights("mobilenet_v2", "none") is None
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        resolve_weights("mobilenet_v2", "NOPE")
