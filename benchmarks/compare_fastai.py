"""tlserve's default (two-phase) side by side with fastai's `vision_learner(dls, mobilenet_v2).fine_tune(n)`.

Same Fashion-MNIST splits as benchmarks/experiment_strategies.py (n train images per class, 10 per class
validation, one fixed 1000-image test set), the same torchvision MobileNetV2 with the same IMAGENET1K_V1 file
from the offline hub cache (checked tensor by tensor), the same input (resize 55, crop 48: random crop and
horizontal flip when training, centre crop otherwise), batch size and number of epochs: tlserve runs `two-phase`
with E epochs (H head-only), fastai runs `fine_tune(E - 1)` (its default `freeze_epochs=1`, so E epochs too).
Everything else is each library's default: fastai's one-cycle schedule, lr 2e-3 (x100 discriminative), Adam with
weight decay 0.01, its concat-pool/BN/dropout head, BatchNorm training in the frozen body, the last epoch kept;
tlserve's AdamW, warm-up + cosine, label smoothing 0.1, linear head, BN in inference mode after unfreezing, the
best validation epoch kept.

fastai runs in its own virtual environment (``--venv``), created on first use: a ``.pth`` file puts this
interpreter's site-packages (torch, torchvision, numpy, Pillow) on its path, and pip installs fastai
``--no-deps`` plus its light dependencies, so torch is not downloaded twice.

    OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/python benchmarks/compare_fastai.py \\
        --json /tmp/tlserve-experiment/results.json > /tmp/compare.log 2>&1

Results share the experiment grid's JSON cache (keys ``two-phase/N/SEED`` and ``fastai/N/SEED``), so the grid's
two-phase runs are reused and an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import site
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import experiment_strategies as grid  # noqa: E402

FASTAI = "fastai==2.8.12"
FASTAI_DEPS = (
    "fastcore>=2.2.22",
    "fastdownload>=0.0.8,<2",
    "fasttransform>=0.0.3",
    "fastprogress>=0.2.4",
    "plum-dispatch<2.10",
    "pandas",
    "scikit-learn",
    "requests",
    "cloudpickle",
)


def ensure_venv(venv: Path) -> Path:
    """The fastai interpreter: a venv that sees this interpreter's torch through a .pth file."""
    python = venv / "bin" / "python"
    if python.exists():
        if subprocess.run([python, "-c", "import fastai.vision.all"], capture_output=True).returncode == 0:
            return python
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], check=True)
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    import torch

    ours = [str(Path(torch.__file__).resolve().parents[1]), *site.getsitepackages()]
    (Path(purelib) / "zz_project_torch.pth").write_text("\n".join(dict.fromkeys(ours)) + "\n")
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "--no-deps", FASTAI], check=True)
    subprocess.run([*pip, *FASTAI_DEPS], check=True)
    return python


def fastai_worker(data: Path, seed: int, per_class: int, image_size: int, threads: int) -> dict:
    """One fastai run (inside the fastai venv): fine_tune with the grid's epochs and batch size."""
    import fastai
    import torch
    from fastai.vision.all import (
        FlipItem,
        ImageDataLoaders,
        RandomCrop,
        Resize,
        accuracy,
        default_split,
        get_image_files,
        imagenet_stats,
        model_meta,
        set_seed,
        vision_learner,
    )
    from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

    torch.set_num_threads(threads)
    set_seed(seed, reproducible=True)
    sched = grid.schedule(per_class)
    resize = max(image_size, round(image_size * 256 / 224))  # the trainer's ratio: 48 -> 55
    started = time.perf_counter()
    dls = ImageDataLoaders.from_folder(
        data,
        train="train",
        valid="val",
        item_tfms=[Resize(resize), RandomCrop(image_size), FlipItem(0.5)],
        bs=sched["batch_size"],
        num_workers=0,
    )
    # torchvision's MobileNetV2 is not in fastai's model_meta and has no pooling module, so the plain call raises
    # StopIteration finding where to cut (and vision_learner's own `cut=` argument is not passed on in 2.8.12).
    # fastai's documented remedy is a model_meta entry: cut off the classifier, body/head split, ImageNet stats
    # (so vision_learner adds the normalisation itself), and the weights by name (fastai's 'DEFAULT' would be V2).
    model_meta[mobilenet_v2] = {"cut": -1, "split": default_split, "stats": imagenet_stats, "weights": "IMAGENET1K_V1"}
    learn = vision_learner(dls, mobilenet_v2, metrics=accuracy)
    reference = MobileNet_V2_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    body = learn.model[0].state_dict()  # nn.Sequential(features): "0.<rest>" is torchvision's "features.<rest>"
    same = all(torch.equal(body[k], reference["features." + k.split(".", 1)[1]]) for k in body)
    if not same or len(body) != sum(k.startswith("features.") for k in reference):
        raise SystemExit("fastai's body is not torchvision's IMAGENET1K_V1 MobileNetV2")
    test = learn.dls.test_dl(get_image_files(data / "test"), with_labels=True)  # the valid pipeline: centre crop
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(sched["epochs"] - 1)
        epochs = 1 + learn.n_epoch  # fine_tune's frozen epoch and the unfrozen ones
        _, test_accuracy = learn.validate(dl=test)
    normalised = any(type(t).__name__ == "Normalize" for t in learn.dls.after_batch)
    return {
        "test_accuracy": round(float(test_accuracy), 4),
        "seconds": round(time.perf_counter() - started, 1),
        "fastai": fastai.__version__,
        "imagenet_normalised": normalised,
        "epochs": epochs,
    }


def table(results: dict, sizes: list[int], seeds: list[int]) -> str:
    lines = ["| data | tlserve two-phase | fastai fine_tune | difference | tlserve s/run | fastai s/run |"]
    lines.append("|---|---:|---:|---:|---:|---:|")
    for n in sizes:
        ours = [results[k] for s in seeds if (k := f"two-phase/{n}/{s}") in results]
        theirs = [results[k] for s in seeds if (k := f"fastai/{n}/{s}") in results]
        if not ours or not theirs:
            continue

        def cell(runs: list[dict]) -> str:
            accs = [r["test_accuracy"] for r in runs]
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            return f"{statistics.mean(accs):.3f} ± {std:.3f} (n={len(accs)})"

        diff = statistics.mean(r["test_accuracy"] for r in ours) - statistics.mean(r["test_accuracy"] for r in theirs)
        secs = [statistics.mean(r["seconds"] for r in runs) for runs in (ours, theirs)]
        lines.append(f"| {n}/class | {cell(ours)} | {cell(theirs)} | {diff:+.3f} | {secs[0]:.0f} | {secs[1]:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 200])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tlserve-experiment"))
    parser.add_argument("--json", type=Path, default=Path("/tmp/tlserve-experiment/results.json"))
    parser.add_argument("--venv", type=Path, default=Path("/tmp/tlserve-fastai-venv"))
    parser.add_argument("--fastai-worker", type=Path, help=argparse.SUPPRESS)  # internal: one run, in the venv
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--per-class", type=int, default=10, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.fastai_worker:
        print(json.dumps(fastai_worker(args.fastai_worker, args.seed, args.per_class, args.image_size, args.threads)))
        return 0
    python = ensure_venv(args.venv)
    args.work.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.json.read_text()) if args.json.exists() else {}
    arrays = None
    for n in args.sizes:
        for seed in args.seeds:
            data = args.work / f"data-{n}-{seed}"
            if not (data / "done").exists():
                arrays = arrays or grid.load_arrays()
                grid.make_dataset(args.work, n, seed, arrays)
            for key in (f"two-phase/{n}/{seed}", f"fastai/{n}/{seed}"):
                if key in results:
                    continue
                if key.startswith("two-phase"):
                    out = args.work / "runs" / key.replace("/", "-")
                    results[key] = grid.run_one(data, out, "two-phase", seed, n, args.image_size)
                else:
                    command = [python, "-W", "ignore", __file__, "--fastai-worker", str(data), "--seed", str(seed)]
                    command += ["--per-class", str(n), "--image-size", str(args.image_size)]
                    command += ["--threads", str(args.threads)]
                    done = subprocess.run(command, check=True, capture_output=True, text=True)
                    results[key] = json.loads(done.stdout.strip().splitlines()[-1])
                print(key, json.dumps(results[key]), flush=True)
                args.json.write_text(json.dumps(results, indent=1))
    print(f"\nFashion-MNIST, MobileNetV2 IMAGENET1K_V1, {args.image_size} px, 1000 test images, seeds {args.seeds}:\n")
    print(table(results, args.sizes, args.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
