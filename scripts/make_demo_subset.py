"""Regenerate trainer/demo_data/fashion_mnist_subset.npz from Debian's dataset-fashion-mnist.

    apt-get install -y dataset-fashion-mnist
    python scripts/make_demo_subset.py

A fixed-seed, class-balanced subset: train/val from the official training split, test from
the official test split, so the held-out images were never seen by anyone's training.
"""

import argparse
import gzip
from pathlib import Path

import numpy as np

SOURCE = Path("/usr/share/datasets/fashion-mnist")
LABELS = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def pick(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    return np.concatenate(
        [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(len(LABELS))]
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--val", type=int, default=50)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="trainer/demo_data/fashion_mnist_subset.npz")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    x_tr, y_tr = read_idx(SOURCE / "train-images-idx3-ubyte.gz"), read_idx(SOURCE / "train-labels-idx1-ubyte.gz")
    x_te, y_te = read_idx(SOURCE / "t10k-images-idx3-ubyte.gz"), read_idx(SOURCE / "t10k-labels-idx1-ubyte.gz")
    idx = pick(y_tr, args.train + args.val, rng).reshape(len(LABELS), -1)
    tr, va = idx[:, : args.train].ravel(), idx[:, args.train :].ravel()
    te = pick(y_te, args.test, rng)
    np.savez_compressed(
        args.out,
        labels=np.array(LABELS),
        train_x=x_tr[tr],
        train_y=y_tr[tr],
        val_x=x_tr[va],
        val_y=y_tr[va],
        test_x=x_te[te],
        test_y=y_te[te],
    )
    print(f"wrote {args.out}: {len(tr)} train, {len(va)} val, {len(te)} test")


if __name__ == "__main__":
    main()
