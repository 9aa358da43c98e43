"""The model manifest: the one contract between trainer, export and server (stdlib only).

The trainer builds it from the same values that build its eval transform, export writes it
into the ONNX file's ``metadata_props`` under :data:`METADATA_KEY` (and a ``manifest.json``
sidecar), and the server reads it back and checks it against the graph before serving.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1
METADATA_KEY = "tlserve.manifest"
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
INPUT_DTYPES = ("uint8", "float32", "float16")
PRECISIONS = ("fp32", "fp16", "int8")
CALIBRATION_METHODS = ("temperature",)
BASELINE_QUANTILES = ("0.05", "0.1", "0.25", "0.5", "0.75", "0.9", "0.95")  # what export writes
SHARE_TOLERANCE = 1e-3  # class shares are rounded: their sum may miss 1 by this much


class ManifestError(ValueError):
    """The manifest is missing, malformed, or disagrees with the graph it describes."""


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the graph's input: the eval transform, written down.

    Resize the shorter side to ``resize_size`` with ``interpolation``, centre-crop to
    ``input_size`` x ``input_size``, convert to RGB, lay out as NCHW. With
    ``normalize_in_graph`` the graph takes ``input_dtype`` uint8 0-255 and applies
    ``/255`` and ``(x - mean) / std`` itself; otherwise the caller must do it.
    """

    input_size: int
    resize_size: int
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    input_dtype: str = "uint8"
    normalize_in_graph: bool = True
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.input_size <= 0 or self.resize_size < self.input_size:
            raise ManifestError(
                f"preprocessing needs 0 < input_size <= resize_size, got {self.input_size}/{self.resize_size}"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise ManifestError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.input_dtype not in INPUT_DTYPES:
            raise ManifestError(f"input_dtype must be one of {INPUT_DTYPES}, got {self.input_dtype!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ManifestError("mean and std need three values each, std > 0")
        if self.layout != "NCHW":
            raise ManifestError(f"only NCHW layout is supported, got {self.layout!r}")


@dataclass(frozen=True)
class Outputs:
    """Names of the graph's outputs."""

    probabilities: str = "probabilities"
    embedding: str | None = "embedding"
    logits: str | None = None


@dataclass(frozen=True)
class Calibration:
    """How the served ``probabilities`` were calibrated: ``softmax(logits / temperature)``.

    The temperature was fitted on the validation split; ``ece_before``/``ece_after`` (expected
    calibration error, ``bins`` equal-width bins of top-1 confidence) and the NLLs are measured on
    ``split`` (the test split when the run has one). The exported graph has it folded in.
    """

    temperature: float
    method: str = "temperature"
    split: str = "val"
    bins: int = 15
    ece_before: float | None = None
    ece_after: float | None = None
    nll_before: float | None = None
    nll_after: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "temperature", float(self.temperature))
        if self.method not in CALIBRATION_METHODS:
            raise ManifestError(f"calibration method must be one of {CALIBRATION_METHODS}, got {self.method!r}")
        if not 0.0 < self.temperature < float("inf"):
            raise ManifestError(f"calibration temperature must be a finite number > 0, got {self.temperature}")


@dataclass(frozen=True)
class Baseline:
    """What the published graph predicts on the validation split, for watching drift in production.

    ``quantiles`` maps a quantile ("0.1") to the top-1 confidence (the highest probability of an image)
    at that quantile over ``images`` validation images; ``class_share`` maps every label to the share of
    those images predicted as it. ``split`` names the images (e.g. "flowers (val)").
    """

    images: int
    quantiles: Mapping[str, float]
    class_share: Mapping[str, float]
    split: str = "val"

    def __post_init__(self) -> None:
        object.__setattr__(self, "quantiles", {str(q): float(v) for q, v in dict(self.quantiles).items()})
        object.__setattr__(self, "class_share", {str(k): float(v) for k, v in dict(self.class_share).items()})
        if not isinstance(self.images, int) or self.images < 1:
            raise ManifestError(f"baseline images must be a positive integer, got {self.images!r}")
        levels = sorted((_quantile_level(q), v) for q, v in self.quantiles.items())
        if not levels:
            raise ManifestError("baseline quantiles must not be empty")
        values = [v for _, v in levels]
        if any(not 0.0 <= v <= 1.0 for v in values) or values != sorted(values):
            raise ManifestError(f"baseline confidences must lie in [0, 1] and grow with the quantile, got {values}")
        shares = list(self.class_share.values())
        if any(not 0.0 <= v <= 1.0 for v in shares) or abs(sum(shares) - 1.0) > SHARE_TOLERANCE:
            raise ManifestError("baseline class shares must lie in [0, 1] and sum to 1")


def _quantile_level(text: str) -> float:
    try:
        level = float(text)
    except ValueError:
        level = float("nan")
    if not 0.0 < level < 1.0:
        raise ManifestError(f"baseline quantile names must be numbers in (0, 1) such as '0.1', got {text!r}")
    return level


@dataclass(frozen=True)
class Manifest:
    """Everything a server needs to know about one model file."""

    name: str
    version: str
    architecture: str
    labels: tuple[str, ...]
    preprocessing: Preprocessing
    input_name: str = "images"
    outputs: Outputs = field(default_factory=Outputs)
    precision: str = "fp32"
    provenance: Mapping[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    calibration: Calibration | None = None  # optional: absent in uncalibrated and older model files
    baseline: Baseline | None = None  # optional: absent without labelled validation images and in older files

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(str(label) for label in self.labels))
        object.__setattr__(self, "version", str(self.version))
        object.__setattr__(self, "provenance", dict(self.provenance))
        if self.schema_version != SCHEMA_VERSION:
            raise ManifestError(
                f"manifest schema_version {self.schema_version} is not supported (this build reads {SCHEMA_VERSION})"
            )
        if not self.name or "/" in self.name:
            raise ManifestError(f"model name must be non-empty and contain no '/', got {self.name!r}")
        if len(self.labels) < 2:
            raise ManifestError(f"a classifier needs at least 2 labels, got {len(self.labels)}")
        if len(set(self.labels)) != len(self.labels):
            raise ManifestError("labels must be unique")
        if self.precision not in PRECISIONS:
            raise ManifestError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.baseline is not None and set(self.baseline.class_share) != set(self.labels):
            raise ManifestError("baseline class shares must name every label, and only labels")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain data; ``calibration`` and ``baseline`` only when there is one, so older readers see no change."""
        body = dataclasses.asdict(self)
        for optional in ("calibration", "baseline"):
            if body[optional] is None:
                del body[optional]
        return body

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        try:
            body = dict(data)
            body["preprocessing"] = Preprocessing(**body["preprocessing"])
            body["outputs"] = Outputs(**body.get("outputs", {}))
            if body.get("calibration") is not None:
                body["calibration"] = Calibration(**body["calibration"])
            if body.get("baseline") is not None:
                body["baseline"] = Baseline(**body["baseline"])
            return cls(**body)
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"malformed manifest: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"manifest is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ManifestError("manifest JSON must be an object")
        return cls.from_dict(data)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> Manifest:
        """Read the manifest from an ONNX model's custom metadata map."""
        if METADATA_KEY not in metadata:
            raise ManifestError(f"model has no {METADATA_KEY!r} metadata: was it exported by `tlserve export`?")
        return cls.from_json(metadata[METADATA_KEY])

    def check_graph(
        self, inputs: Sequence[tuple[str, Sequence[Any], str]], outputs: Sequence[tuple[str, Sequence[Any]]]
    ) -> None:
        """Check the manifest against a graph's signature, raising :class:`ManifestError` on mismatch.

        ``inputs`` holds ``(name, shape, dtype)`` with dtype as a numpy-style name ("uint8",
        "float32", ...); ``outputs`` holds ``(name, shape)``. Symbolic dimensions may be
        strings or None.
        """
        by_name = {name: (shape, dtype) for name, shape, dtype in inputs}
        if self.input_name not in by_name:
            raise ManifestError(f"graph has no input {self.input_name!r} (inputs: {sorted(by_name)})")
        shape, dtype = by_name[self.input_name]
        pre = self.preprocessing
        if dtype != pre.input_dtype:
            raise ManifestError(f"input {self.input_name!r} is {dtype}, manifest says {pre.input_dtype}")
        if shape and isinstance(shape[0], int):
            raise ManifestError(
                f"input {self.input_name!r} has a fixed batch dimension {shape[0]}: the server batches "
                "requests, so export with a dynamic batch dimension"
            )
        expected = (None, 3, pre.input_size, pre.input_size)
        if len(shape) != 4 or any(isinstance(s, int) and e is not None and s != e for s, e in zip(shape, expected)):
            raise ManifestError(
                f"input {self.input_name!r} has shape {list(shape)}, manifest says [N, 3, "
                f"{pre.input_size}, {pre.input_size}]"
            )
        out = dict(outputs)
        wanted = {
            self.outputs.probabilities: self.num_classes,
            self.outputs.logits: self.num_classes,
            self.outputs.embedding: None,
        }
        for name, width in wanted.items():
            if name is None:
                continue
            if name not in out:
                raise ManifestError(f"graph has no output {name!r} (outputs: {sorted(out)})")
            oshape = out[name]
            if width is not None and (len(oshape) != 2 or (isinstance(oshape[1], int) and oshape[1] != width)):
                raise ManifestError(f"output {name!r} has shape {list(oshape)}, but the manifest has {width} labels")
