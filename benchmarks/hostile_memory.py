"""Memory and health under a hostile mix: does the server stay inside its memory budget and keep
answering health checks while callers send the most expensive requests its limits allow?

    python benchmarks/hostile_memory.py --repository models            # 30 s against the defaults
    python benchmarks/hostile_memory.py --repository models --seconds 10 --server-arg=--max-decode-bytes=100000000

Starts ``tlserve serve`` (default settings plus any ``--server-arg``, CPU, 127.0.0.1 only) in a
subprocess and, for ``--seconds``, runs these callers at once, each resending one pre-serialised
request as fast as it is answered:

- ``big PNGs``: as many blank PNGs just under ``--max-pixels`` as ``--max-request-pixels`` admits
  (each decodes to hundreds of MB: the decode budget's work);
- ``many PNGs``: ``--max-images`` such PNGs in one request (over the per-request pixel limit);
- ``typed max``: an OIP request with typed ``uint_contents`` for ``--max-images`` rows (converted
  off the event loop);
- ``typed huge``: an OIP request whose typed contents fill the message (refused before conversion);
- ``raw max``: an OIP request of raw bytes for ``--max-images`` rows;
- ``raw full`` (``--wide``, none by default): raw bytes filling the message (more rows than
  ``--max-images``: received, reserved and parsed, refused before conversion), from many callers at
  once: the received-messages and message-memory terms' work.

A sampler thread reads the server's RSS (psutil when installed, else /proc/PID/status) and times a
``grpc.health.v1`` check every ~100 ms. Prints the requests tried, the status codes seen per caller,
the peak RSS against ``memory_budget(settings)`` and the slowest health answer. Needs a model
repository (e.g. from ``make demo`` or ``tlserve export``).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import served
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from tlserve.cli import build_parser
from tlserve.manifest import Manifest
from tlserve.server.budget import MIB, memory_budget
from tlserve.server.pb.inference import messages_pb2 as oip
from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as task
from tlserve.server.settings import Settings

CLASSIFY = "/tlserve.v1.Inference/Classify"
INFER = "/inference.GRPCInferenceService/ModelInfer"


@dataclass
class Samples:
    rss: list[int] = field(default_factory=list)
    health: list[float] = field(default_factory=list)
    health_failures: Counter = field(default_factory=Counter)


def rss_bytes(pid: int) -> int:
    """The process's resident memory (0 once it has exited)."""
    try:
        import psutil  # type: ignore[import-untyped]

        return int(psutil.Process(pid).memory_info().rss)
    except ImportError:
        pass
    except Exception:  # psutil.NoSuchProcess
        return 0
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0)


def blank_png(pixels: int) -> bytes:
    side = math.isqrt(pixels)
    buf = io.BytesIO()
    Image.new("RGB", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


def the_model(repository: Path) -> tuple[str, Manifest]:
    model_file = sorted(repository.glob("*/*/model.onnx"))[0]
    manifest = Manifest.from_json((model_file.parent / "manifest.json").read_text())
    return model_file.parent.parent.name, manifest


def requests(settings: Settings, name: str, manifest: Manifest) -> dict[str, tuple[str, bytes]]:
    """Each caller's (method, serialised request)."""
    size = manifest.preprocessing.input_size
    png = blank_png(settings.max_pixels - 1)
    per_request = max(1, min(settings.max_images, settings.max_request_pixels // settings.max_pixels))
    big = task.ClassifyRequest(images=[task.Image(encoded=png)] * per_request)
    many = task.ClassifyRequest(images=[task.Image(encoded=png)] * settings.max_images)
    rows = np.random.default_rng(0).integers(0, 256, (settings.max_images, 3, size, size), dtype=np.uint8)
    typed_max = oip.ModelInferRequest(model_name=name)
    typed_max.inputs.add(name=manifest.input_name, datatype="UINT8", shape=rows.shape).contents.uint_contents.extend(
        rows.ravel().tolist()
    )
    huge_rows = int(settings.max_message_bytes * 0.95) // (3 * size * size)  # 1 byte per value: fills a message
    typed_huge = oip.ModelInferRequest(model_name=name)
    typed_huge.inputs.add(
        name=manifest.input_name, datatype="UINT8", shape=[huge_rows, 3, size, size]
    ).contents.uint_contents.extend([7] * (huge_rows * 3 * size * size))
    raw_max = oip.ModelInferRequest(model_name=name, raw_input_contents=[rows.tobytes()])
    raw_max.inputs.add(name=manifest.input_name, datatype="UINT8", shape=rows.shape)
    filling = int(settings.max_message_bytes * 0.95)
    small_int64 = oip.ModelInferRequest(model_name=name)
    small_int64.inputs.add(name=manifest.input_name, datatype="INT64", shape=[filling]).contents.int64_contents.extend(
        [1] * filling
    )
    full_rows = int(settings.max_message_bytes * 0.95) // (3 * size * size)
    raw_full = oip.ModelInferRequest(model_name=name, raw_input_contents=[bytes(full_rows * 3 * size * size)])
    raw_full.inputs.add(name=manifest.input_name, datatype="UINT8", shape=[full_rows, 3, size, size])
    return {
        # protobuf's own expansion, refused by the wire guard before parsing: 42x and 15x unguarded
        "empty inputs": (INFER, b"\x2a\x00" * (filling // 2)),
        "int64 1-byte": (INFER, small_int64.SerializeToString()),
        "big PNGs": (CLASSIFY, big.SerializeToString()),
        "many PNGs": (CLASSIFY, many.SerializeToString()),
        "typed max": (INFER, typed_max.SerializeToString()),
        "typed huge": (INFER, typed_huge.SerializeToString()),
        "raw max": (INFER, raw_max.SerializeToString()),
        "raw full": (INFER, raw_full.SerializeToString()),
    }


def start_server(repository: Path, server_args: list[str]) -> tuple[subprocess.Popen, str, Settings]:
    """The server (see served.py) and the settings its flags make, for the budget."""
    process, address, _ = served.start_server(repository, server_args, log_level="ERROR")
    argv = served.serve_argv(repository, 0, 0, server_args)
    return process, address, Settings.from_args(build_parser().parse_args(argv))


def sample(pid: int, address: str, seconds: float, period: float = 0.1) -> Samples:
    """Every ``period`` for ``seconds``: the server's RSS, and the time one health check takes to come
    back. Runs in a process of its own, so the callers' work never delays its measurements."""
    samples = Samples()
    until = time.monotonic() + seconds
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < until:
            samples.rss.append(rss_bytes(pid))
            started = time.perf_counter()
            try:
                health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            except grpc.RpcError as exc:
                samples.health_failures[exc.code().name] += 1
            samples.health.append(time.perf_counter() - started)
            time.sleep(max(0.0, period - (time.perf_counter() - started)))
    return samples


def start_sampler(pid: int, address: str, seconds: float) -> subprocess.Popen:
    code = f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import hostile_memory as h; "
    code += f"s = h.sample({pid}, {address!r}, {seconds}); "
    code += "print(json.dumps([s.rss, s.health, dict(s.health_failures)]))"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def sampled(sampler: subprocess.Popen) -> Samples:
    out, _ = sampler.communicate(timeout=120)
    rss, health, failures = json.loads(out)
    return Samples(rss, health, Counter(failures))


async def hammer(address: str, method: str, payload: bytes, until: float, codes: Counter, caller: int) -> None:
    options = [("grpc.max_send_message_length", 64 * MIB), ("grpc.max_receive_message_length", 64 * MIB)]
    options.append(("tlserve.caller", caller))  # a distinct argument: a connection of its own, as a real caller has
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        call = channel.unary_unary(method)
        while time.monotonic() < until:
            try:
                await call(payload, timeout=10)
                codes["OK"] += 1
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    await asyncio.sleep(0.01)  # a polite retry; hostile enough at this concurrency


async def drive(address: str, mix: dict[str, tuple[str, bytes]], callers: dict[str, int], seconds: float):
    until = time.monotonic() + seconds
    codes = {kind: Counter() for kind in mix}
    kinds = [kind for kind, count in callers.items() for _ in range(count)]
    await asyncio.gather(*(hammer(address, *mix[kind], until, codes[kind], i) for i, kind in enumerate(kinds)))
    return codes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=Path("models"), help="model repository to serve")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the hostile mix runs")
    parser.add_argument("--server-arg", action="append", default=[], help="extra `tlserve serve` flag (repeatable)")
    parser.add_argument("--big", type=int, default=6, help="callers sending near-limit PNGs")
    parser.add_argument("--many", type=int, default=2, help="callers sending --max-images near-limit PNGs")
    parser.add_argument("--typed", type=int, default=2, help="callers sending typed OIP requests (max and huge)")
    parser.add_argument("--raw", type=int, default=1, help="callers sending raw OIP requests")
    parser.add_argument("--bloated", type=int, default=4, help="callers sending protobuf-bloating OIP requests")
    parser.add_argument("--wide", type=int, default=0, help="callers sending raw OIP requests that fill a message")
    args = parser.parse_args(argv)
    if not sorted(args.repository.glob("*/*/model.onnx")):
        parser.error(f"no <name>/<version>/model.onnx under {args.repository}")
    process, address, settings = start_server(args.repository, args.server_arg)
    try:
        name, manifest = the_model(args.repository)
        mix = requests(settings, name, manifest)
        callers = {"big PNGs": args.big, "many PNGs": args.many, "typed max": args.typed}
        callers.update({"typed huge": args.typed, "raw max": args.raw})
        callers.update({"empty inputs": args.bloated, "int64 1-byte": args.bloated, "raw full": args.wide})
        at_rest = rss_bytes(process.pid)
        sampler = start_sampler(process.pid, address, args.seconds)
        codes = asyncio.run(drive(address, mix, callers, args.seconds))
        samples = sampled(sampler)
        time.sleep(2)
        after = rss_bytes(process.pid)
    finally:
        process.terminate()
        process.wait(30)
    budget = memory_budget(settings)
    peak = max(samples.rss)
    tried = sum(sum(c.values()) for c in codes.values())
    print(f"hostile mix for {args.seconds:.0f} s, {sum(callers.values())} callers, server defaults + {args.server_arg}")
    print(f"requests tried: {tried}")
    for kind, counted in codes.items():
        if not callers[kind]:
            continue
        sizes = f"{len(mix[kind][1]) / 1e6:.1f} MB"
        shown = ", ".join(f"{code} {n}" for code, n in counted.most_common()) or "none"
        print(f"  {kind:<11} x{callers[kind]} ({sizes} each): {shown}")
    verdict = "under" if peak <= budget.total else "OVER"
    print(f"RSS: {at_rest / MIB:.0f} MiB at rest, peak {peak / MIB:.0f} MiB, {after / MIB:.0f} MiB 2 s after; ", end="")
    print(f"budget {budget.total / MIB:.0f} MiB ({verdict})")
    print(budget.table())
    slowest = max(samples.health)
    failures = ", ".join(f"{c} {n}" for c, n in samples.health_failures.items()) or "none"
    print(f"health: {len(samples.health)} checks, slowest {slowest * 1000:.0f} ms, failures: {failures}")
    return 0 if peak <= budget.total and slowest < 1.0 and not samples.health_failures else 1


if __name__ == "__main__":
    sys.exit(main())
