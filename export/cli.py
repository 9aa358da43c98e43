"""`tlserve` subcommands of the export part (registered by tlserve.cli; no heavy imports at module level)."""

from __future__ import annotations

import argparse


def _export(args: argparse.Namespace) -> int:
    from tlserve.export.api import export_checkpoint, export_pretrained
    from tlserve.export.inspect_model import calibration_line, describe
    from tlserve.export.publish import PublishError
    from tlserve.export.verify import VerificationError

    if bool(args.source) == bool(args.pretrained):
        raise SystemExit("tlserve export: give a run directory or checkpoint, or --pretrained ARCH (not both)")
    options = {
        "float_input": args.float_input,
        "outputs": args.outputs,
        "logits": args.logits,
        "data": args.data,
        "force": args.force,
        "optimized": args.optimized,
        "exporter": args.exporter,
        "opset": args.opset,
    }
    common = {"name": args.name, "version": args.version, "precision": args.precision, **options}
    try:
        if args.pretrained:
            path = export_pretrained(args.pretrained, args.repository, weights=args.weights, **common)
        else:
            path = export_checkpoint(args.source, args.repository, **common)
    except (VerificationError, PublishError, ValueError, FileNotFoundError) as exc:
        print(f"tlserve export: {exc}; nothing was published")
        return 1
    manifest = describe(path)["manifest"]
    for file_name, report in manifest.provenance["export"]["verification"].items():
        print(f"{file_name}: {report}")
    print(calibration_line(manifest))
    print(f"published {path}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from tlserve.export.inspect_model import describe, render
    from tlserve.manifest import ManifestError

    try:
        print(render(describe(args.model)))
    except ManifestError as exc:
        print(f"tlserve inspect: {args.model}: {exc}")
        return 1
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this part's subcommands. Each sets `func` to a handler taking the parsed args."""
    p = subparsers.add_parser(
        "export",
        help="export a run's checkpoint to a verified, self-describing ONNX version",
        description="Trace, verify against PyTorch and publish models/<name>/<version>/model.onnx",
    )
    p.add_argument("source", nargs="?", help="run directory (its checkpoint.pt) or checkpoint file")
    p.add_argument(
        "--pretrained",
        metavar="ARCH",
        help="export a stock torchvision ImageNet classifier instead (e.g. mobilenet_v2)",
    )
    p.add_argument(
        "--weights",
        default="DEFAULT",
        help="with --pretrained: the weights enum member (default: DEFAULT, or the one in the hub cache)",
    )
    p.add_argument("--repository", default="models", help="model repository root (default: models)")
    p.add_argument("--name", help="model name (default: the manifest's)")
    p.add_argument("--version", default="auto", help="version folder, or 'auto' for the next integer (default)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32", help="default: fp32")
    p.add_argument(
        "--float-input",
        action="store_true",
        help="float32 input the caller normalises, instead of uint8 normalised in the graph",
    )
    p.add_argument(
        "--outputs",
        default="probabilities,embedding",
        metavar="NAMES",
        help="graph outputs, comma-separated: probabilities[,embedding][,logits] (default: probabilities,embedding; "
        "probabilities alone makes a single-output model for generic OIP clients)",
    )
    p.add_argument("--logits", action="store_true", help="add a 'logits' output (the same as adding it to --outputs)")
    p.add_argument("--data", help="ImageFolder root for verification/calibration (default: the run's data)")
    p.add_argument("--force", action="store_true", help="publish int8 even when it fails the accuracy gate")
    p.add_argument("--optimized", action="store_true", help="also write an ORT-optimised copy (extended level)")
    p.add_argument(
        "--exporter",
        choices=("dynamo", "torchscript"),
        default="dynamo",
        help="torch.onnx exporter (default: dynamo, torch's supported one)",
    )
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, >= 17 (default: 18)")
    p.set_defaults(func=_export)
    i = subparsers.add_parser("inspect", help="print an exported model's manifest, inputs/outputs, opset and size")
    i.add_argument("model", help="an ONNX file made by tlserve export")
    i.set_defaults(func=_inspect)
