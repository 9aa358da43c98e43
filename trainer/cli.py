"""`tlserve` subcommands of the trainer part (registered by tlserve.cli; no heavy imports at module level)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from tlserve.trainer.config import AUGMENT, BALANCE, CALIBRATE, OPTIMIZERS, STRATEGIES, TrainConfig

D = TrainConfig()  # only to show the defaults in --help


def help_with_default(dest: str, text: str | None) -> str | None:
    """``text`` plus TrainConfig's default for ``dest`` as "(default: X)", unless the text already names its
    default or there is none to name. (The parser's own defaults are all None, so argparse cannot show them.)"""
    value = getattr(D, dest, None)
    if value is None or value == "" or isinstance(value, bool) or "default" in (text or ""):
        return text
    return f"{text} (default: {value})" if text else f"default: {value}"


def _train_arguments(p: argparse.ArgumentParser) -> None:
    """Every option defaults to None: unset options fall back to --config, then to TrainConfig."""

    def opt(*flags: str, help: str | None = None, **kwargs: Any) -> None:
        dest = kwargs.get("dest") or flags[0].lstrip("-").replace("-", "_")
        p.add_argument(*flags, help=help_with_default(dest, help), **kwargs)

    opt("--data", help="ImageFolder root: train/ and val/ (optional test/), or one folder of class folders to split")
    opt("--out", help="run directory (checkpoint.pt, last.pt, metrics, curves, reports)")
    opt("--config", dest="config_file", metavar="RUN.yaml", help="YAML with any of these options; flags override it")
    opt("--name", help="model name in the manifest (default: the data folder's name)")
    opt("--arch", help="any torchvision classification model")
    opt(
        "--weights",
        help="DEFAULT, a torchvision enum name (IMAGENET1K_V1), none, or a file (state_dict or tlserve checkpoint)",
    )
    opt("--strategy", choices=STRATEGIES, help="transfer-learning strategy")
    opt("--unfreeze", type=int, help="partial: number of top backbone blocks to train")
    opt("--head", help="linear or mlp:512,512")
    opt("--dropout", type=float, help="dropout in the head")
    opt("--image-size", type=int, help="input size in px (default: the weights' own, 224 for ImageNet weights)")
    opt(
        "--resize-size",
        type=int,
        help="resize the shorter side to this before the centre crop (default: the weights' resize/crop ratio)",
    )
    opt("--val-fraction", type=float, help="held out for validation when there is no val/ folder")
    opt("--test-fraction", type=float, help="held out for test when DATA is one folder")
    opt("--balance", choices=BALANCE, help="class imbalance: sampler, loss weights, or none")
    opt("--augment", choices=AUGMENT, help="augmentation preset")
    opt("--max-per-class", type=int, help="use at most this many training images per class")
    opt("--workers", type=int, help="DataLoader workers (default: 0 on <= 2 CPUs, else up to 8)")
    opt("--epochs", type=int, help="total epochs")
    opt("--head-epochs", type=int, help="two-phase: head-only epochs first")
    opt("--batch-size", type=int, help="images per batch (per process under torchrun)")
    opt("--optimizer", choices=OPTIMIZERS, help="adamw, or sgd with Nesterov momentum")
    opt("--lr", type=float, help="learning rate of the head / first phase")
    opt("--finetune-lr", type=float, help="two-phase: LR once the backbone is unfrozen")
    opt("--backbone-lr-mult", type=float, help="backbone LR = head LR x this")
    opt("--weight-decay", type=float, help="weight decay")
    opt("--warmup-epochs", type=float, help="linear LR warm-up, in epochs, at the start of each phase")
    opt("--label-smoothing", type=float, help="label smoothing of the training loss")
    opt("--grad-clip", type=float, help="max gradient norm (0 = off)")
    opt("--ema", type=float, help="EMA decay of the weights, e.g. 0.999 (default: off)")
    opt(
        "--amp",
        choices=("auto", "bf16", "fp16", "off"),
        help="mixed precision on CUDA (auto: bf16 where supported, else fp16)",
    )
    opt(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last on CUDA (default: on)",
    )
    opt("--patience", type=int, help="early stopping: epochs without val improvement (default: off)")
    opt("--seed", type=int, help="seed of the split, the shuffles and the augmentations")
    opt("--threads", type=int, help="torch CPU threads (default: CPUs / processes)")
    opt("--device", choices=("auto", "cpu", "cuda"), help="auto: CUDA when there is one")
    opt("--resume", action="store_true", default=None, help="continue from OUT/last.pt")
    opt(
        "--auto-epochs",
        type=int,
        help="auto: epochs of the two-phase rehearsal (default: the run's own --epochs/--head-epochs)",
    )
    opt("--auto-margin", type=float, help="auto: the probe must beat the rehearsal by more than this")
    opt(
        "--calibrate",
        choices=CALIBRATE,
        help="after training: fit a softmax temperature on val (folded into the exported graph), or off",
    )
    opt("--progress", choices=("auto", "on", "off"), help="tqdm bars (auto: on a terminal)")


def _train(args: argparse.Namespace) -> int:
    # Idle OpenMP threads sleep instead of spinning: on a shared or busy CPU, spinning threads
    # slowed training several-fold here. Must be set before torch loads; an explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from tlserve.trainer.config import resolve
    from tlserve.trainer.torchfile import CheckpointError
    from tlserve.trainer.train import run

    cfg = resolve(vars(args), args.config_file)
    if not cfg.data or not cfg.out:
        raise SystemExit("tlserve train: --data and --out are required (on the command line or in --config)")
    try:
        summary = run(cfg)
    except CheckpointError as exc:  # --weights FILE or --resume's last.pt refused
        print(f"tlserve train: {exc}")
        return 1
    if summary.get("auto_table"):
        print("auto strategy, the evidence:\n" + summary.pop("auto_table"))
    for key, value in summary.items():
        print(f"{key:>15}: {value}")
    if summary:
        print(where(Path(cfg.out)))
    return 0


def where(run: Path) -> str:
    """The lines that end `tlserve train`: where the report, the curves and the checkpoint are."""
    lines = [
        f"run directory: {run}",
        f"report: {run / 'report.md'}",
        f"curves: {run / 'loss.png'}, {run / 'accuracy.png'}",
    ]
    if (run / "reliability.png").is_file():
        lines.append(f"reliability diagram: {run / 'reliability.png'}")
    lines.append(f"checkpoint: {run / 'checkpoint.pt'} (export it with: tlserve export {run})")
    return "\n".join(lines)


def _demo_data(args: argparse.Namespace) -> int:
    from tlserve.trainer.demo_data import write_image_folder

    counts = write_image_folder(args.out_dir)
    print(f"demo data in {args.out_dir}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this part's subcommands. Each sets `func` to a handler taking the parsed args."""
    train = subparsers.add_parser("train", help="fine-tune a torchvision backbone on an image folder")
    _train_arguments(train)
    train.set_defaults(func=_train)
    demo = subparsers.add_parser("demo-data", help="write the embedded Fashion-MNIST subset as an ImageFolder tree")
    demo.add_argument("out_dir", help="OUT_DIR/{train,val,test}/<label>/<n>.png")
    demo.set_defaults(func=_demo_data)
