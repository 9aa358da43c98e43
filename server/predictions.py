"""The prediction metrics of one served version: top-1 confidence, top-1 label counts, the manifest's baseline.

The metric children are resolved once, when the version starts serving (:meth:`PredictionMetrics.attach`),
so recording a batch costs an argmax and one histogram observation per image, with no label lookups.
Per-label series exist only while the model has at most ``max_label_metrics`` labels (bounded cardinality).
"""

from __future__ import annotations

import numpy as np
from prometheus_client import Counter, Histogram

from tlserve.manifest import Manifest
from tlserve.server.metrics import Metrics


class PredictionMetrics:
    """What one version predicts, as Prometheus sees it; the repository attaches and detaches it."""

    def __init__(self, metrics: Metrics, name: str, version: str, manifest: Manifest, max_label_metrics: int) -> None:
        self._metrics = metrics
        self._key = (name, version)
        self._manifest = manifest
        self.per_label = manifest.num_classes <= max_label_metrics
        self._confidence: Histogram | None = None
        self._labels: list[Counter] = []

    def attach(self) -> None:
        """Create this version's series (zero counts, the baseline gauges) and keep their children."""
        m, key = self._metrics, self._key
        self._confidence = m.prediction_confidence.labels(*key)
        if self.per_label:
            self._labels = [m.predictions.labels(*key, label) for label in self._manifest.labels]
        baseline = self._manifest.baseline
        if baseline is None:
            return
        for quantile, value in baseline.quantiles.items():
            m.confidence_baseline.labels(*key, quantile).set(value)
        if self.per_label:
            for label, share in baseline.class_share.items():
                m.prediction_share_baseline.labels(*key, label).set(share)

    def detach(self) -> None:
        """Remove this version's series; predictions recorded from now on are dropped."""
        m, key = self._metrics, self._key
        self._confidence, self._labels = None, []
        m.prediction_confidence.remove(*key)
        baseline = self._manifest.baseline
        for quantile in baseline.quantiles if baseline else ():
            m.confidence_baseline.remove(*key, quantile)
        if self.per_label:
            for label in self._manifest.labels:
                m.predictions.remove(*key, label)
                m.prediction_share_baseline.remove(*key, label)

    def record(self, probabilities: np.ndarray) -> None:
        """Count the top-1 of each row of [N, C] ``probabilities`` (as served: calibrated when the model is)."""
        confidence = self._confidence
        if confidence is None or probabilities.ndim != 2 or not probabilities.shape[0]:
            return
        top = probabilities.argmax(axis=1)
        for value in np.take_along_axis(probabilities, top[:, None], axis=1).ravel().tolist():
            confidence.observe(value)
        if self._labels:
            counts = np.bincount(top, minlength=len(self._labels))
            for index in np.flatnonzero(counts).tolist():
                self._labels[index].inc(int(counts[index]))
