"""The eval transform's geometry, shared by the trainer and the server (stdlib only).

Resize the shorter side, then centre-crop, with torchvision's rounding (``Resize(int)`` and
``CenterCrop`` on PIL images), so that both sides cut the same pixels.
"""

from __future__ import annotations


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) after resizing the shorter side to ``size`` (torchvision's rounding)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def center_crop_box(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    """PIL crop box (left, top, right, bottom) of the centred ``crop`` square (torchvision's rounding)."""
    top = int(round((height - crop) / 2.0))
    left = int(round((width - crop) / 2.0))
    return left, top, left + crop, top + crop
