"""Serving benchmark: raw ONNX Runtime, the task API with JPEG bytes, and the Open Inference
Protocol with raw uint8 tensors, measured in one run at several concurrencies.

    python benchmarks/bench_serving.py                       # export stock MobileNetV2 at 224 px, bench it
    python benchmarks/bench_serving.py --repository models   # bench the first model of a repository
    python benchmarks/bench_serving.py --trivial             # a trivial graph: measures the front end only
    python benchmarks/bench_serving.py --peer kserve         # KServe 0.21 beside tlserve, in the same sitting

Every request carries one image. ``raw`` is one in-process ONNX Runtime session fed batches of
``c`` images back to back: what perfect dynamic batching of ``c`` outstanding requests would
reach, with no transport at all. The served rows run ``tlserve serve`` as a separate process
(default settings, CPU) and drive it from ``c`` concurrent grpc.aio calls that resend
pre-serialised requests, so the client spends as little CPU as it can. Each cell runs for
``--seconds`` after a warm-up, ``--rounds`` times; the three modes alternate per concurrency
so that load from elsewhere on the machine hits them alike, and a cell pools its rounds.
``mean batch`` is the images per batcher execution, from the server's ``tlserve_batch_size``
histogram (raw: ``c``); ``server CPU ms`` the server process's CPU per call (from /proc, warm-up
included); ``client CPU ms`` this process's CPU per measured call, the client's share of the cores
(raw: ONNX Runtime's CPU per image, measured apart with its spinning off). ``--floor`` adds the
ceiling of any Python gRPC server here (benchmarks/ceiling.py: the floor's round trip at one caller,
and its CPU per call beside raw's).
``--trivial`` serves a graph of microseconds per image with the real signature, so the front end
is what is measured; ``--py-spy FILE`` profiles the server meanwhile and prints a summary.
``--peer kserve`` adds KServe (its own venv at ``.bench/kserve-venv``, a minimal ``kserve.Model`` with
ONNX Runtime: benchmarks/peers/) answering the same OIP bytes, and runs the whole sitting inside a
private network namespace, since KServe binds 0.0.0.0 (root and `ip` needed).
Prints the table (markdown) and, with ``--json``, writes the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
from ceiling import ceiling_table
from peers import grpc_floor, kserve_peer, netns
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from served import free_port, start_server
from trivial_model import write_trivial

from tlserve.manifest import Manifest
from tlserve.server.cpus import available_cpus
from tlserve.server.pb.inference import messages_pb2 as oip
from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as task
from tlserve.server.preprocess import ImageLimits, decode
from tlserve.server.settings import Settings

log = logging.getLogger("bench_serving")

OIP_INFER = "/inference.GRPCInferenceService/ModelInfer"
TASK_CLASSIFY = "/tlserve.v1.Inference/Classify"
MODES = ("raw ORT", "OIP uint8", "task JPEG")


@dataclass(frozen=True)
class Cell:
    mode: str
    concurrency: int
    images_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    mean_batch: float
    server_cpu_ms: float  # server process CPU per call (user + system), warm-up included; 0 for raw
    bench_cpu_ms: float = 0.0  # this process's CPU per call: the client's when served, ORT's per image for raw


@dataclass
class Sample:
    """What one mode measured at one concurrency, summed over rounds."""

    images: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    batches: tuple[float, float] = (0.0, 0.0)  # (executions, images) the server's batcher ran
    server_cpu: tuple[float, int] = (0.0, 0)  # (CPU seconds of the server process, calls answered meanwhile)
    bench_cpu: float = 0.0  # CPU seconds of this process meanwhile (client, or raw's ORT), warm-up excluded

    def add(
        self,
        images: int,
        elapsed: float,
        latencies: list[float],
        batches: tuple[float, float] = (0.0, 0.0),
        server_cpu: tuple[float, int] = (0.0, 0),
        bench_cpu: float = 0.0,
    ) -> None:
        self.images += images
        self.elapsed += elapsed
        self.latencies += latencies
        self.batches = (self.batches[0] + batches[0], self.batches[1] + batches[1])
        self.server_cpu = (self.server_cpu[0] + server_cpu[0], self.server_cpu[1] + server_cpu[1])
        self.bench_cpu += bench_cpu

    def cell(self, mode: str, concurrency: int) -> Cell:
        ms = np.asarray(self.latencies) * 1e3
        mean_batch = self.batches[1] / self.batches[0] if self.batches[0] else float(concurrency)
        return Cell(
            mode,
            concurrency,
            self.images / self.elapsed,
            float(np.percentile(ms, 50)),
            float(np.percentile(ms, 99)),
            len(self.latencies),
            mean_batch,
            1e3 * self.server_cpu[0] / self.server_cpu[1] if self.server_cpu[1] else 0.0,
            1e3 * self.bench_cpu / self.images if self.images else 0.0,
        )


# --- inputs -----------------------------------------------------------------------------------
def photo_jpeg(size: int = 224, quality: int = 90) -> tuple[bytes, str]:
    """scikit-image's chelsea.png (a cat, 451x300) as JPEG bytes, what a caller of the task API sends,
    and a description: resized (shorter side) and centre-cropped to ``size`` x ``size``, or as it
    is when ``size`` is 0."""
    import skimage.data

    img = Image.open(Path(skimage.data.data_dir) / "chelsea.png").convert("RGB")
    if size:
        scale = size / min(img.size)
        img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))), Image.BICUBIC)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        img = img.crop((left, top, left + size, top + size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), f"chelsea {img.width}x{img.height} JPEG q{quality}, {len(buf.getvalue())} bytes"


def model_of(repository: Path) -> tuple[str, Path]:
    """(name, model.onnx) of the repository's first model, newest integer version."""
    files = sorted(
        repository.glob("*/*/model.onnx"),
        key=lambda p: (p.parent.parent.name, int(p.parent.name) if p.parent.name.isdigit() else -1),
    )
    if not files:
        raise SystemExit(f"no */<version>/model.onnx under {repository}")
    return files[-1].parent.parent.name, files[-1]


def unique_labels(categories: list[str]) -> list[str]:
    """Category names made unique (ImageNet's list repeats a few, e.g. "crane")."""
    seen = {c: categories.count(c) for c in categories}
    return [f"{c} ({i})" if seen[c] > 1 else c for i, c in enumerate(categories)]


def export_stock(arch: str, size: int, weights_name: str, root: Path) -> Path:
    """A repository holding torchvision's stock ``arch`` with its ImageNet head (``weights_name``
    when torchvision can load it, else random weights), exported by the export part's API."""
    import torch  # noqa: F401  (the export path needs torch; the rest of the benchmark does not)
    from torchvision import models as tvm

    from tlserve.export.api import ExportOptions, export_model
    from tlserve.manifest import Preprocessing
    from tlserve.trainer.models import head_name

    weights = tvm.get_model_weights(arch)[weights_name]
    try:
        model = tvm.get_model(arch, weights=weights)
    except Exception as exc:  # no network and no cached file: throughput does not depend on the weights
        log.warning("no pretrained %s weights (%s); benchmarking random weights", arch, exc)
        model = tvm.get_model(arch, weights=None)
    manifest = Manifest(
        name=arch,
        version="1",
        architecture=arch,
        labels=unique_labels(weights.meta["categories"]),
        preprocessing=Preprocessing(input_size=size, resize_size=round(size * 256 / 224)),
    )
    export_model(
        model,
        head_name(model),
        manifest,
        root,
        arch,
        "1",
        ExportOptions(verify_images=16),
        source={"source": f"torchvision {arch} {weights}"},
    )
    return root


# --- raw ONNX Runtime ---------------------------------------------------------------------------
def measure_raw(
    session: ort.InferenceSession,
    input_name: str,
    image: np.ndarray,
    concurrency: int,
    seconds: float,
    warmup: float,
    quiet: ort.InferenceSession | None = None,
) -> tuple[int, float, list[float], tuple[float, float], tuple[float, int], float]:
    """Images, seconds and latencies of batches of ``concurrency`` back to back; then, with ``quiet``
    (the same graph with ORT's spinning off), the CPU seconds that it spends on as many images: what
    the compute itself costs, without the CPU that spinning threads burn while they wait."""
    batch = np.repeat(image[None], concurrency, axis=0)
    end_warmup = time.perf_counter() + warmup
    while time.perf_counter() < end_warmup:
        session.run(None, {input_name: batch})
    latencies: list[float] = []
    started, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        session.run(None, {input_name: batch})
        latencies.append(time.perf_counter() - t0)
    elapsed, spent = time.perf_counter() - started, time.process_time() - cpu
    if quiet is not None:  # a quarter of the time, scaled to the images measured
        runs, cpu, until = 0, time.process_time(), time.perf_counter() + max(0.5, seconds / 4)
        while time.perf_counter() < until or not runs:
            quiet.run(None, {input_name: batch})
            runs += 1
        spent = (time.process_time() - cpu) * len(latencies) / runs
    return concurrency * len(latencies), elapsed, latencies, (0.0, 0.0), (0.0, 0), spent


def not_spinning() -> ort.SessionOptions:
    """ORT's defaults with its thread pools' spinning off."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


# --- served -------------------------------------------------------------------------------------
async def drive(
    address: str, method: str, payload: bytes, concurrency: int, seconds: float, warmup: float
) -> tuple[int, float, list[float], int, float]:
    """``concurrency`` callers resending ``payload`` for ``seconds`` after ``warmup``; the measured
    calls, seconds and latencies, every call answered (warm-up included), and this process's CPU
    seconds over the measured calls (the client's cost)."""
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        call = ch.unary_unary(method)  # bytes in, bytes out: no client-side (de)serialisation
        latencies: list[float] = []
        window: dict[str, float] = {}
        answered = [0]

        cpu = [0.0]

        async def mark() -> None:  # this process's CPU when the measured window opens
            await asyncio.sleep(max(0.0, window["start"] - time.perf_counter()))
            cpu[0] = time.process_time()

        async def caller() -> None:
            while True:
                t0 = time.perf_counter()
                if t0 >= window["end"]:
                    return
                await call(payload)
                answered[0] += 1
                if t0 >= window["start"]:
                    latencies.append(time.perf_counter() - t0)

        now = time.perf_counter()
        window.update(start=now + warmup, end=now + warmup + seconds)
        await asyncio.gather(mark(), *(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - window["start"]
        return len(latencies), elapsed, latencies, answered[0], time.process_time() - cpu[0]


def batcher_totals(metrics_url: str, model: str) -> tuple[float, float]:
    """(executions, images) so far from the server's ``tlserve_batch_size`` histogram."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    totals = {"tlserve_batch_size_count": 0.0, "tlserve_batch_size_sum": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals and sample.labels.get("model") == model:
                totals[sample.name] = sample.value
    return totals["tlserve_batch_size_count"], totals["tlserve_batch_size_sum"]


@dataclass(frozen=True)
class Served:
    """A served path: its mode, the call it resends, and its server's CPU seconds and batcher totals so far
    (``batches`` None: a server with no batcher, one image per execution)."""

    mode: str
    address: str
    method: str
    payload: bytes
    cpu: Callable[[], float]
    batches: Callable[[], tuple[float, float]] | None


def measure_served(
    path: Served, concurrency: int, seconds: float, warmup: float
) -> tuple[int, float, list[float], tuple[float, float], tuple[float, int], float]:
    """``drive`` plus how the server batched and the CPU it spent meanwhile (warm-up included), and
    the client's CPU seconds over the measured calls."""
    before, cpu_before = path.batches() if path.batches else (0.0, 0.0), path.cpu()
    count, elapsed, latencies, answered, client_cpu = asyncio.run(
        drive(path.address, path.method, path.payload, concurrency, seconds, warmup)
    )
    spent = path.cpu() - cpu_before
    after = path.batches() if path.batches else (float(answered), float(answered))
    return count, elapsed, latencies, (after[0] - before[0], after[1] - before[1]), (spent, answered), client_cpu


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far, all threads (Linux /proc): what the
    server spends per call, nearly independent of what else runs on the machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def check_agreement(address: str, oip_payload: bytes, task_payload: bytes, raw_top: int) -> tuple[str, bytes]:
    """The top class of one photo through each path (they must agree), and tlserve's OIP answer's bytes."""
    with grpc.insecure_channel(address) as channel:
        answer = channel.unary_unary(OIP_INFER)(oip_payload)
        response = oip.ModelInferResponse.FromString(answer)
        classified = task.ClassifyResponse.FromString(channel.unary_unary(TASK_CLASSIFY)(task_payload))
    scores = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
    tops = {"raw": raw_top, "oip": int(np.argmax(scores)), "task": classified.results[0].predictions[0].index}
    if len(set(tops.values())) != 1:
        raise SystemExit(f"the three paths disagree on the top class: {tops}")
    return f"{classified.results[0].predictions[0].label} ({classified.results[0].predictions[0].score:.2f})", answer


# --- profile ------------------------------------------------------------------------------------
def start_profiler(pid: int, output: Path) -> subprocess.Popen:
    """py-spy sampling ``pid`` (every thread, idle ones left out) into collapsed stacks at ``output``."""
    beside = Path(sys.executable).with_name("py-spy")  # pip installs it next to the interpreter
    argv = [
        str(beside) if beside.is_file() else "py-spy",
        "record",
        "--pid",
        str(pid),
        "--format",
        "raw",
        "--rate",
        "250",
        "--output",
        str(output),
    ]
    profiler = subprocess.Popen([*argv, "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached before the first cell starts
    return profiler


def stop_profiler(profiler: subprocess.Popen) -> None:
    profiler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    profiler.wait(60)


# Leaf frames where a thread waits rather than works (py-spy still samples some of them as busy).
IDLE_LEAVES = ("EpollSelector.select (selectors.py)", "_worker (thread.py)", "Thread.run (threading.py)")


def profile_summary(collapsed: str, top: int = 25) -> str:
    """The functions with the most samples on the stack (inclusive) and on top of it (self), as a
    share of the samples where a server thread was working (waits in IDLE_LEAVES left out), from
    py-spy's collapsed stacks."""
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [
            f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")" for f in stack.split(";")
        ]
        if frames[-1] in IDLE_LEAVES:
            continue
        total += count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
        own[frames[-1]] = own.get(frames[-1], 0) + count
    lines = [
        f"py-spy: {total} samples of busy server threads",
        "",
        "| function | inclusive % | self % |",
        "|---|---:|---:|",
    ]
    for frame, count in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| `{frame}` | {100 * count / total:.1f} | {100 * own.get(frame, 0) / total:.1f} |")
    lines += ["", "| function (self) | self % |", "|---|---:|"]
    for frame, count in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| `{frame}` | {100 * count / total:.1f} |")
    return "\n".join(lines)


# --- report -------------------------------------------------------------------------------------
def table(cells: list[Cell]) -> str:
    raw = {c.concurrency: c for c in cells if c.mode == MODES[0]}
    lines = [
        "| path | concurrency | img/s | p50 ms | p99 ms | ÷ raw img/s | p50 added ms | mean batch | server CPU ms "
        "| client CPU ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        base = raw[c.concurrency]
        added = "" if c.mode == MODES[0] else f"{c.p50_ms - base.p50_ms:+.2f}"
        lines.append(
            f"| {c.mode} | {c.concurrency} | {c.images_per_s:.1f} | {c.p50_ms:.2f} | {c.p99_ms:.2f} | "
            f"{c.images_per_s / base.images_per_s:.2f} | {added} | {c.mean_batch:.1f} | "
            f"{f'{c.server_cpu_ms:.2f}' if c.server_cpu_ms else ''} | {c.bench_cpu_ms:.2f} |"
        )
    return "\n".join(lines)


def peer_table(cells: list[Cell], peer: str, ours: str = MODES[1]) -> str:
    """Per concurrency: ``ours`` ÷ ``peer`` in img/s, and in server CPU per call (below 1: we spend less)."""
    by = {(c.mode, c.concurrency): c for c in cells}
    lines = [
        f"| concurrency | tlserve {ours} ÷ {peer} img/s | server CPU per call, tlserve ÷ {peer.split()[0]} |",
        "|---:|---:|---:|",
    ]
    for c in sorted({c.concurrency for c in cells}):
        a, b = by[ours, c], by[peer, c]
        cpu = f"{a.server_cpu_ms / b.server_cpu_ms:.2f}" if a.server_cpu_ms and b.server_cpu_ms else ""
        lines.append(f"| {c} | {a.images_per_s / b.images_per_s:.2f} | {cpu} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repository", type=Path, help="bench this repository's first model (default: export stock --arch at --size)"
    )
    parser.add_argument(
        "--trivial",
        action="store_true",
        help="serve a trivial graph with the real signature (uint8 [N,3,S,S] in, probabilities and embedding out)",
    )
    parser.add_argument("--arch", default="mobilenet_v2")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument(
        "--weights",
        default="IMAGENET1K_V1",
        help="torchvision weights of --arch (the file scripts/fetch_weights.sh caches offline)",
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=8.0, help="measured time per cell")
    parser.add_argument("--warmup", type=float, default=1.5, help="unmeasured time before each cell")
    parser.add_argument("--rounds", type=int, default=2, help="passes over every cell; a cell pools its rounds")
    parser.add_argument("--server-arg", action="append", default=[], help="extra `tlserve serve` flag (repeatable)")
    parser.add_argument(
        "--peer",
        choices=["kserve"],
        help="also serve the model with this peer (own venv, private network namespace; needs root and `ip`)",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also measure a bare grpc.aio ModelInfer handler with no model (peers/grpc_floor.py): the ceiling of "
        "any Python gRPC front end on this machine",
    )
    parser.add_argument(
        "--kserve-arg", action="append", default=[], help="extra KServe ModelServer flag, e.g. --workers=2 (repeatable)"
    )
    parser.add_argument(
        "--jpeg-size",
        type=int,
        default=224,
        metavar="N",
        help="the task path's JPEG: the photo resized and cropped to N x N at quality 90 (0: as it is, 451x300)",
    )
    parser.add_argument("--json", type=Path, help="also write the cells here")
    parser.add_argument(
        "--py-spy",
        type=Path,
        metavar="FILE",
        help="profile the server process with py-spy while it is measured (collapsed stacks; summary on stdout)",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the server process
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    if args.peer and not netns.inside():
        netns.require_ip()
        kserve_peer.ensure_venv()  # pip needs the network: before entering the namespace
        return netns.run_inside([str(Path(__file__).resolve()), *(sys.argv[1:] if argv is None else argv)])
    modes = (*MODES, *((kserve_peer.MODE,) if args.peer else ()), *((grpc_floor.MODE,) if args.floor else ()))

    with tempfile.TemporaryDirectory() as tmp:
        if args.trivial:
            repository = write_trivial(Path(tmp), size=args.size)
        else:
            repository = args.repository or export_stock(args.arch, args.size, args.weights, Path(tmp))
        name, model_file = model_of(repository)
        session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
        quiet = ort.InferenceSession(str(model_file), not_spinning(), providers=["CPUExecutionProvider"])
        manifest = Manifest.from_metadata(session.get_modelmeta().custom_metadata_map)
        jpeg, jpeg_text = photo_jpeg(args.jpeg_size)
        image = decode(jpeg, manifest.preprocessing, ImageLimits.from_settings(Settings()))
        request = oip.ModelInferRequest(
            model_name=name,
            raw_input_contents=[image[None].tobytes()],
            outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")],
        )
        request.inputs.add(name=manifest.input_name, datatype="UINT8", shape=[1, *image.shape])
        oip_payload = request.SerializeToString()
        task_payload = task.ClassifyRequest(
            model=task.ModelRef(name=name), images=[task.Image(encoded=jpeg)], top_k=5
        ).SerializeToString()
        raw_top = int(np.argmax(session.run([manifest.outputs.probabilities], {manifest.input_name: image[None]})[0]))

        load_before = os.getloadavg()
        process, address, metrics_url = start_server(repository, args.server_arg)
        peer, peer_version, profiler, floor = None, "", None, None
        try:
            agreed, answer = check_agreement(address, oip_payload, task_payload, raw_top)
            cpu, batches = partial(process_cpu, process.pid), partial(batcher_totals, metrics_url, name)
            served = [
                Served(MODES[1], address, OIP_INFER, oip_payload, cpu, batches),
                Served(MODES[2], address, TASK_CLASSIFY, task_payload, cpu, batches),
            ]
            if args.peer:
                peer, peer_address, peer_version = kserve_peer.start_checked(
                    model_file, name, Path(tmp) / "kserve.log", args.kserve_arg, oip_payload, raw_top
                )
                cpu = partial(kserve_peer.tree_cpu, peer.pid)
                served.append(Served(kserve_peer.MODE, peer_address, OIP_INFER, oip_payload, cpu, None))
            if args.floor:
                (Path(tmp) / "answer.bin").write_bytes(answer)
                port = free_port()
                floor = grpc_floor.start(port, Path(tmp) / "answer.bin", oip_payload)
                served.append(
                    Served(
                        grpc_floor.MODE,
                        f"127.0.0.1:{port}",
                        OIP_INFER,
                        oip_payload,
                        partial(process_cpu, floor.pid),
                        None,
                    )
                )
            if args.py_spy:
                profiler = start_profiler(process.pid, args.py_spy)
            samples = {(mode, c): Sample() for c in args.concurrency for mode in modes}
            for round_ in range(args.rounds):
                for c in args.concurrency:
                    samples[MODES[0], c].add(
                        *measure_raw(session, manifest.input_name, image, c, args.seconds, args.warmup, quiet)
                    )
                    for path in served:
                        samples[path.mode, c].add(*measure_served(path, c, args.seconds, args.warmup))
                    log.info(
                        "round %d, concurrency %d: %s",
                        round_ + 1,
                        c,
                        ", ".join(f"{m} {samples[m, c].images / samples[m, c].elapsed:.1f} img/s" for m in modes),
                    )
            cells = [samples[mode, c].cell(mode, c) for c in args.concurrency for mode in modes]
        finally:
            if profiler:
                stop_profiler(profiler)
            if peer:
                kserve_peer.stop_kserve(peer)
            if floor:
                floor.terminate()
                floor.wait(30)
            process.terminate()
            process.wait(30)
        load_after = os.getloadavg()

    print(
        f"model: {name} ({manifest.architecture}, {manifest.preprocessing.input_size} px, {manifest.precision}), "
        f"ONNX Runtime {ort.__version__} CPU, {os.cpu_count()} CPUs; top class on all {len(modes)} paths: {agreed}"
    )
    if args.peer:
        print(
            f"peer: {peer_version} over OIP gRPC (benchmarks/peers/kserve_onnx.py, the same ONNX Runtime, "
            f"in .bench/kserve-venv), KServe flags: {args.kserve_arg or 'defaults'}; "
            f"all paths in the private network namespace {os.environ[netns.ENV]}"
        )
    print(
        f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}; "
        f"{args.rounds} x {args.seconds:g} s per cell, each after {args.warmup:g} s warm-up; "
        f"server flags: {args.server_arg or 'defaults'}"
    )
    print(f"task JPEG: {jpeg_text}")
    print()
    print(table(cells))
    if args.peer:
        print()
        print(peer_table(cells, kserve_peer.MODE))
    if args.floor:
        print()
        print(peer_table(cells, grpc_floor.MODE))
        print()
        ours = [MODES[1], *((kserve_peer.MODE,) if args.peer else ())]
        print(ceiling_table(cells, MODES[0], grpc_floor.MODE, ours, available_cpus()))
    if args.json:
        args.json.write_text(json.dumps([asdict(c) for c in cells], indent=2))
    if args.py_spy:
        print()
        print(profile_summary(args.py_spy.read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
