"""Hostile callers, shared by tests/server/test_fuzz*.py and benchmarks/fuzz_hostile.py.

Hypothesis strategies start from VALID requests (real PNG/JPEG files of scikit-image's photos,
valid uint8 tensors of the served model) and mutate them: the bytes, the metadata headers, the
shapes, datatypes, names, counts and sizes. :class:`Fuzzer` sends one drawn :class:`Case` to a
live server over gRPC only, and :func:`problems` says what is wrong with the answer: a status no
caller mistake may get (INTERNAL, UNKNOWN...), a long message, an echoed path or caller string,
a traceback, health that is no longer SERVING, or RSS over the bound.

No pytest here: the benchmark imports this module as a plain script dependency.
"""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import assume as hypothesis_assume
from hypothesis import strategies as st
from PIL import Image

from tlserve.server.pb.inference import grpc_service_pb2_grpc
from tlserve.server.pb.inference import messages_pb2 as oip
from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as task
from tlserve.server.pb.tlserve.v1 import tlserve_pb2_grpc

Code = grpc.StatusCode

# What a caller's mistake may be answered with; everything else (INTERNAL, UNKNOWN, UNAVAILABLE
# from a crashed server, ...) is a defect.
EXPECTED = frozenset(
    {
        Code.OK,
        Code.INVALID_ARGUMENT,
        Code.NOT_FOUND,
        Code.RESOURCE_EXHAUSTED,
        Code.FAILED_PRECONDITION,
        Code.DEADLINE_EXCEEDED,
        Code.OUT_OF_RANGE,
    }
)
INTERNAL_MESSAGE = "internal error"  # what the server answers for an exception it did not expect
MAX_MESSAGE = 600  # a status message is a sentence or two
MAX_ECHO = 100  # the most of one caller string a message may quote
TRACEBACK_MARKS = ("Traceback (most recent call last)", 'File "', "site-packages")
# RSS bounds, justified in docs/benchmarks.md ("Hostile callers"): a server process under the
# fuzz stays under RSS_BOUND; an in-process server (the tests, whose process already holds torch
# and the export) grows by at most RSS_GROWTH over the fuzz.
RSS_BOUND = 3 << 29  # 1.5 GiB
RSS_GROWTH = 1 << 29  # 512 MiB

TASK_RPCS = ("Classify", "Embed", "GetModelInfo", "ClassifyStream")
OIP_RPCS = ("ModelInfer", "ModelStreamInfer", "ModelMetadata", "ModelReady", "ModelConfig")
STREAMS = ("ClassifyStream", "ModelStreamInfer")
# How the examples are split over the RPC groups (the test and the benchmark alike).
SHARES = {"classify": 0.35, "task stream": 0.08, "lookups": 0.15, "infer": 0.34, "oip stream": 0.08}
GROUP_OF = {
    "Classify": "classify",
    "Embed": "classify",
    "ClassifyStream": "task stream",
    "GetModelInfo": "lookups",
    "ModelMetadata": "lookups",
    "ModelReady": "lookups",
    "ModelConfig": "lookups",
    "ModelInfer": "infer",
    "ModelStreamInfer": "oip stream",
}

PHOTOS = ("chelsea.png", "coffee.png", "camera.png", "logo.png", "rocket.jpg")  # RGB, RGB, grey, RGBA, JPEG
OTHER_FORMATS = ("no_time_for_that_tiny.gif", "multipage.tif")  # real files the API does not take


# --- what is served, and the real files the cases start from ------------------------------------
@dataclass(frozen=True)
class Target:
    """The served model as a caller sees it, and the server's limits the cases aim at."""

    model: str
    version: str
    input_name: str
    datatype: str
    output_names: tuple[str, ...]
    input_size: int
    max_images: int
    max_image_bytes: int
    max_message_bytes: int
    secrets: tuple[str, ...] = ()  # server-side text (paths) no answer may contain

    @property
    def health_services(self) -> tuple[str, ...]:
        return ("", f"tlserve.model.{self.model}")


def discover(channel: grpc.Channel, limits: dict[str, int], secrets: Sequence[str] = ()) -> Target:
    """The server's only model, from ModelMetadata and GetModelInfo (the server's own answers);
    ``limits`` are the server's settings the cases aim at (max_images, max_image_bytes, max_message_bytes)."""
    info = tlserve_pb2_grpc.InferenceStub(channel).GetModelInfo(task.GetModelInfoRequest(), timeout=30)
    meta = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
        oip.ModelMetadataRequest(name=info.name), timeout=30
    )
    return Target(
        model=info.name,
        version=info.version,
        input_name=meta.inputs[0].name,
        datatype=meta.inputs[0].datatype,
        output_names=tuple(o.name for o in meta.outputs),
        input_size=info.input_size,
        max_images=limits["max_images"],
        max_image_bytes=limits["max_image_bytes"],
        max_message_bytes=limits["max_message_bytes"],
        secrets=tuple(s for s in secrets if s),
    )


@dataclass(frozen=True)
class Seeds:
    """Valid inputs: photo file bytes, the same photos as uint8 CHW tensors, and hostile extras."""

    files: dict[str, bytes]
    tensors: dict[str, bytes]
    others: dict[str, bytes]
    ztxt_bomb: bytes  # a zTXt chunk that inflates to 64 MiB

    def __repr__(self) -> str:  # hypothesis shows the strategies' arguments
        return f"Seeds({', '.join(self.files)}; {', '.join(self.others)})"

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))


def load_seeds(data_dir: str | Path, input_size: int) -> Seeds:
    root = Path(data_dir)
    files = {name: (root / name).read_bytes() for name in PHOTOS}
    tensors = {}
    for name, data in files.items():
        rgb = Image.open(io.BytesIO(data)).convert("RGB").resize((input_size, input_size))
        tensors[name] = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).tobytes()
    others = {name: (root / name).read_bytes() for name in OTHER_FORMATS if (root / name).is_file()}
    return Seeds(files, tensors, others, png_chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"\x00" * (64 << 20), 9)))


# --- byte surgery on real files ------------------------------------------------------------------
def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def is_png(data: bytes) -> bool:
    return data.startswith(b"\x89PNG\r\n\x1a\n")


def with_ihdr(data: bytes, **fields: int) -> bytes:
    """The PNG with IHDR fields replaced (width, height, depth, color, compression, filter,
    interlace) and a valid CRC, so that the header parses."""
    names = ("width", "height", "depth", "color", "compression", "filter", "interlace")
    values = dict(zip(names, struct.unpack(">IIBBBBB", data[16:29])))
    values.update(fields)
    body = struct.pack(">IIBBBBB", *(values[n] for n in names))
    return data[:8] + png_chunk(b"IHDR", body) + data[33:]


def sof_offset(data: bytes) -> int | None:
    """Offset of the JPEG's SOFn marker segment, walking the segments from SOI."""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return i
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def with_sof(data: bytes, height: int | None = None, width: int | None = None, precision: int | None = None) -> bytes:
    """The JPEG with its frame header's dimensions or precision replaced."""
    at = sof_offset(data)
    if at is None:
        return data
    out = bytearray(data)
    if precision is not None:
        out[at + 4] = precision
    if height is not None:
        out[at + 5 : at + 7] = height.to_bytes(2, "big")
    if width is not None:
        out[at + 7 : at + 9] = width.to_bytes(2, "big")
    return bytes(out)


def flip_bits(data: bytes, positions: Sequence[int]) -> bytes:
    out = bytearray(data)
    for p in positions:
        out[(p // 8) % len(out)] ^= 1 << (p % 8)
    return bytes(out)


# --- strategies: pieces --------------------------------------------------------------------------
ANY_CHAR = st.characters(codec="utf-8")
# what repr() shows as itself, one char for one: no controls, separators, unassigned, quotes or backslash
PLAIN_CHAR = st.characters(categories=("L", "M", "N", "P", "S"), exclude_characters="\\'\"")


def long_text(lengths: Sequence[int], chars: st.SearchStrategy[str] = ANY_CHAR) -> st.SearchStrategy[str]:
    """Caller strings of the given lengths, from a drawn unit repeated (cheap even at 1 MB)."""
    unit = st.text(chars, min_size=1, max_size=8)
    return st.builds(lambda u, n: (u * n)[:n], unit, st.sampled_from(list(lengths)))


@dataclass(frozen=True)
class Reach:
    """How far the strategies go: the main fuzz stays inside what the server handles today; the
    wide tests (see test_fuzz.py) reach the long strings and impossible shapes."""

    long_strings: bool = False  # caller strings past MAX_ECHO (to 1 MiB), long runs of escaped characters
    max_rank: int = 64  # OIP / tensor shapes up to this rank (numpy's limit)
    huge_zero_shapes: bool = False  # > 64 dims, or a 0 with other dims past numpy's size type
    only_those: bool = False  # every caller string long, every free shape past numpy's limits

    def strings(self, max_size: int = 12) -> st.SearchStrategy[str]:
        short = st.text(ANY_CHAR, max_size=max_size)  # anything: repr() makes at most 10 chars of one
        if self.only_those:
            return long_text([101, 4096, 65536, 1 << 20])
        if self.long_strings:
            return st.one_of(short, long_text([40, MAX_ECHO], ANY_CHAR), long_text([101, 4096, 65536, 1 << 20]))
        return st.one_of(short, long_text([40, MAX_ECHO - 1, MAX_ECHO], PLAIN_CHAR))


MAIN = Reach()
WIDE = Reach(long_strings=True, max_rank=70, huge_zero_shapes=True)  # everything
PENDING = Reach(long_strings=True, max_rank=70, huge_zero_shapes=True, only_those=True)  # the wide cases


def metadata_headers() -> st.SearchStrategy[tuple[tuple[str, str | bytes], ...]]:
    """0-4 headers with random keys, binary ``-bin`` ones and long values, inside gRPC's 8 KiB
    (each at most 1,544 bytes as HPACK counts them, base64 of a binary value included)."""
    key = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=40).filter(
        lambda k: not k.startswith("grpc-") and k not in ("te", "content-type", "user-agent", "host")
    )
    ascii_value = st.one_of(
        st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=64),
        long_text([500, 1500]).map(lambda s: "".join(c if 0x21 <= ord(c) <= 0x7E else "x" for c in s)),
    )
    header = st.one_of(
        st.tuples(key, ascii_value),
        st.tuples(key.map(lambda k: k + "-bin"), st.binary(max_size=1000)),
    )
    return st.lists(header, max_size=4).map(tuple)


def deadlines() -> st.SearchStrategy[float]:
    return st.sampled_from([30.0] * 12 + [0.001, 0.02])


def model_refs(target: Target, reach: Reach) -> st.SearchStrategy[tuple[str, str]]:
    """(name, version): mostly valid, else empty, unicode, path-like, long."""
    names = st.one_of(
        st.sampled_from(["", target.model, target.model.upper(), f" {target.model}", f"{target.model}\x00"]),
        st.sampled_from(["../x", "../../etc/passwd", f"{target.model}/../{target.model}", "./", "/", "\\..\\x"]),
        st.sampled_from(["モデル", "𝔣𝔞𝔰𝔥𝔦𝔬𝔫", "\u202e" + target.model, "fa\u0301shion"]),
        reach.strings(),
    )
    versions = st.one_of(
        st.sampled_from(["", target.version, "0", "-1", "01", "1.0", "latest", "9" * 30, f"../{target.version}"]),
        reach.strings(),
    )
    return st.one_of(
        st.just((target.model, "")),
        st.just(("", "")),
        st.tuples(st.just(target.model), versions),
        st.tuples(names, st.just("")),
        st.tuples(names, versions),
    )


def dims(target: Target) -> st.SearchStrategy[int]:
    return st.one_of(
        st.sampled_from([0, 1, 2, 3, target.input_size, -1, -(2**63), 2**31, 2**32 + 1, 2**62, 2**63 - 1]),
        st.integers(0, 300),
        st.integers(-(2**63), 2**63 - 1),
    )


SHAPE_KINDS = (
    "changed",
    "changed",
    "changed",
    "added",
    "dropped",
    "prepended",
    "short",
    "long",
    "repeated",
    "repeated",
)


@st.composite
def shapes(draw, target: Target, reach: Reach, valid: Sequence[int]) -> list[int]:
    """A shape near ``valid`` (one dim changed, added or dropped) or any shape up to the reach's rank;
    with ``reach.huge_zero_shapes``, also those past numpy's limits."""
    valid = list(valid)
    kinds = (
        ("numpy_limits",) if reach.only_those else SHAPE_KINDS + (("numpy_limits",) if reach.huge_zero_shapes else ())
    )
    kind = draw(st.sampled_from(kinds))
    dim = dims(target)
    if kind == "changed":
        at = draw(st.integers(0, len(valid) - 1))
        shape = valid[:at] + [draw(dim)] + valid[at + 1 :]
    elif kind == "added":
        shape = valid + [draw(dim)]
    elif kind == "dropped":
        shape = valid[1:]
    elif kind == "prepended":
        shape = [1] + valid
    elif kind == "short":
        shape = draw(st.lists(dim, max_size=min(reach.max_rank, 6)))
    elif kind == "long":
        shape = draw(st.lists(dim, min_size=7, max_size=reach.max_rank))
    elif kind == "repeated":
        rank = draw(st.sampled_from(sorted({0, 7, 16, 33, 64, reach.max_rank})))
        shape = [draw(st.sampled_from([2**62, 2**63 - 1, -(2**63), 0, 1, 3, target.input_size]))] * rank
    else:
        return draw(st.sampled_from([[0, 2**62, 2**62], [1] * 70, [0] * 65, [2**62] * 1000]))
    # numpy holds at most 64 dims, and no zero-size array whose other dims overflow its byte count
    hypothesis_assume(reach.huge_zero_shapes or (len(shape) <= 64 and not (0 in shape and _overflows(shape))))
    return shape


def _overflows(shape: Sequence[int]) -> bool:
    total = 8  # the widest item
    for d in shape:
        total *= max(d, 1)
    return total >= 2**63


# --- strategies: whole cases ---------------------------------------------------------------------
@dataclass
class Case:
    """One call: an RPC, its request(s), headers and deadline. ``repr`` stays short for reports."""

    rpc: str
    requests: list[Message]
    metadata: tuple[tuple[str, str | bytes], ...] = ()
    timeout: float = 30.0

    def __repr__(self) -> str:
        parts = ", ".join(brief(r) for r in self.requests)
        return f"Case({self.rpc}, [{parts}], metadata={brief_value(self.metadata)}, timeout={self.timeout})"

    def _repr_pretty_(self, printer, cycle) -> None:  # what hypothesis prints for a falsifying example
        printer.text(repr(self))


def brief_value(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit // 2]}...<{len(text)} chars>...{text[-limit // 4 :]}"


def brief(message: Message) -> str:
    """A message as ``Type(field=value, ...)`` with long values shortened."""
    fields = []
    for descriptor, value in message.ListFields():
        if descriptor.message_type is not None and descriptor.is_repeated and not _is_map(descriptor):
            text = f"[{', '.join(brief(v) for v in list(value)[:6])}{', ...' if len(value) > 6 else ''}]"
        elif descriptor.message_type is not None and not _is_map(descriptor):
            text = brief(value)
        elif _is_map(descriptor):
            text = brief_value({k: brief(v) if isinstance(v, Message) else v for k, v in value.items()}, 200)
        elif descriptor.is_repeated:
            items = list(value)
            text = brief_value(items) if len(items) <= 70 else f"<{len(items)} values {brief_value(items[:8])}>"
        else:
            text = brief_value(value)
        fields.append(f"{descriptor.name}={text}")
    return f"{type(message).__name__}({', '.join(fields)})"


def _is_map(descriptor) -> bool:
    return descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry


@st.composite
def encoded_images(draw, seeds: Seeds, target: Target) -> bytes:
    """A photo's file bytes, unchanged or mutated."""
    data = seeds.files[draw(st.sampled_from(sorted(seeds.files)))]
    kind = draw(st.sampled_from(BYTE_MUTATIONS))
    size = len(data)
    if kind == "valid":
        return data
    if kind == "bit_flips":
        return flip_bits(data, draw(st.lists(st.integers(0, size * 8 - 1), min_size=1, max_size=16)))
    if kind == "header_flips":
        return flip_bits(data, draw(st.lists(st.integers(0, 8 * 160 - 1), min_size=1, max_size=8)))
    if kind == "truncate":
        return data[: draw(st.one_of(st.integers(0, 64), st.integers(0, size - 1)))]
    if kind == "junk_prefix":
        return draw(st.binary(min_size=1, max_size=64)) + data
    if kind == "magic_prefix":
        magic = draw(st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00"]))
        return magic + draw(st.sampled_from([data, data[8:], b""]))
    if kind == "junk_tail":
        return data + draw(st.binary(min_size=1, max_size=256))
    if kind == "overwrite":
        at = draw(st.integers(0, size - 1))
        junk = draw(st.binary(min_size=1, max_size=64))
        return data[:at] + junk + data[at + len(junk) :]
    if kind == "random":
        return draw(st.binary(max_size=1024))
    if kind == "empty":
        return b""
    if kind == "oversize":
        return data + b"\x00" * (target.max_image_bytes - size + 1)
    if kind == "other_format" and seeds.others:
        return seeds.others[draw(st.sampled_from(sorted(seeds.others)))]
    if kind == "declared_size":
        side = st.one_of(
            st.sampled_from([0, 1, 2, 7, 2000, 65535, 100_000, 2**31 - 1, 2**32 - 1]), st.integers(0, 5000)
        )
        if is_png(data):
            return with_ihdr(data, width=draw(side), height=draw(side))
        side16 = st.one_of(st.sampled_from([0, 1, 2, 2000, 65535]), st.integers(0, 65535))
        return with_sof(data, height=draw(side16), width=draw(side16))
    if kind == "header_fields":
        byte = st.integers(0, 255)
        if is_png(data):
            field_name = draw(st.sampled_from(["depth", "color", "compression", "filter", "interlace"]))
            return with_ihdr(data, **{field_name: draw(st.one_of(st.sampled_from([0, 1, 2, 3, 4, 6, 8, 16]), byte))})
        return with_sof(data, precision=draw(byte))
    if kind == "chunks" and is_png(data):
        chunk = draw(
            st.sampled_from(
                [
                    seeds.ztxt_bomb,
                    struct.pack(">I", 2**31 - 1) + b"IDAT",
                    struct.pack(">I", 2**32 - 1) + b"tEXt",
                    png_chunk(b"IEND", b""),
                    png_chunk(b"IHDR", data[16:29]),
                ]
            )
        )
        return data[:33] + chunk + data[33:]
    return flip_bits(data, [draw(st.integers(0, size * 8 - 1))])


BYTE_MUTATIONS = (
    "valid",
    "bit_flips",
    "header_flips",
    "truncate",
    "junk_prefix",
    "magic_prefix",
    "junk_tail",
    "overwrite",
    "random",
    "empty",
    "oversize",
    "other_format",
    "declared_size",
    "header_fields",
    "chunks",
)


def tensor_images(seeds: Seeds, target: Target, reach: Reach) -> st.SearchStrategy[task.Tensor]:
    size = target.input_size
    valid_shape = [3, size, size]
    data = st.sampled_from(sorted(seeds.tensors)).map(seeds.tensors.__getitem__)
    wrong_data = st.one_of(
        data.map(lambda d: d[:-1]),
        data.map(lambda d: d + b"\x00"),
        st.just(b""),
        st.binary(max_size=64),
    )
    return st.one_of(
        st.builds(task.Tensor, shape=st.just(valid_shape), data=data),
        st.builds(task.Tensor, shape=st.just(valid_shape), data=wrong_data),
        st.builds(task.Tensor, shape=shapes(target, reach, valid_shape), data=st.one_of(data, wrong_data)),
    )


@st.composite
def task_images(draw, seeds: Seeds, target: Target, reach: Reach) -> list[task.Image]:
    """Mostly one or two images; sometimes none, the limit, or one more (valid tensors)."""
    kind = draw(st.sampled_from(["some"] * 7 + ["none", "limit", "over"]))
    if kind == "none":
        return []
    if kind in ("limit", "over"):
        count = target.max_images + (kind == "over")
        names = draw(st.lists(st.sampled_from(sorted(seeds.tensors)), min_size=count, max_size=count))
        shape = [3, target.input_size, target.input_size]
        return [task.Image(tensor=task.Tensor(shape=shape, data=seeds.tensors[n])) for n in names]
    images = []
    for source in draw(st.lists(st.sampled_from(["encoded"] * 6 + ["tensor"] * 3 + ["none"]), min_size=1, max_size=2)):
        if source == "encoded":
            images.append(task.Image(encoded=draw(encoded_images(seeds, target))))
        elif source == "tensor":
            images.append(task.Image(tensor=draw(tensor_images(seeds, target, reach))))
        else:
            images.append(task.Image())
    return images


@st.composite
def task_ref(draw, target: Target, reach: Reach) -> task.ModelRef:
    """Mostly the served model (by default or by name), so that the images are what is tested."""
    kind = draw(st.sampled_from(["default", "named", "pinned", "default", "named", "hostile"]))
    if kind == "hostile":
        name, version = draw(model_refs(target, reach))
        return task.ModelRef(name=name, version=version)
    return task.ModelRef(name=target.model if kind != "default" else "", version=target.version * (kind == "pinned"))


def classify_requests(seeds: Seeds, target: Target, reach: Reach) -> st.SearchStrategy[task.ClassifyRequest]:
    top_k = st.sampled_from([0, 1, 3, 10, 11, 1000, 2**32 - 1])
    return st.builds(
        task.ClassifyRequest, model=task_ref(target, reach), images=task_images(seeds, target, reach), top_k=top_k
    )


@st.composite
def classify_cases(draw, seeds: Seeds, target: Target, reach: Reach = MAIN) -> Case:
    """Classify or Embed with hostile images, references, counts and headers."""
    request = draw(classify_requests(seeds, target, reach))
    if draw(st.sampled_from([False] * 39 + [True])):  # one byte past --max-message-bytes: gRPC itself refuses it
        # (rare, and never in a stream: the process keeps such 16 MiB buffers a while, per thread)
        photo = seeds.files[draw(st.sampled_from(sorted(seeds.files)))]
        del request.images[:]
        request.images.add(encoded=photo + b"\x00" * (target.max_message_bytes - len(photo) + 1))
    rpc = draw(st.sampled_from(["Classify", "Embed"]))
    if rpc == "Embed":
        request = task.EmbedRequest(model=request.model, images=request.images)
    return Case(rpc, [request], draw(metadata_headers()), draw(deadlines()))


@st.composite
def task_stream_cases(draw, seeds: Seeds, target: Target, reach: Reach = MAIN) -> Case:
    requests = draw(st.lists(classify_requests(seeds, target, reach), min_size=1, max_size=3))
    return Case("ClassifyStream", requests, draw(metadata_headers()), draw(deadlines()))


@st.composite
def lookup_cases(draw, target: Target, reach: Reach = MAIN) -> Case:
    """GetModelInfo, ModelMetadata, ModelReady, ModelConfig with hostile names and versions."""
    name, version = draw(model_refs(target, reach))
    rpc = draw(st.sampled_from(["GetModelInfo", "ModelMetadata", "ModelReady", "ModelConfig"]))
    if rpc == "GetModelInfo":
        request: Message = task.GetModelInfoRequest(model=task.ModelRef(name=name, version=version))
    else:
        request = getattr(oip, f"{rpc}Request")(name=name, version=version)
    return Case(rpc, [request], draw(metadata_headers()), draw(deadlines()))


OIP_DATATYPES = ("UINT8", "FP32", "FP16", "FP64", "INT8", "INT64", "UINT64", "BOOL", "BYTES", "uint8", "UINT8 ")
TYPED_FIELDS = (
    "bool_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "fp32_contents",
    "fp64_contents",
    "bytes_contents",
)
INFER_MUTATIONS = (  # repeated entries are drawn more often
    *("model", "datatype", "datatype", "shape", "shape", "shape", "shape", "batch", "raw_length", "raw_length"),
    *("typed", "typed", "both", "raw_count", "input_name", "inputs", "outputs", "outputs", "parameters"),
)


def parameters() -> st.SearchStrategy[dict[str, oip.InferParameter]]:
    value = st.one_of(
        st.builds(oip.InferParameter, bool_param=st.booleans()),
        st.builds(oip.InferParameter, int64_param=st.integers(-(2**63), 2**63 - 1)),
        st.builds(oip.InferParameter, string_param=st.text(max_size=40)),
        st.builds(oip.InferParameter, double_param=st.floats(allow_nan=True)),
        st.builds(oip.InferParameter, uint64_param=st.integers(0, 2**64 - 1)),
    )
    keys = st.one_of(
        st.sampled_from(["classification", "priority", "timeout", "binary_data", ""]), st.text(max_size=20)
    )
    return st.dictionaries(keys, value, max_size=3)


@st.composite
def infer_requests(draw, seeds: Seeds, target: Target, reach: Reach) -> oip.ModelInferRequest:
    """A valid ModelInferRequest of 1..max_images real photos, then 0-3 mutations."""
    size = target.input_size
    n = draw(st.sampled_from([1, 1, 1, 2, target.max_images]))
    names = draw(st.lists(st.sampled_from(sorted(seeds.tensors)), min_size=n, max_size=n))
    raw = b"".join(seeds.tensors[name] for name in names)
    request = oip.ModelInferRequest(model_name=draw(st.sampled_from([target.model, ""])))
    tensor = request.inputs.add(name=target.input_name, datatype=target.datatype, shape=[n, 3, size, size])
    raw_contents = [raw]
    count = draw(st.sampled_from([0, 1, 1, 1, 2, 2, 3]))
    for mutation in draw(st.lists(st.sampled_from(INFER_MUTATIONS), min_size=count, max_size=count, unique=True)):
        if mutation == "model":
            request.model_name, request.model_version = draw(model_refs(target, reach))
        elif mutation == "datatype":
            tensor.datatype = draw(st.one_of(st.sampled_from(OIP_DATATYPES), reach.strings()))
            if draw(st.booleans()):  # raw bytes that fit the new type's item size
                itemsize = {"FP32": 4, "FP16": 2, "FP64": 8, "INT64": 8, "UINT64": 8}.get(tensor.datatype, 1)
                raw_contents = [(raw * itemsize)[: len(raw) * itemsize]]
        elif mutation == "shape":
            tensor.ClearField("shape")
            tensor.shape.extend(draw(shapes(target, reach, [n, 3, size, size])))
        elif mutation == "batch":
            count = draw(st.sampled_from([0, target.max_images + 1]))
            tensor.ClearField("shape")
            tensor.shape.extend([count, 3, size, size])
            raw_contents = [(raw * (count // n + 1))[: count * 3 * size * size]]
        elif mutation == "raw_length":
            cut = draw(st.one_of(st.integers(-64, 64), st.sampled_from([-len(raw), len(raw)])))
            raw_contents = [raw[:cut] if cut < 0 else raw + b"\x07" * cut]
        elif mutation in ("typed", "both"):
            field_name = draw(st.sampled_from(["uint_contents", "uint_contents", *TYPED_FIELDS]))
            values = list(np.frombuffer(raw, dtype=np.uint8).tolist())
            how = draw(st.sampled_from(["exact", "short", "long", "out_of_range", "negative"]))
            if how == "short":
                values = values[: draw(st.integers(0, len(values) - 1))]
            elif how == "long":
                values = values + [1] * draw(st.integers(1, 16))
            elif how == "out_of_range":
                values[draw(st.integers(0, len(values) - 1))] = draw(st.sampled_from([256, 2**31, 2**32 - 1]))
            elif how == "negative":
                values[draw(st.integers(0, len(values) - 1))] = -1
            _set_typed(tensor.contents, field_name, values)
            if mutation == "typed":
                raw_contents = []
        elif mutation == "raw_count":
            raw_contents = draw(st.sampled_from([[], [raw, raw], [b"", raw]]))
        elif mutation == "input_name":
            tensor.name = draw(st.one_of(st.sampled_from(["", "input", "pixels", "IMAGES"]), reach.strings()))
        elif mutation == "inputs":
            how = draw(st.sampled_from(["none", "twice", "extra"]))
            if how == "none":
                request.ClearField("inputs")
                raw_contents = []
            else:
                extra = request.inputs.add()
                extra.CopyFrom(tensor)
                if how == "extra":
                    extra.name = draw(reach.strings())
                raw_contents = raw_contents * 2
        elif mutation == "outputs":
            for name in draw(st.lists(st.one_of(st.sampled_from(target.output_names), reach.strings()), max_size=3)):
                output = request.outputs.add(name=name)
                for key, value in draw(parameters()).items():
                    output.parameters[key].CopyFrom(value)
                if draw(st.booleans()):
                    k = draw(st.sampled_from([-(2**63), -1, 0, 1, 3, 10, 11, 2**62, 2**63 - 1]))
                    output.parameters["classification"].int64_param = k
        elif mutation == "parameters":
            for key, value in draw(parameters()).items():
                request.parameters[key].CopyFrom(value)
            request.id = draw(reach.strings())
    request.raw_input_contents.extend(raw_contents)
    return request


def _set_typed(contents: oip.InferTensorContents, field_name: str, values: list[int]) -> None:
    """``values`` in the named typed field, each made to fit the field's own wire type."""
    target = getattr(contents, field_name)
    if field_name == "bool_contents":
        target.extend(bool(v) for v in values)
    elif field_name in ("fp32_contents", "fp64_contents"):
        target.extend(float(v) for v in values)
    elif field_name == "bytes_contents":
        target.extend(bytes([v % 256]) for v in values[:64])
    else:
        low, high = WIRE_RANGES[field_name]
        target.extend(min(max(v, low), high) if low < 0 else v % (high + 1) for v in values)


WIRE_RANGES = {
    "int_contents": (-(2**31), 2**31 - 1),
    "int64_contents": (-(2**63), 2**63 - 1),
    "uint_contents": (0, 2**32 - 1),
    "uint64_contents": (0, 2**64 - 1),
}


@st.composite
def infer_cases(draw, seeds: Seeds, target: Target, reach: Reach = MAIN) -> Case:
    return Case("ModelInfer", [draw(infer_requests(seeds, target, reach))], draw(metadata_headers()), draw(deadlines()))


@st.composite
def oip_stream_cases(draw, seeds: Seeds, target: Target, reach: Reach = MAIN) -> Case:
    requests = draw(st.lists(infer_requests(seeds, target, reach), min_size=1, max_size=3))
    return Case("ModelStreamInfer", requests, draw(metadata_headers()), draw(deadlines()))


# --- sending, and judging the answer --------------------------------------------------------------
@dataclass
class Answer:
    """What came back: the call's final status, plus each stream response (OK or in-band error)."""

    code: grpc.StatusCode
    message: str = ""
    responses: list[Message] = field(default_factory=list)
    in_band: list[str] = field(default_factory=list)  # OIP stream error messages


def send(channel: grpc.Channel, case: Case) -> Answer:
    stub = (
        tlserve_pb2_grpc.InferenceStub(channel)
        if case.rpc in TASK_RPCS
        else grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
    )
    method = getattr(stub, case.rpc)
    answer = Answer(Code.OK)
    try:
        if case.rpc in STREAMS:
            for response in method(iter(case.requests), metadata=case.metadata, timeout=case.timeout):
                answer.responses.append(response)
                if case.rpc == "ModelStreamInfer" and response.error_message:
                    answer.in_band.append(response.error_message)
        else:
            answer.responses.append(method(case.requests[0], metadata=case.metadata, timeout=case.timeout))
    except grpc.RpcError as exc:
        answer.code, answer.message = exc.code(), exc.details() or ""
    return answer


def caller_strings(case: Case) -> list[str]:
    """Every string the caller made up that is longer than a message may quote."""
    found: list[str] = [v for _, v in case.metadata if isinstance(v, str) and len(v) > MAX_ECHO]

    def walk(message: Message) -> None:
        for descriptor, value in message.ListFields():
            items = value.values() if _is_map(descriptor) else value if descriptor.is_repeated else [value]
            if _is_map(descriptor):
                found.extend(k for k in value if isinstance(k, str) and len(k) > MAX_ECHO)
            for item in items:
                if isinstance(item, Message):
                    walk(item)
                elif isinstance(item, str) and len(item) > MAX_ECHO:
                    found.append(item)

    for request in case.requests:
        walk(request)
    return found


def message_problems(message: str, case: Case, target: Target, where: str) -> list[str]:
    out = []
    if len(message) > MAX_MESSAGE:
        out.append(f"{where}: message of {len(message)} chars (limit {MAX_MESSAGE}): {brief_value(message, 200)}")
    out += [
        f"{where}: message shows {mark!r}: {brief_value(message, 200)}" for mark in TRACEBACK_MARKS if mark in message
    ]
    out += [f"{where}: message shows the server path {s!r}" for s in target.secrets if s in message]
    if "metadata size exceeds" in message:  # what the client's gRPC says instead of a status too big to take
        out.append(f"{where}: the server's status message was too long for the client: {brief_value(message, 200)}")
    for text in caller_strings(case):
        windows = {text[i : i + MAX_ECHO + 1] for i in (0, (len(text) - MAX_ECHO) // 2, len(text) - MAX_ECHO - 1)}
        if any(w in message for w in windows):
            out.append(f"{where}: message echoes over {MAX_ECHO} chars of a {len(text)}-char caller string")
            break
    return out


def problems(case: Case, answer: Answer, target: Target) -> list[str]:
    """Everything wrong with ``answer`` as the answer to a caller's (possible) mistake."""
    out = []
    if answer.code not in EXPECTED:
        out.append(f"{case.rpc}: status {answer.code.name}: {brief_value(answer.message, 300)}")
    out += message_problems(answer.message, case, target, f"{case.rpc} status")
    for message in answer.in_band:
        if message == INTERNAL_MESSAGE:
            out.append(f"{case.rpc}: in-band {INTERNAL_MESSAGE!r} (the server met an exception it did not expect)")
        out += message_problems(message, case, target, f"{case.rpc} in-band error")
    if case.rpc in STREAMS and len(answer.responses) > len(case.requests):
        out.append(f"{case.rpc}: {len(answer.responses)} responses to {len(case.requests)} requests")
    if case.rpc == "ModelStreamInfer" and answer.code == Code.OK and len(answer.responses) != len(case.requests):
        out.append(f"ModelStreamInfer: {len(answer.responses)} answers to {len(case.requests)} requests")
    return out


def codes_of(case: Case, answer: Answer) -> list[str]:
    """What to tally for this call: the status, and each in-band stream error as ERROR(in-band)."""
    return [answer.code.name] + [
        "INTERNAL(in-band)" if message == INTERNAL_MESSAGE else "ERROR(in-band)" for message in answer.in_band
    ]


def rss_bytes(pid: int | str = "self", field_name: str = "VmRSS") -> int:
    """Resident set size (or, with ``VmHWM``, its peak) of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field_name} in /proc/{pid}/status")


class Fuzzer:
    """Sends cases to one live server and keeps the tally; ``check`` raises on any problem."""

    def __init__(self, channel: grpc.Channel, target: Target, rss: Callable[[], int], rss_bound: int) -> None:
        self.channel = channel
        self.target = target
        self.rss = rss  # the serving process's resident set size now, in bytes
        self.rss_bound = rss_bound
        self.rss_start = rss()
        self.rss_peak = self.rss_start
        self.calls: Counter[str] = Counter()  # per RPC
        self.tried: Counter[str] = Counter()  # requests per RPC (each message of a stream)
        self.codes: Counter[tuple[str, str]] = Counter()
        self.health_max = 0.0
        self._health = health_pb2_grpc.HealthStub(channel)

    def health_problems(self) -> list[str]:
        out = []
        for service in self.target.health_services:
            started = time.perf_counter()
            try:
                status = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status
            except grpc.RpcError as exc:
                out.append(f"health {service!r}: {exc.code().name} {exc.details()}")
                continue
            finally:
                self.health_max = max(self.health_max, time.perf_counter() - started)
            if status != health_pb2.HealthCheckResponse.SERVING:
                out.append(f"health {service!r}: {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")
        return out

    def run(self, case: Case) -> tuple[Answer, list[str]]:
        """Send ``case``; the answer and every problem with it, with health and RSS afterwards."""
        answer = send(self.channel, case)
        self.calls[case.rpc] += 1
        self.tried[case.rpc] += len(case.requests)
        for code in codes_of(case, answer):
            self.codes[(case.rpc, code)] += 1
        found = problems(case, answer, self.target) + self.health_problems()
        rss = self.rss()
        self.rss_peak = max(self.rss_peak, rss)
        if rss > self.rss_bound:
            found.append(f"RSS {rss / 2**20:.0f} MiB over the bound of {self.rss_bound / 2**20:.0f} MiB")
        return answer, found

    def check(self, case: Case) -> Answer:
        answer, found = self.run(case)
        if found:
            raise AssertionError("\n".join(found))
        return answer


def groups(seeds: Seeds, target: Target, reach: Reach = MAIN) -> dict[str, st.SearchStrategy[Case]]:
    """One strategy per RPC group, keyed as :data:`SHARES`."""
    return {
        "classify": classify_cases(seeds, target, reach),
        "task stream": task_stream_cases(seeds, target, reach),
        "lookups": lookup_cases(target, reach),
        "infer": infer_cases(seeds, target, reach),
        "oip stream": oip_stream_cases(seeds, target, reach),
    }


def mixed(strategies: dict[str, st.SearchStrategy[Case]]) -> st.SearchStrategy[Case]:
    """A case of any group, each group drawn with its weight in :data:`SHARES`."""
    names = [name for name, share in SHARES.items() for _ in range(round(share * 100))]
    return st.sampled_from(names).flatmap(strategies.__getitem__)
