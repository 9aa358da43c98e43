"""Transfer learning vs training from scratch on Fashion-MNIST, at 10/50/200 images per class.

Pretrained MobileNetV2 (IMAGENET1K_V1) with feature-extract, two-phase and finetune against the
same architecture from scratch, plus what `--strategy auto` chooses (and reaches) at each size.
Every run goes through the real trainer (tlserve.trainer.train.run) on PNG ImageFolder trees cut
from Debian's dataset-fashion-mnist: n train images per class, a disjoint validation set of 10
per class (model selection), and one fixed test subset (100 per class of the official test set).

    OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/python benchmarks/experiment_strategies.py \\
        --json /tmp/experiment.json > /tmp/experiment.log 2>&1

Results are cached in the JSON file, so an interrupted grid continues where it stopped.
Prints a Markdown table of mean +- std test accuracy over the seeds.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

SOURCE = Path("/usr/share/datasets/fashion-mnist")
LABELS = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot")
VAL_PER_CLASS = 10
STRATEGIES = ("two-phase", "auto", "feature-extract", "finetune", "scratch")  # the order runs go in
TABLE_ORDER = ("feature-extract", "two-phase", "finetune", "scratch", "auto")


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_arrays() -> dict[str, np.ndarray]:
    return {
        "train_x": read_idx(SOURCE / "train-images-idx3-ubyte.gz"),
        "train_y": read_idx(SOURCE / "train-labels-idx1-ubyte.gz"),
        "test_x": read_idx(SOURCE / "t10k-images-idx3-ubyte.gz"),
        "test_y": read_idx(SOURCE / "t10k-labels-idx1-ubyte.gz"),
    }


def per_class_indices(labels: np.ndarray, n: int, rng: np.random.Generator, exclude=frozenset()) -> list[int]:
    chosen = []
    for c in range(len(LABELS)):
        pool = [i for i in np.flatnonzero(labels == c) if i not in exclude]
        chosen += [int(i) for i in rng.choice(pool, size=n, replace=False)]
    return chosen


def write_split(root: Path, images: np.ndarray, labels: np.ndarray, indices: list[int]) -> None:
    from PIL import Image

    for label in LABELS:
        (root / label).mkdir(parents=True, exist_ok=True)
    for i in indices:
        Image.fromarray(images[i]).save(root / LABELS[labels[i]] / f"{i:05d}.png")


def make_dataset(work: Path, per_class: int, seed: int, arrays: dict[str, np.ndarray]) -> Path:
    root = work / f"data-{per_class}-{seed}"
    if (root / "done").exists():
        return root
    rng = np.random.default_rng(seed)
    train = per_class_indices(arrays["train_y"], per_class, rng)
    val = per_class_indices(arrays["train_y"], VAL_PER_CLASS, rng, exclude=frozenset(train))
    test = per_class_indices(arrays["test_y"], 100, np.random.default_rng(12345))  # the same for every run
    write_split(root / "train", arrays["train_x"], arrays["train_y"], train)
    write_split(root / "val", arrays["train_x"], arrays["train_y"], val)
    write_split(root / "test", arrays["test_x"], arrays["test_y"], test)
    (root / "done").touch()
    return root


def schedule(per_class: int) -> dict:
    """Epochs and batch size per data size: every run takes roughly 70-100 optimiser steps."""
    if per_class <= 10:
        return {"epochs": 10, "head_epochs": 4, "batch_size": 16}
    if per_class <= 50:
        return {"epochs": 6, "head_epochs": 2, "batch_size": 32}
    return {"epochs": 3, "head_epochs": 1, "batch_size": 64}


def run_one(data: Path, out: Path, strategy: str, seed: int, per_class: int, image_size: int) -> dict:
    from tlserve.trainer.config import TrainConfig
    from tlserve.trainer.train import run

    cfg = TrainConfig(
        data=str(data),
        out=str(out),
        name="fashion",
        strategy=strategy,
        seed=seed,
        image_size=image_size,
        progress="off",
        threads=2,
        **schedule(per_class),
    )
    started = time.perf_counter()
    summary = run(cfg)
    ckpt_auto = {}
    if strategy == "auto":
        from tlserve.trainer import checkpoint

        prov = checkpoint.load(out / "checkpoint.pt").manifest.provenance
        keys = ("choice", "scenario", "holdout", "probe_accuracy", "two_phase_accuracy", "probe_only", "two_phase_only")
        ckpt_auto = {k: prov["auto"].get(k) for k in (*keys, "z")}
    return {
        "test_accuracy": summary["test_accuracy"],
        "seconds": round(time.perf_counter() - started, 1),
        "chosen": summary["strategy"],
        **ckpt_auto,
    }


def mean_of(results: dict, strategy: str, n: int, seeds: list[int]) -> tuple[list[float], float | None]:
    accs = [results[k]["test_accuracy"] for s in seeds if (k := f"{strategy}/{n}/{s}") in results]
    return accs, (statistics.mean(accs) if accs else None)


def table(results: dict, sizes: list[int], seeds: list[int]) -> str:
    head = "| strategy | " + " | ".join(f"{n}/class" for n in sizes) + " |"
    lines = [head, "|---|" + "---:|" * len(sizes)]
    for strategy in TABLE_ORDER:
        cells = []
        for n in sizes:
            accs, mean = mean_of(results, strategy, n, seeds)
            if mean is None:
                cells.append("–")
                continue
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            cells.append(f"{mean:.3f} ± {std:.3f}" + ("" if len(accs) == len(seeds) else f" (n={len(accs)})"))
        name = "auto (its choice)" if strategy == "auto" else strategy
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    choices, gaps = [], []
    for n in sizes:
        picked = [results[k]["chosen"] for s in seeds if (k := f"auto/{n}/{s}") in results]
        choices.append(", ".join(f"{c} x{picked.count(c)}" for c in sorted(set(picked))) or "–")
        fixed = {s: m for s in TABLE_ORDER[:-1] if (m := mean_of(results, s, n, seeds)[1]) is not None}
        auto = mean_of(results, "auto", n, seeds)[1]
        best = max(fixed, key=lambda s: fixed[s]) if fixed else None
        gaps.append(f"{auto - fixed[best]:+.3f} (vs {best})" if best and auto is not None else "–")
    lines.append("| auto chose | " + " | ".join(choices) + " |")
    lines.append("| auto − best fixed | " + " | ".join(gaps) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tlserve-experiment"))
    parser.add_argument("--json", type=Path, default=Path("/tmp/tlserve-experiment/results.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    args.work.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.json.read_text()) if args.json.exists() else {}
    arrays = load_arrays()
    for n in args.sizes:
        for seed in args.seeds:
            data = make_dataset(args.work, n, seed, arrays)
            for strategy in args.strategies:
                key = f"{strategy}/{n}/{seed}"
                if key in results:
                    continue
                results[key] = run_one(
                    data, args.work / "runs" / key.replace("/", "-"), strategy, seed, n, args.image_size
                )
                print(key, json.dumps(results[key]), flush=True)
                args.json.write_text(json.dumps(results, indent=1))
    print(
        f"\nFashion-MNIST, MobileNetV2, {args.image_size} px, test = 1000 images (100/class), "
        f"mean ± std over seeds {args.seeds}:\n"
    )
    print(table(results, args.sizes, args.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
