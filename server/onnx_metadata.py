"""Read an ONNX file's ``metadata_props`` without loading the model (stdlib only; a hostile file is bounded).

The top level of a ``ModelProto`` is walked field by field: the graph and every other large field is
skipped with a seek, only ``metadata_props`` (field 14: ``key`` = 1, ``value`` = 2) is read. A file that
ends inside a field (half written, truncated) or holds something that is not protobuf raises
:class:`MetadataError`; so does one past the limits on fields and on metadata bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

METADATA_PROPS = 14  # ModelProto.metadata_props
MAX_FIELDS = 10_000  # a real model has a dozen top-level fields
MAX_METADATA_BYTES = 4 << 20  # all metadata entries together
VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5


class MetadataError(ValueError):
    """The file is not a complete ONNX model, or its metadata is out of bounds."""


def _varint(read_byte, where: str) -> int:
    value = 0
    for shift in range(0, 70, 7):
        byte = read_byte()
        if byte is None:
            raise MetadataError(f"truncated {where}: the file ends inside a field")
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value
    raise MetadataError(f"malformed {where}: varint longer than 10 bytes")


def _file_byte(f: BinaryIO):
    def read() -> int | None:
        b = f.read(1)
        return b[0] if b else None

    return read


def _entry(data: bytes) -> tuple[str, str]:
    """A ``StringStringEntryProto``: (key, value)."""
    fields: dict[int, bytes] = {}
    pos = 0

    def read() -> int | None:
        nonlocal pos
        if pos >= len(data):
            return None
        pos += 1
        return data[pos - 1]

    while pos < len(data):
        key = _varint(read, "metadata entry")
        if key & 7 != LENGTH:
            raise MetadataError("malformed metadata entry: a field that is not a string")
        length = _varint(read, "metadata entry")
        if pos + length > len(data):
            raise MetadataError("truncated metadata entry")
        fields[key >> 3] = data[pos : pos + length]
        pos += length
    try:
        return fields.get(1, b"").decode(), fields.get(2, b"").decode()
    except UnicodeDecodeError:
        raise MetadataError("malformed metadata entry: not UTF-8") from None


def read_metadata(path: Path) -> dict[str, str]:
    """``metadata_props`` of the ONNX file at ``path`` as a dict (raises MetadataError or OSError)."""
    props: dict[str, str] = {}
    metadata_bytes = 0
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        read_byte = _file_byte(f)
        for _ in range(MAX_FIELDS):
            if f.tell() >= size:
                return props
            key = _varint(read_byte, "field key")
            number, wire = key >> 3, key & 7
            if number == 0:
                raise MetadataError("not an ONNX file: field number 0")
            if wire == VARINT:
                _varint(read_byte, "field")
                continue
            if wire not in (FIXED64, LENGTH, FIXED32):
                raise MetadataError(f"not an ONNX file: wire type {wire}")
            length = {FIXED64: 8, FIXED32: 4}.get(wire) or _varint(read_byte, "field length")
            end = f.tell() + length
            if end > size:
                raise MetadataError("truncated: the file ends inside a field (half written?)")
            if number == METADATA_PROPS and wire == LENGTH:
                metadata_bytes += length
                if metadata_bytes > MAX_METADATA_BYTES:
                    raise MetadataError(f"metadata larger than {MAX_METADATA_BYTES} bytes")
                key_text, value = _entry(f.read(length))
                props[key_text] = value
            else:
                f.seek(end)
    raise MetadataError(f"more than {MAX_FIELDS} top-level fields")
