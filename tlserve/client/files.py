"""Image files on disk for `tlserve predict`: files as given, or an ImageFolder tree with its labels."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass(frozen=True)
class LabelledFile:
    path: Path
    label: str | None  # the ImageFolder class folder, when there is one


def find_images(paths: Iterable[str | Path]) -> list[LabelledFile]:
    """Files as given; a folder of class sub-folders (ImageFolder) yields labelled files."""
    found: list[LabelledFile] = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(LabelledFile(path, None))
            continue
        for file in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
            label = file.parent.name if file.parent != path else None
            found.append(LabelledFile(file, label))
    return found
