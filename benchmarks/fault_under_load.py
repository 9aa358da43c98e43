"""Faults under steady load: the real server in a subprocess (127.0.0.1 only), a real model, real photos.

    python benchmarks/fault_under_load.py                          # export a small MobileNetV2 (64 px), run all
    python benchmarks/fault_under_load.py --repository models      # use this repository's first model
    python benchmarks/fault_under_load.py --scenarios sigterm storm

Scenarios, each bounded in time, each printing the count of every status code seen and the
*lost* requests (CANCELLED, UNKNOWN, INTERNAL, DEADLINE_EXCEEDED or no answer at all):

- ``sigterm``: SIGTERM mid-load, ``--sigterm-runs`` times; every request is answered OK or refused
  UNAVAILABLE, none lost, exit status 0.
- ``reload``: a new version published every second, the reload triggered by SIGHUP and the
  ReloadRepository RPC in turn (``latest:1``: the old version drains each time); nothing fails.
- ``storm``: 50 SIGHUPs in 5 s; the process stays up, nothing fails.
- ``corrupt``: a served version's model.onnx overwritten with garbage in place, and a broken new
  version published; the server stays up, refuses both loudly (metrics, log), and both models go
  on serving from what they loaded; then a good file written in place is reloaded.
- ``slowloris``: hundreds of idle and half-sent connections on the metrics and gRPC ports; health
  checks and scrapes still answer (how fast is printed).
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from served import free_port

from tlserve.server.pb.tlserve.v1 import tlserve_pb2 as pb
from tlserve.server.pb.tlserve.v1 import tlserve_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import export_stock, model_of, photo_jpeg  # noqa: E402

log = logging.getLogger("fault_under_load")
LOST = ("CANCELLED", "UNKNOWN", "INTERNAL", "DEADLINE_EXCEEDED", "no answer")
SERVING = health_pb2.HealthCheckResponse.SERVING


def publish(src: Path, dst: Path) -> None:
    """Copy a version folder the way export publishes one: aside, then rename into place."""
    tmp = dst.parent / f".{dst.name}.tmp"
    shutil.copytree(src, tmp)
    tmp.rename(dst)


class Server:
    """``tlserve serve`` in a subprocess, its log in a file."""

    def __init__(self, repository: Path, workdir: Path, *extra: str) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.log_path = workdir / f"serve-{self.port}.log"
        self._log = open(self.log_path, "w")
        command = [sys.executable, "-m", "tlserve", "serve", "--repository", str(repository), "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--metrics-port", str(self.metrics_port), "--device", "cpu"]
        self.process = subprocess.Popen(
            [*command, "--drain-seconds", "5", *extra],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.address = f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120) -> None:
        give_up = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="tlserve.v1.Inference")
            while time.monotonic() < give_up:
                if self.process.poll() is not None:
                    raise SystemExit(f"server exited with {self.process.returncode}:\n{self.log()}")
                try:
                    if stub.Check(request, timeout=2).status == SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise SystemExit(f"server not SERVING after {timeout:g}s:\n{self.log()}")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def metric(self, name: str, **labels: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    def close(self) -> int:
        if self.process.poll() is None:
            self.process.kill()
        code = self.process.wait(30)
        self._log.close()
        return code


class Load:
    """``workers`` threads, each on its own channel, classifying a real photo back to back; every
    outcome is counted by status code (and UNAVAILABLE by who said it)."""

    def __init__(self, address: str, image: bytes, workers: int, models: tuple[str, ...] = ("",)) -> None:
        self.codes: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._address = address
        self._image = image
        self._threads = [threading.Thread(target=self._run, args=(models[i % len(models)],)) for i in range(workers)]

    def _run(self, model: str) -> None:
        request = pb.ClassifyRequest(model=pb.ModelRef(name=model), images=[pb.Image(encoded=self._image)], top_k=1)
        with grpc.insecure_channel(self._address) as channel:
            classify = tlserve_pb2_grpc.InferenceStub(channel).Classify
            while not self._stop.is_set():
                try:
                    classify(request, timeout=20)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name if exc.code() is not None else "no answer"
                    if code == "UNAVAILABLE":
                        code += " (draining)" if "shutting down" in (exc.details() or "") else " (no server)"
                with self._lock:
                    self.codes[code] += 1
                if code.startswith("UNAVAILABLE"):
                    time.sleep(0.005)  # a client's retry, at once

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
            if thread.is_alive():
                with self._lock:
                    self.codes["no answer"] += 1

    def wait_for(self, count: int, timeout: float = 60) -> None:
        give_up = time.monotonic() + timeout
        while sum(self.codes.values()) < count and time.monotonic() < give_up:
            time.sleep(0.05)

    @property
    def lost(self) -> int:
        return sum(n for code, n in self.codes.items() if code in LOST)

    @property
    def failed(self) -> int:
        return sum(n for code, n in self.codes.items() if code != "OK")

    def summary(self) -> str:
        return ", ".join(f"{code} {n}" for code, n in sorted(self.codes.items())) or "nothing"


# --- scenarios -----------------------------------------------------------------------------------
def sigterm(ctx: Context) -> bool:
    ok = True
    for run in range(ctx.args.sigterm_runs):
        server = ctx.server()
        with Load(server.address, ctx.image, ctx.args.workers) as load:
            load.wait_for(40)
            server.signal(signal.SIGTERM)
            try:
                code = server.process.wait(30)
            except subprocess.TimeoutExpired:
                code = None
        server.close()
        good = code == 0 and load.lost == 0
        ok &= good
        print(f"  run {run + 1}: exit {code}; {load.summary()}; lost {load.lost} {'ok' if good else 'FAIL'}")
    return ok


def hot_reload(ctx: Context) -> bool:
    server = ctx.server()
    versions = ctx.repository / ctx.name
    first = int(max((p.name for p in versions.iterdir() if p.name.isdigit()), key=int))
    with grpc.insecure_channel(server.address) as channel:
        reload_rpc = tlserve_pb2_grpc.InferenceStub(channel).ReloadRepository
        with Load(server.address, ctx.image, ctx.args.workers) as load:
            load.wait_for(20)
            for i in range(1, ctx.args.reloads + 1):
                publish(versions / str(first), versions / str(first + i))
                if i % 2:
                    server.signal(signal.SIGHUP)
                else:
                    reload_rpc(pb.ReloadRepositoryRequest(), timeout=60)
                time.sleep(1.0)
    served = server.metric("tlserve_model_ready", model=ctx.name, version=str(first + ctx.args.reloads))
    server.signal(signal.SIGTERM)
    code = server.process.wait(30)
    server.close()
    for i in range(1, ctx.args.reloads + 1):
        shutil.rmtree(versions / str(first + i))
    good = load.failed == 0 and served == 1 and code == 0
    print(f"  {ctx.args.reloads} reloads (SIGHUP and ReloadRepository in turn): {load.summary()}; failed {load.failed}")
    print(f"  newest version ready at the end: {served == 1}; exit {code} {'ok' if good else 'FAIL'}")
    return good


def storm(ctx: Context) -> bool:
    server = ctx.server()
    with Load(server.address, ctx.image, ctx.args.workers) as load:
        load.wait_for(20)
        for _ in range(50):
            server.signal(signal.SIGHUP)
            time.sleep(0.1)
        load.wait_for(sum(load.codes.values()) + 20)
    alive = server.process.poll() is None
    rescans = server.log().count("rescanning the repository")
    server.signal(signal.SIGTERM)
    code = server.process.wait(30)
    server.close()
    good = alive and load.failed == 0 and code == 0
    print(f"  50 SIGHUPs in 5 s: alive {alive}, {rescans} SIGHUPs logged; {load.summary()}; failed {load.failed}")
    print(f"  exit {code} {'ok' if good else 'FAIL'}")
    return good


def corrupt(ctx: Context, workdir: Path) -> bool:
    root = workdir / "two-models"
    source = model_of(ctx.repository)[1].parent
    for name in ("fault", "other"):
        (root / name).mkdir(parents=True)
        publish(source, root / name / "1")
    server = ctx.server(root)
    target = root / "fault" / "1" / "model.onnx"
    good_bytes = target.read_bytes()
    with Load(server.address, ctx.image, ctx.args.workers, models=("fault", "other")) as load:
        load.wait_for(20)
        target.write_bytes(b"\x08\x07 not an onnx model " * 1000)  # in place: same path, same inode
        server.signal(signal.SIGHUP)
        refused = wait_metric(server, "tlserve_model_file_changed_total", 1, action="refused")
        (root / "fault" / "2").mkdir()
        (root / "fault" / "2" / "model.onnx").write_bytes(b"garbage")
        server.signal(signal.SIGHUP)
        failed_loads = wait_metric(server, "tlserve_model_load_failures_total", 1, model="fault")
        load.wait_for(sum(load.codes.values()) + 40)
        target.write_bytes(good_bytes)  # a good file again, in place
        server.signal(signal.SIGHUP)
        reloaded = wait_metric(server, "tlserve_model_file_changed_total", 1, action="reloaded")
        load.wait_for(sum(load.codes.values()) + 20)
    alive = server.process.poll() is None
    loud = "changed on disk and the new file failed to load" in server.log()
    server.signal(signal.SIGTERM)
    code = server.process.wait(30)
    server.close()
    good = alive and load.failed == 0 and refused == 1 and failed_loads == 1 and reloaded == 1 and loud and code == 0
    print(
        f"  fault/1 garbage in place: refused {refused:g} (logged loudly: {loud}); broken fault/2: load failures "
        f"{failed_loads:g}; good file back in place: reloaded {reloaded:g}"
    )
    print(f"  load on fault and other: {load.summary()}; failed {load.failed}; alive {alive}; exit {code}")
    print(f"  {'ok' if good else 'FAIL'}")
    return good


def wait_metric(server: Server, name: str, value: float, timeout: float = 60, **labels: str) -> float:
    give_up = time.monotonic() + timeout
    while (got := server.metric(name, **labels)) < value and time.monotonic() < give_up:
        time.sleep(0.1)
    return got


@contextmanager
def idle_connections(port: int, count: int, partial: bytes) -> Iterator[list[socket.socket]]:
    """``count`` TCP connections to ``port``, each having sent only ``partial`` and then nothing."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            if partial:
                s.sendall(partial)
            sockets.append(s)
        yield sockets
    finally:
        for s in sockets:
            s.close()


def timed(calls: int, call: Callable[[], object]) -> tuple[int, list[float]]:
    answered, times = 0, []
    for _ in range(calls):
        t0 = time.perf_counter()
        try:
            call()
            answered += 1
        except Exception:
            pass
        times.append(time.perf_counter() - t0)
    return answered, times


def slowloris(ctx: Context) -> bool:
    server = ctx.server()
    n = ctx.args.connections
    with grpc.insecure_channel(server.address) as channel, Load(server.address, ctx.image, 2) as load:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="tlserve.v1.Inference")

        def check() -> None:
            health.Check(request, timeout=5)

        def scrape() -> None:
            urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read()

        load.wait_for(10)
        rows = [("no idle connections", timed(20, check), timed(5, scrape))]
        with idle_connections(server.metrics_port, n, b"GET /metrics HTTP/1.1\r\nHost: x\r\n"):
            rows.append((f"{n} half-sent requests on metrics", timed(20, check), timed(5, scrape)))
            with idle_connections(server.port, n, b"PRI * HTTP/2.0\r\n"):
                rows.append((f"+ {n} half-open HTTP/2 on gRPC", timed(20, check), timed(5, scrape)))
        with idle_connections(server.port, n, b""):
            rows.append((f"{n} silent TCP on gRPC", timed(20, check), timed(5, scrape)))
    alive = server.process.poll() is None
    server.signal(signal.SIGTERM)
    code = server.process.wait(30)
    server.close()
    good = alive and all(h[0] == 20 for _, h, _ in rows)
    print("  | connections held | health answered | health p50 / max ms | scrapes answered | scrape max ms |")
    print("  |---|---:|---:|---:|---:|")
    for label, (h_ok, h_t), (s_ok, s_t) in rows:
        h_sorted = sorted(h_t)
        print(
            f"  | {label} | {h_ok}/20 | {h_sorted[len(h_sorted) // 2] * 1e3:.1f} / {h_sorted[-1] * 1e3:.1f} | "
            f"{s_ok}/5 | {max(s_t) * 1e3:.0f} |"
        )
    print(f"  load meanwhile: {load.summary()}; alive {alive}; exit {code} {'ok' if good else 'FAIL'}")
    return good


class Context:
    def __init__(self, args: argparse.Namespace, repository: Path, workdir: Path) -> None:
        self.args = args
        self.repository = repository
        self.workdir = workdir
        self.name = model_of(repository)[0]
        self.image = photo_jpeg(0)[0]  # the 451x300 photo as it is

    def server(self, repository: Path | None = None, *extra: str) -> Server:
        server = Server(repository or self.repository, self.workdir, *extra)
        server.wait_ready()
        return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, help="use this repository's first model (default: export one)")
    parser.add_argument("--size", type=int, default=64, help="input size of the exported default model")
    parser.add_argument("--scenarios", nargs="+", default=["sigterm", "reload", "storm", "corrupt", "slowloris"])
    parser.add_argument("--workers", type=int, default=8, help="concurrent callers")
    parser.add_argument("--sigterm-runs", type=int, default=4)
    parser.add_argument("--reloads", type=int, default=6)
    parser.add_argument("--connections", type=int, default=200, help="idle connections per port (slowloris)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.repository:
            repository = workdir / "repo"
            name, model_file = model_of(args.repository)
            (repository / name).mkdir(parents=True)
            publish(model_file.parent, repository / name / "1")
        else:
            repository = export_stock("mobilenet_v2", args.size, "IMAGENET1K_V1", workdir / "repo")
        ctx = Context(args, repository, workdir)
        print(f"model {ctx.name} from {model_of(repository)[1].name}; {args.workers} callers; {os.cpu_count()} CPUs")
        results = {}
        for name in args.scenarios:
            print(f"{name}:")
            started = time.monotonic()
            results[name] = (
                {"sigterm": sigterm, "reload": hot_reload, "storm": storm, "slowloris": slowloris}[name](ctx)
                if name != "corrupt"
                else corrupt(ctx, workdir)
            )
            print(f"  ({time.monotonic() - started:.0f} s)")
        print("summary: " + ", ".join(f"{name} {'ok' if ok else 'FAIL'}" for name, ok in results.items()))
        return 0 if all(results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
