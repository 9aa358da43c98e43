"""Run reports: metrics.jsonl, loss/accuracy curves, confusion matrix, per-class P/R/F1, calibration
(calibration.json, reliability.png), report.md."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_metrics(run_dir: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """One JSON line per epoch (rewritten whole, so a resumed run never repeats an epoch)."""
    write_text_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(dict(row)) + "\n" for row in history))


def plot_curves(run_dir: Path, history: Sequence[Mapping[str, Any]]) -> None:
    epochs = [row["epoch"] for row in history]
    for metric, filename in (("loss", "loss.png"), ("accuracy", "accuracy.png")):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for split in ("train", "val"):
            ax.plot(epochs, [row[f"{split}_{metric}"] for row in history], marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(f"train vs val {metric}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / filename)
        plt.close(fig)


def confusion_matrix(targets: Sequence[int], predictions: Sequence[int], num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(targets, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1)
    return matrix


def per_class_metrics(matrix: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Precision, recall, F1 and support per class, plus accuracy and macro averages."""
    tp = np.diag(matrix).astype(float)
    predicted, actual = matrix.sum(0).astype(float), matrix.sum(1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)
    classes = {
        label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for label, p, r, f, s in zip(labels, precision, recall, f1, actual)
    }
    return {
        "accuracy": float(tp.sum() / max(1.0, matrix.sum())),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "classes": classes,
    }


def per_class_markdown(metrics: Mapping[str, Any]) -> str:
    rows = ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for label, m in metrics["classes"].items():
        rows.append(f"| {label} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |")
    rows.append(
        f"| **macro** | {metrics['macro_precision']:.3f} | {metrics['macro_recall']:.3f} | "
        f"{metrics['macro_f1']:.3f} | {sum(m['support'] for m in metrics['classes'].values())} |"
    )
    return "\n".join(rows) + "\n"


def plot_confusion(path: Path, matrix: np.ndarray, labels: Sequence[str], title: str) -> None:
    size = max(5.0, 0.55 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", fontsize=8, color="white" if value > threshold else "black")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_class_report(run_dir: Path, targets, predictions, labels: Sequence[str], split: str) -> dict[str, Any]:
    """confusion_matrix.png, per_class.json and per_class.md for ``split``; returns the metrics."""
    matrix = confusion_matrix(targets, predictions, len(labels))
    metrics = per_class_metrics(matrix, labels)
    metrics["split"] = split
    metrics["confusion_matrix"] = matrix.tolist()
    plot_confusion(run_dir / "confusion_matrix.png", matrix, labels, f"confusion matrix ({split})")
    write_text_atomic(run_dir / "per_class.json", json.dumps(metrics, indent=2) + "\n")
    write_text_atomic(run_dir / "per_class.md", per_class_markdown(metrics))
    return metrics


def _reliability_panel(ax, rel, title: str) -> None:
    """Accuracy per confidence bin (filled) against the bin's mean confidence (hatched outline) and the
    diagonal; ECE is the gap between the two, weighted by each bin's share of images (the numbers on top)."""
    width = 1.0 / rel.bins
    centres = (np.arange(rel.bins) + 0.5) * width
    filled = rel.counts > 0
    x = centres[filled]
    ax.bar(x, rel.accuracy[filled], width=width, color="tab:blue", edgecolor="black", alpha=0.7, label="accuracy")
    ax.bar(
        x,
        rel.confidence[filled],
        width=width,
        fill=False,
        edgecolor="tab:red",
        hatch="//",
        linewidth=1,
        label="mean confidence",
    )
    for xi, top, count in zip(x, np.maximum(rel.accuracy, rel.confidence)[filled], rel.counts[filled]):
        ax.text(xi, min(top, 0.97) + 0.01, str(count), ha="center", va="bottom", fontsize=6)
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfectly calibrated")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("top-1 confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}: ECE {rel.ece:.4f}")
    ax.legend(loc="upper left", fontsize=8)


def plot_reliability(path: Path, before, after, split: str, temperature: float) -> None:
    """reliability.png: the reliability diagram of ``split`` before and after temperature scaling."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), dpi=100)
    _reliability_panel(axes[0], before, "raw softmax")
    _reliability_panel(axes[1], after, f"temperature {temperature:.3f}")
    fig.suptitle(f"reliability diagram ({split}, {before.bins} bins)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_calibration(run_dir: Path, report) -> None:
    """calibration.json and reliability.png of a :class:`~tlserve.trainer.calibration.CalibrationReport`."""
    write_text_atomic(run_dir / "calibration.json", json.dumps(report.to_dict(), indent=2) + "\n")
    plot_reliability(run_dir / "reliability.png", report.before, report.after, report.shown, report.temperature)


def calibration_markdown(calibration: Mapping[str, Any]) -> list[str]:
    """The report's calibration section, from ``CalibrationReport.to_dict()``."""
    lines = [
        "",
        "## Calibration",
        "",
        f"Temperature scaling, fitted on {calibration['fitted_on']}: T = {calibration['temperature']:.4f}. "
        f"Served probabilities are softmax(logits / T) (folded into the exported graph); top-1 is unchanged. "
        f"ECE: {calibration['bins']} equal-width bins of top-1 confidence.",
        "",
        "| split | images | top-1 | ECE before | ECE after | NLL before | NLL after |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for split, f in calibration["splits"].items():
        lines.append(
            f"| {split} | {f['images']} | {f['accuracy']:.4f} | {f['ece_before']:.4f} | {f['ece_after']:.4f} | "
            f"{f['nll_before']:.4f} | {f['nll_after']:.4f} |"
        )
    return [*lines, "", "![reliability diagram](reliability.png)"]


def write_report(
    run_dir: Path,
    summary: Mapping[str, Any],
    class_metrics: Mapping[str, Any],
    evidence_table: str | None = None,
    calibration: Mapping[str, Any] | None = None,
) -> None:
    """report.md: the run at a glance, linking the curves, the confusion matrix, the reliability diagram
    (when calibrated) and the tables."""
    lines = [f"# Training report: {summary['name']}", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in summary.items()]
    if evidence_table:
        lines += ["", "## Strategy choice (auto)", "", "```", evidence_table, "```"]
    if calibration:
        lines += calibration_markdown(calibration)
    lines += [
        "",
        "## Curves",
        "",
        "![loss](loss.png)",
        "",
        "![accuracy](accuracy.png)",
        "",
        f"## Per class ({class_metrics['split']})",
        "",
        per_class_markdown(class_metrics),
        "![confusion matrix](confusion_matrix.png)",
        "",
        "Files: `checkpoint.pt` (best), `last.pt` (resume), `metrics.jsonl`, `per_class.json`, "
        + ("`calibration.json`, " if calibration else "")
        + "`config.yaml`.",
        "",
    ]
    write_text_atomic(run_dir / "report.md", "\n".join(lines))
