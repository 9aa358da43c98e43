"""`tlserve serve` and `tlserve predict` (registered by tlserve.cli; no heavy imports at module level)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tlserve.server.settings import Settings


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this part's subcommands. Each sets `func` to a handler taking the parsed args."""
    from tlserve.server.settings import add_arguments

    serve = subparsers.add_parser(
        "serve",
        help="serve a model repository over gRPC (ONNX Runtime)",
        description="Serve every DIR/<name>/<version>/model.onnx (--repository DIR), or the one model in --model-dir "
        "DIR, over gRPC; flags also read env TLSERVE_<FLAG>.",
    )
    add_arguments(serve)
    serve.add_argument(
        "--print-memory-budget",
        action="store_true",
        help="print the worst-case memory for these flags and the repository's models, then exit",
    )
    serve.set_defaults(func=run_serve)

    predict = subparsers.add_parser("predict", help="classify images through a running server")
    predict.add_argument("files", nargs="*", help="image files (or use --images)")
    predict.add_argument("--target", default="localhost:50051", help="server HOST:PORT")
    predict.add_argument("--images", help="a folder of images, or an ImageFolder tree DIR/<label>/*.png")
    predict.add_argument("--top-k", type=int, default=3)
    predict.add_argument("--batch-size", type=int, default=32)
    predict.add_argument("--show", type=int, default=5, help="print this many predictions")
    predict.add_argument(
        "--wait-ready", type=float, default=0, metavar="SECONDS", help="wait until grpc.health.v1 reports SERVING"
    )
    predict.add_argument(
        "--timeout", type=float, default=60.0, metavar="SECONDS", help="deadline of each request (retries included)"
    )
    predict.add_argument("--model", default="", help="model name (default: the server's only model)")
    predict.add_argument("--version", default="", help="model version (default: newest ready)")
    add_channel_arguments(predict)
    predict.set_defaults(func=run_predict)


def add_channel_arguments(parser: argparse.ArgumentParser) -> None:
    """TLS, mTLS and token flags of a client command (see tlserve.client.ChannelSecurity)."""
    group = parser.add_argument_group("security")
    group.add_argument("--tls", action="store_true", help="use TLS with the system's CA roots")
    group.add_argument("--tls-ca", default="", metavar="PEM", help="CA the server's certificate chains to (TLS)")
    group.add_argument("--tls-cert", default="", metavar="PEM", help="client certificate chain, for mTLS")
    group.add_argument("--tls-key", default="", metavar="PEM", help="private key of --tls-cert")
    group.add_argument("--tls-server-name", default="", help="expect this name in the server's certificate")
    tokens = group.add_mutually_exclusive_group()
    tokens.add_argument("--token", default="", help="bearer token (visible in `ps`; prefer --token-file)")
    tokens.add_argument("--token-file", default="", help="file whose first non-comment line starts with the token")


def channel_security(args: argparse.Namespace):
    from tlserve.client import ChannelSecurity, read_token_file

    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    token = read_token_file(args.token_file) if args.token_file else args.token
    return ChannelSecurity(args.tls, args.tls_ca, args.tls_cert, args.tls_key, token, args.tls_server_name)


def run_serve(args: argparse.Namespace) -> int:
    import signal

    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # while the server's modules import; the lifecycle takes over
    from tlserve.server.app import serve
    from tlserve.server.settings import Settings

    try:
        settings = Settings.from_args(args)
    except ValueError as exc:
        print(f"tlserve serve: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "print_memory_budget", False):
        return print_memory_budget(settings)
    from tlserve.server.logs import use_log_format

    use_log_format(settings.log_format)
    return serve(settings)


def print_memory_budget(settings: Settings) -> int:
    from tlserve.server.budget import MODEL_FILE_BYTES, memory_budget
    from tlserve.server.model_dir import ModelDirError
    from tlserve.server.repository import RepositoryOptions

    options = RepositoryOptions.from_settings(settings)
    try:
        found = options.scan()
    except ModelDirError as exc:
        print(f"tlserve serve: {exc}", file=sys.stderr)
        return 2
    selected = [
        versions[v] for versions in found.models.values() for v in settings.version_policy.select(list(versions))
    ]
    models = max(1, len(selected))
    sizes = [size for version in selected for _, _, size, _ in version.signature]
    try:
        budget = memory_budget(settings, models, max(sizes, default=MODEL_FILE_BYTES))
    except ValueError as exc:
        print(f"tlserve serve: {exc}", file=sys.stderr)
        return 2
    print(f"worst-case memory for {models} model version(s) under {options.root}:")
    print(budget.table())
    return 0


def run_predict(args: argparse.Namespace) -> int:
    import grpc

    from tlserve.client import Client, find_images

    files = find_images([args.images] if args.images else []) + find_images(args.files)
    if not files:
        print("tlserve predict: no images given (FILES... or --images DIR)", file=sys.stderr)
        return 2
    try:
        client = Client(
            args.target, channel_security(args), timeout=args.timeout, model=args.model, version=args.version
        )
    except (OSError, ValueError) as exc:
        print(f"tlserve predict: {exc}", file=sys.stderr)
        return 2
    with client:
        if args.wait_ready:
            client.wait_ready(args.wait_ready, args.model or None)
        started = time.perf_counter()
        correct = labelled = shown = 0
        try:
            results = client.classify_many((f.path for f in files), args.top_k, args.batch_size)
            for file, result in zip(files, results):
                if shown < args.show:
                    guesses = ", ".join(f"{p.label} {p.score:.3f}" for p in result.predictions)
                    truth = f" (true: {file.label})" if file.label else ""
                    print(f"{file.path}: {guesses}{truth}")
                    shown += 1
                if file.label is not None:
                    labelled += 1
                    correct += result.top.label == file.label
        except grpc.RpcError as exc:
            print(f"tlserve predict: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        elapsed = time.perf_counter() - started
    if labelled:
        print(f"test accuracy via gRPC: {correct / labelled:.4f} (n={labelled})")
    print(f"predictions per second: {len(files) / elapsed:.1f} ({len(files)} images in {elapsed:.2f}s)")
    return 0
