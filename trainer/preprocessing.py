"""The eval preprocessing of a run: the weights' own transforms, optionally at another size."""

from __future__ import annotations

from torchvision import models as tvm

from tlserve.manifest import Preprocessing
from tlserve.trainer.models import resolve_weights


def weights_transform_values(arch: str, weights: str | None = None) -> dict:
    """crop/resize/interpolation/mean/std from the weights' own transforms (the arch's DEFAULT ones
    when ``weights`` is none or a file), or {} when the arch has no published weights."""
    try:
        enum = resolve_weights(arch, weights) or tvm.get_model_weights(arch).DEFAULT
        transform = enum.transforms()
    except (ValueError, KeyError, AttributeError):
        return {}
    return {
        "input_size": transform.crop_size[0],
        "resize_size": transform.resize_size[0],
        "interpolation": transform.interpolation.value,
        "mean": tuple(transform.mean),
        "std": tuple(transform.std),
    }


def preprocessing_for(
    arch: str, weights: str | None = None, image_size: int | None = None, resize_size: int | None = None
) -> Preprocessing:
    """The weights' preprocessing; ``image_size`` (0/None = theirs) keeps their resize/crop ratio
    unless ``resize_size`` is given."""
    values = weights_transform_values(arch, weights) or {"input_size": 224, "resize_size": 256}
    if image_size:
        ratio = values["resize_size"] / values["input_size"]
        values["input_size"] = image_size
        values["resize_size"] = resize_size or max(image_size, round(image_size * ratio))
    elif resize_size:
        values["resize_size"] = resize_size
    return Preprocessing(**values)
