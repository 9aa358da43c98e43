"""What the clients return: plain dataclasses and numpy arrays, not protobuf."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    score: float  # the model's probability (calibrated when its manifest says so)


@dataclass(frozen=True)
class Classification:
    """The top-k predictions of one image, best first."""

    predictions: tuple[Prediction, ...]

    @property
    def top(self) -> Prediction:
        return self.predictions[0]


@dataclass(frozen=True)
class Classified:
    """A Classify answer: which model version answered, and one :class:`Classification` per image."""

    model: str
    version: str
    results: tuple[Classification, ...]

    @classmethod
    def from_pb(cls, response: pb.ClassifyResponse) -> Classified:
        return cls(
            response.model,
            response.version,
            tuple(
                Classification(tuple(Prediction(p.index, p.label, p.score) for p in r.predictions))
                for r in response.results
            ),
        )


@dataclass(frozen=True)
class Embedded:
    """An Embed answer: ``vectors`` is float32 [N, D], one row per image."""

    model: str
    version: str
    vectors: np.ndarray

    @classmethod
    def from_pb(cls, response: pb.EmbedResponse) -> Embedded:
        rows = [np.asarray(e.values, dtype=np.float32) for e in response.embeddings]
        vectors = np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32)
        return cls(response.model, response.version, vectors)
